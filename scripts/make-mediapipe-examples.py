"""Two real, pretrained edge models as plain ONNX files: MediaPipe's face detector (BlazeFace, short
range) and its selfie segmenter, converted from the TFLite files inside the mediapipe wheel by tf2onnx.

The outputs are committed in examples/mediapipe/ (with their licence), so nothing here runs in CI:
tensorflow, tf2onnx and mediapipe live in scratch environments, not camrt's:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx onnx
    pip download --no-deps mediapipe==0.10.14 -d /tmp/mp      # the wheel holds the .tflite files
    /tmp/tfvenv/bin/python scripts/make-mediapipe-examples.py /tmp/mp/mediapipe-0.10.14-*.whl examples/mediapipe

tf2onnx converts both files as they are; two small graph edits then make them explainable, because
camrt differentiates a model's raw outputs and these keep their meaning in MediaPipe's C++ graph:

- **Face detector**: its outputs are anchor offsets (`regressors` [1, 896, 16]) and logits
  (`classificators` [1, 896, 1]); MediaPipe's TensorsToDetectionsCalculator decodes them. The edit
  appends that decoding (fixed-size anchors, so cx = dx + anchor_x * 128, cy = dy + anchor_y * 128,
  w = dw, h = dh in the 128 x 128 input's pixels) and the sigmoid score, as one output
  `detections` [1, 896, 5]: a raw (pre-NMS) head, candidates first, cx cy w h, then the face score,
  which `--target box:... --box-layout candidates-first` reads.
- **Selfie segmenter**: its last layer is MediaPipe's custom op Convolution2DTransposeBias, which
  tf2onnx leaves as `TFL_Convolution2DTransposeBias` (onnxruntime cannot run it). The edit writes it
  as the ONNX ConvTranspose it is (2 x 2 kernel, stride 2, bias; TFLite stores the kernel as
  [out, kh, kw, in]) and replaces the sigmoid mask by two-class logits `segmentation` [1, 2, 256, 256]
  = (0, z): their softmax is (1 - p, p), p the person probability, so `--target seg:1` explains the
  person over the pixels where p > 0.5, as for any segmentation model.

Check against MediaPipe itself (its own runtime, in a third environment; prints the differences):

    python3 -m venv /tmp/mpvenv && /tmp/mpvenv/bin/pip install /tmp/mp/mediapipe-0.10.14-*.whl "numpy<2" onnxruntime scikit-image
    /tmp/mpvenv/bin/python scripts/make-mediapipe-examples.py --check examples/mediapipe
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FACE_TFLITE = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
SELFIE_TFLITE = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
FACE_INPUT = 128
# MediaPipe's face_detection_short_range anchors (SsdAnchorsCalculator): 2 anchors per cell on the
# 16 x 16 grid of stride 8, 6 per cell on the 8 x 8 grid of stride 16 (three layers of stride 16
# with 2 anchors each, merged), centres at (cell + 0.5) / grid, fixed size 1.
FACE_ANCHOR_GRIDS = ((16, 2), (8, 6))


def face_anchor_centres():
    import numpy as np

    centres = [((x + 0.5) / grid, (y + 0.5) / grid)
               for grid, per_cell in FACE_ANCHOR_GRIDS for y in range(grid) for x in range(grid)
               for _ in range(per_cell)]
    return np.asarray(centres, dtype=np.float32)


def convert(tflite: Path, onnx_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--output", str(onnx_path),
                    "--opset", "17"], check=True, capture_output=True)


def add_face_decoding(model):
    """Append the decoding to [1, 896, 5] = (cx, cy, w, h, sigmoid(logit)) in input pixels."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    offsets = np.zeros((1, len(face_anchor_centres()), 4), dtype=np.float32)
    offsets[0, :, :2] = face_anchor_centres() * FACE_INPUT
    graph.initializer.extend([
        numpy_helper.from_array(offsets, "camrt_example/anchor_offsets"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "camrt_example/zero"),
        numpy_helper.from_array(np.array([4], dtype=np.int64), "camrt_example/four"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "camrt_example/axis2"),
    ])
    graph.node.extend([
        helper.make_node("Slice", ["regressors", "camrt_example/zero", "camrt_example/four", "camrt_example/axis2"],
                         ["camrt_example/box_offsets"]),
        helper.make_node("Add", ["camrt_example/box_offsets", "camrt_example/anchor_offsets"],
                         ["camrt_example/boxes"]),
        helper.make_node("Sigmoid", ["classificators"], ["camrt_example/face_score"]),
        helper.make_node("Concat", ["camrt_example/boxes", "camrt_example/face_score"], ["detections"], axis=2),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("detections", 1, [1, len(offsets[0]), 5]))
    return model


def add_segmentation_logits(model):
    """Write the custom transposed convolution as ConvTranspose (NCHW) and output the logits (0, z)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    (custom,) = [node for node in graph.node if node.op_type == "TFL_Convolution2DTransposeBias"]
    (to_nhwc,) = [node for node in graph.node if node.output[0] == custom.input[0]]
    assert to_nhwc.op_type == "Transpose", to_nhwc.op_type
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    kernel = numpy_helper.to_array(initializers[custom.input[1]])          # [out, kh, kw, in]
    graph.initializer.append(numpy_helper.from_array(kernel.transpose(3, 0, 1, 2).copy(), "camrt_example/kernel"))
    person = helper.make_node("ConvTranspose", [to_nhwc.input[0], "camrt_example/kernel", custom.input[2]],
                              ["camrt_example/person_logit"], kernel_shape=list(kernel.shape[1:3]), strides=[2, 2])
    background = helper.make_node("Sub", ["camrt_example/person_logit", "camrt_example/person_logit"],
                                  ["camrt_example/background_logit"])
    logits = helper.make_node("Concat", ["camrt_example/background_logit", "camrt_example/person_logit"],
                              ["segmentation"], axis=1)
    (mask,) = [node for node in graph.node if custom.output[0] in node.input]
    assert mask.op_type == "Sigmoid", mask.op_type
    kept = [node for node in graph.node if node not in (custom, to_nhwc, mask)]
    del graph.node[:]
    graph.node.extend(kept + [person, background, logits])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("segmentation", 1, [1, 2, 256, 256]))
    used = {name for node in graph.node for name in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]   # the TFLite-layout kernel
    for tensor in unused:
        graph.initializer.remove(tensor)
    return model


def make(wheel: Path, outdir: Path) -> None:
    import onnx

    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(wheel) as archive:
        for member, name, edit in ((FACE_TFLITE, "face_detection", add_face_decoding),
                                   (SELFIE_TFLITE, "selfie_segmentation", add_segmentation_logits)):
            tflite = Path(archive.extract(member, scratch))
            converted = Path(scratch) / f"{name}.tf2onnx.onnx"
            convert(tflite, converted)
            model = edit(onnx.load(str(converted)))
            onnx.checker.check_model(model, full_check=True)
            onnx.save(model, str(outdir / f"{name}.onnx"))
            print(f"wrote {outdir / f'{name}.onnx'}")


def check(outdir: Path) -> None:
    """Compare the edited files with MediaPipe's own runtime on skimage's astronaut."""
    import mediapipe as mp
    import numpy as np
    import onnxruntime as ort
    from skimage import data, transform

    photo = data.astronaut()
    face_input = (transform.resize(photo, (FACE_INPUT, FACE_INPUT), anti_aliasing=False) * 255).astype(np.uint8)
    raw = ort.InferenceSession(str(outdir / "face_detection.onnx")).run(
        None, {"input": (face_input[None].astype(np.float32) / 127.5 - 1)})[0][0]
    best = raw[raw[:, 4].argmax()]
    with mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5) as detector:
        box = detector.process(face_input).detections[0].location_data.relative_bounding_box
    theirs = np.array([box.xmin + box.width / 2, box.ymin + box.height / 2, box.width, box.height]) * FACE_INPUT
    print(f"face: best candidate cx cy w h {np.round(best[:4], 2)} score {best[4]:.3f}; "
          f"MediaPipe (weighted NMS) {np.round(theirs, 2)}")

    selfie = (transform.resize(photo, (256, 256), anti_aliasing=False) * 255).astype(np.uint8)
    logits = ort.InferenceSession(str(outdir / "selfie_segmentation.onnx")).run(
        None, {"input_1": selfie[None].astype(np.float32) / 255})[0][0]
    ours = 1 / (1 + np.exp(logits[0] - logits[1]))
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as segmenter:
        theirs = segmenter.process(selfie).segmentation_mask
    print(f"selfie: mask max |ours - MediaPipe| {np.abs(ours - theirs).max():.2e}, "
          f"mean {np.abs(ours - theirs).mean():.2e}; person pixels {int((ours > 0.5).sum())} vs "
          f"{int((theirs > 0.5).sum())}")


if __name__ == "__main__":
    if sys.argv[1] == "--check":
        check(Path(sys.argv[2]))
    else:
        make(Path(sys.argv[1]), Path(sys.argv[2]))
