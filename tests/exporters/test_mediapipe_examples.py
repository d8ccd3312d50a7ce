"""MediaPipe's pretrained face detector and selfie segmenter, as tf2onnx converts their TFLite files
(examples/mediapipe, made by scripts/make-mediapipe-examples.py): real converter output with its batch
fixed at 1 in every Reshape and a channels-last input, explained through seeds on real photos.

Oracles: the converted file itself, run by onnxruntime one image at a time (what the batch-copying
rewrite must reproduce for every sample of a batch), the box score restated in numpy from its
definition, the export's finite-difference validation, and the photos: the face detector's box map
must light up the face MediaPipe itself detects, the segmenter's person map the person."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from skimage import data as skimage_data

from camrt import Explainer, UsageError
from camrt.contract import Preprocessing
from camrt.target_parsing import parse_target, parse_targets
from camrt_exporters.export import export_onnx, write_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mediapipe"
FACE_INPUT = 128
# MediaPipe's own detection on skimage's astronaut (scripts/make-mediapipe-examples.py --check: cx 56.34,
# cy 31.91, w = h = 23.16 in the 128-pixel input), as corners.
FACE_BOX = (45, 20, 68, 44)
FACE_LAYER = "activation_11"  # the last stride-8 feature map: it feeds the 16 x 16 anchors that hold the face
SELFIE_LAYER = "add_7__xeno_compat__1"  # the decoder's 32 x 32 stage


def photos() -> list[np.ndarray]:
    return [skimage_data.astronaut(), skimage_data.chelsea()]


def export_example(tmp_path_factory, name: str, size: int, layer: str, mean: float, std: float) -> tuple[Path, list]:
    model, checks = export_onnx(EXAMPLES / f"{name}.onnx", layers=[layer], rules=["vanilla"], seed=True,
                                preprocessing=Preprocessing(size, size, mean=(mean,) * 3, std=(std,) * 3))
    path = tmp_path_factory.mktemp(name) / f"{name}.camrt.onnx"
    write_model(model, path)
    return path, checks


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    return export_example(tmp_path_factory, "face_detection", FACE_INPUT, FACE_LAYER, 0.5, 0.5)  # input in [-1, 1]


@pytest.fixture(scope="module")
def selfie(tmp_path_factory):
    return export_example(tmp_path_factory, "selfie_segmentation", 256, SELFIE_LAYER, 0.0, 1.0)  # input in [0, 1]


def converted_outputs(name: str, image: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """The converted file as written (batch 1), run by onnxruntime on one image resized as camrt does."""
    session = ort.InferenceSession(str(EXAMPLES / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return session.run(None, {session.get_inputs()[0].name: ((resized / 255 - mean) / std)[None]})[0][0]


def box_score(detections: np.ndarray, box, iou_threshold: float = 0.5) -> float:
    """docs/targets.md's box score from its definition: the sum over candidates (cx, cy, w, h, score)
    whose IoU with the box exceeds the threshold of IoU x score."""
    corners = np.concatenate([detections[:, :2] - detections[:, 2:4] / 2, detections[:, :2] + detections[:, 2:4] / 2], 1)
    x1, y1, x2, y2 = box
    inter = (np.clip(np.minimum(corners[:, 2], x2) - np.maximum(corners[:, 0], x1), 0, None)
             * np.clip(np.minimum(corners[:, 3], y2) - np.maximum(corners[:, 1], y1), 0, None))
    iou = inter / ((x2 - x1) * (y2 - y1) + detections[:, 2] * detections[:, 3] - inter)
    return float((iou * detections[:, 4])[iou > iou_threshold].sum())


def test_the_converted_files_pass_the_exports_finite_difference_check(face, selfie):
    """The self-check's other half (its mutation tests are in test_selfcheck.py): right gradients of real
    converter files pass. Every seeded check is resolved and within tolerance."""
    for _, checks in (face, selfie):
        seeded = [check for check in checks if "seed" in check.name]
        assert seeded and all(check.ok and check.resolved for check in seeded), seeded


def test_face_batch_equals_the_converted_file_per_image(face):
    """The Reshapes that hard-coded batch 1 now copy the batch: a batch of two photos gives each the
    box score the converted file gives it alone (float32, relative 1e-5) and the heatmap it gets alone."""
    images, target = photos(), parse_target(f"box:{','.join(map(str, FACE_BOX))}:0", box_layout="candidates-first")
    explainer = Explainer(face[0], method="gradcam")
    together = [ranks[0] for ranks in explainer.explain_request(images, target)]
    for image, explained in zip(images, together):
        expected = box_score(converted_outputs("face_detection", image, FACE_INPUT, 0.5, 0.5), FACE_BOX)
        assert explained.score == pytest.approx(expected, rel=1e-5)
        [[alone]] = explainer.explain_request([image], target)
        np.testing.assert_allclose(explained.heatmap, alone.heatmap, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [(0, 0, 0, 0), (0, -1, 0, 0), (-1, -1, 1, 1), (1, 1, -1, -1)])
def test_face_box_map_lights_up_the_detected_face(face, shift):
    """On the astronaut, HiResCAM of the box (and of boxes a pixel off) peaks inside MediaPipe's face box
    and is far brighter there. Grad-CAM is not asserted: its channel means of d(IoU x score) flip sign
    between boxes a pixel apart (docs/onnx-sources.md)."""
    box = tuple(v + d for v, d in zip(FACE_BOX, shift))
    [[explained]] = Explainer(face[0], method="hirescam").explain_request(
        photos()[:1], parse_target(f"box:{','.join(map(str, box))}:0", box_layout="candidates-first"))
    heatmap = explained.heatmap
    scale = heatmap.shape[0] / FACE_INPUT
    x1, y1, x2, y2 = (round(v * scale) for v in box)
    inside = np.zeros(heatmap.shape, bool)
    inside[y1:y2, x1:x2] = True
    assert inside[np.unravel_index(heatmap.argmax(), heatmap.shape)]
    assert heatmap[inside].mean() > 20 * heatmap[~inside].mean()


def test_selfie_person_map_covers_the_person(selfie):
    """seg:1 (the person logit over the pixels the model calls person): the map's mean over those pixels
    is well above its mean over the background, and the score is the converted file's L."""
    image = photos()[0]
    [[explained]] = Explainer(selfie[0], method="gradcam").explain_request([image], parse_target("seg:1"))
    logits = converted_outputs("selfie_segmentation", image, 256, 0.0, 1.0)
    person = logits[1] > logits[0]
    assert explained.score == pytest.approx(float(logits[1][person].sum()), rel=1e-5)
    mask = cv2.resize(person.astype(np.uint8), explained.heatmap.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert explained.heatmap[mask].mean() > 3 * explained.heatmap[~mask].mean()


@pytest.mark.parametrize("request_text", ["top1", "1", "0,1", "topk:2", "above:0.5"])
def test_class_targets_of_the_segmentation_map_are_refused(selfie, request_text):
    """A class target of a [B, 2, 256, 256] score has no meaning: a usage error naming the seeded targets,
    not a traceback (top-1, topk) or a map of the class summed over every pixel (a class list)."""
    explainer = Explainer(selfie[0], method="gradcam")
    with pytest.raises(UsageError, match=r"its score 'segmentation' is \[batch, 2, 256, 256\], not class scores.*"
                                         r"--target seg:C"):
        explainer.explain_request(photos()[:1], parse_targets([request_text]))
    if request_text == "1":
        with pytest.raises(UsageError, match="not class scores"):
            explainer.explain(photos()[:1], targets=1)
