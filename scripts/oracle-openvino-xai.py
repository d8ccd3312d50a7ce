"""ViT-ReciproCAM against the authors' OpenVINO XAI 1.1, on one ONNX file of timm's vit_tiny.

openvino-xai pins its own numpy and openvino, so it lives in a scratch environment, not camrt's:

    python3 -m venv /tmp/oxai && /tmp/oxai/bin/pip install openvino-xai==1.1.0 onnx
    PYTHONPATH=.:exporters .venv/bin/python scripts/oracle-openvino-xai.py /tmp/oxai/bin/python

The camrt side (this interpreter: torch, timm, the exporters) writes a plain ONNX file of
vit_tiny_patch16_224 (img_size 112, a 7x7 token grid, random weights, seed 0, dynamic batch, as
OpenVINO XAI requires), exports it with `camrt export`'s default layer and explains chelsea and
coffee; the OpenVINO side (the given interpreter, `--openvino`) reads the same ONNX file and runs
`ViTReciproCAM(model, embed_scaling=False)` compiled with INFERENCE_PRECISION_HINT f32 (the CPU
plugin's default precision may be bf16). Prints the max difference of the raw maps relative to the
largest magnitude of OpenVINO XAI's, for several targets.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

SIZE = 112


def openvino_maps(folder: Path) -> None:
    """(scratch environment) OpenVINO XAI's maps [B, classes, 7, 7] of folder/x.npy."""
    import numpy as np
    import openvino as ov
    from openvino_xai.methods.white_box.recipro_cam import ViTReciproCAM

    x = np.load(folder / "x.npy")
    method = ViTReciproCAM(ov.Core().read_model(str(folder / "vit.onnx")), embed_scaling=False, prepare_model=False)
    method.prepare_model(load_model=False)
    method._model_compiled = ov.Core().compile_model(method._model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.save(folder / "openvino.npy", np.stack([np.asarray(method.generate_saliency_map(x[i:i + 1]))[0]
                                               for i in range(len(x))]))


def compare(python: str, folder: Path) -> None:
    import warnings

    import numpy as np
    import timm
    import torch

    from camrt_exporters.export import export_onnx, write_model
    from tests.exporters.test_vit_reciprocam import _photo_batch, _raw_maps

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(folder / "vit.onnx"), dynamo=False,
                          input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    x = _photo_batch()
    np.save(folder / "x.npy", x)
    subprocess.run([python, __file__, "--openvino", str(folder)], check=True)
    reference = np.load(folder / "openvino.npy")
    exported, _ = export_onnx(folder / "vit.onnx", rules=[])
    write_model(exported, folder / "vit.camrt.onnx")
    for targets in ([281, 7], [0, 999]):
        ours, layer = _raw_maps(str(folder / "vit.camrt.onnx"), x, targets)
        theirs = np.stack([reference[b, t] for b, t in enumerate(targets)])
        error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        print(f"layer {layer}, targets {targets}: max relative difference {error:.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "--openvino":
        openvino_maps(Path(sys.argv[2]))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            compare(sys.argv[1], Path(scratch))
