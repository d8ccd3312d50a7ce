"""Box targets on torchvision detectors' raw heads (SSDlite, RetinaNet; tests/exporters/detector_heads.py,
the recipe of docs/targets.md) and the box options (--box-iou, --box-format, --box-layout).

Oracles: torch float64 autograd of the box-matched score through torchvision's differentiable
`box_iou` (the seed: rtol 1e-9; Grad-CAM's map: Grad-CAM's formula on the autograd gradient at the
layer, max abs of the finalised maps <= 1e-4).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from camrt import contract
from camrt.seeds.boxes import BoxTarget, box_seed

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

SSD_SIZE = (160, 160)
SSD_LAYER = "backbone.features.0"
RETINA_SIZE = (128, 128)
RETINA_LAYER = "backbone.body.layer3"
IOU = 0.3


def torch_box_score_xyxy_first(head, target: BoxTarget, threshold: float):
    """The box-matched score of a candidates-first xyxy head [B, N, 4 + C] in torch: the sum over
    candidates with IoU > threshold and argmax label == label of IoU x class score."""
    from torchvision.ops import box_iou

    rows = head[target.sample]
    labels = rows[:, 4:].argmax(1)
    iou = box_iou(torch.tensor([target.box], dtype=head.dtype), rows[:, :4])[0]
    matched = (iou > threshold) & (labels == target.label)
    return (iou[matched] * rows[matched, 4 + target.label]).sum()


def best_box(head: np.ndarray, sample: int = 0) -> BoxTarget:
    """Of the 20 best-scoring candidates, the box (xyxy rows first; nudged off its edges) and label
    that most candidates match (IoU > IOU, that argmax label): random weights scatter the labels."""
    from torchvision.ops import box_iou

    rows = head[sample]
    labels = rows[:, 4:].argmax(1)
    best = (-1, None)
    for k in np.argsort(-rows[:, 4:].max(1), kind="stable")[:20]:
        x1, y1, x2, y2 = (float(v) for v in rows[k, :4])
        box = (x1 + 0.5, y1 - 0.3, x2 + 0.2, y2 + 0.1)
        iou = box_iou(torch.tensor([box], dtype=torch.float64), torch.from_numpy(rows[:, :4]).double())[0].numpy()
        label = int(np.bincount(labels[iou > IOU]).argmax())
        count = int(((iou > IOU) & (labels == label)).sum())
        if count > best[0]:
            best = (count, BoxTarget(sample, box, label))
    return best[1]


def _layer_autograd(model, module_name, x, loss, dtype=torch.float64):
    """Activation and d loss / d activation of a module's output, in torch `dtype` (float64: on a copy
    of the model; float32: the model as it is)."""
    if dtype == torch.float64:
        model, x = copy.deepcopy(model).double(), x.double()
    captured = {}
    handle = dict(model.named_modules())[module_name].register_forward_hook(
        lambda m, a, out: captured.__setitem__("act", out))
    try:
        grad, = torch.autograd.grad(loss(model(x)), [captured["act"]])
    finally:
        handle.remove()
    return captured["act"].detach().numpy(), grad.numpy()


def gradcam_reference(model, layer, x, target, size):
    from camrt.postprocess import finalize

    act, grad = _layer_autograd(model, layer, torch.from_numpy(x),
                                lambda out: torch_box_score_xyxy_first(out, target, IOU))
    return finalize([(grad.mean(axis=(2, 3))[0][:, None, None] * act[0]).sum(0)], size)


def _export(tmp_path_factory, model, layer, size, name, mean_std=None):
    from camrt_exporters.export import export_torch, write_model

    preprocessing = None if mean_std is None else contract.Preprocessing(*size, mean=mean_std[0], std=mean_std[1])
    onnx_model, _ = export_torch(model, layers=[layer], input_size=size, rules=[contract.RULE_VANILLA], seed=True,
                                 preprocessing=preprocessing)
    path = tmp_path_factory.mktemp(name) / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    return str(path)


@pytest.fixture(scope="module")
def ssdlite(tmp_path_factory):
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from .detector_heads import RawDetectionHead, calibrated

    torch.manual_seed(0)
    model = calibrated(RawDetectionHead(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None), SSD_SIZE),
                       SSD_SIZE)
    return model, _export(tmp_path_factory, model, SSD_LAYER, SSD_SIZE, "ssdlite", ((0.5,) * 3, (0.5,) * 3))


def test_candidates_first_xyxy_seed_is_autograd_of_the_box_score():
    """box_seed on SSDlite's decoded head [B, N, 4 + C] (xyxy, softmax scores), IoU threshold 0.3,
    equals torch float64 autograd of the same score through box_iou, for 2 images."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from .detector_heads import RawDetectionHead, calibrated

    torch.manual_seed(1)
    model = RawDetectionHead(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None), SSD_SIZE)
    model = calibrated(model, SSD_SIZE).double()
    with torch.no_grad():
        head = model(torch.randn(2, 3, *SSD_SIZE, dtype=torch.float64)).numpy()
    targets = [best_box(head, b) for b in range(2)]
    seeds = box_seed(head, targets, IOU, "xyxy", layout="candidates-first")
    for row, target in enumerate(targets):
        raw = torch.from_numpy(head).requires_grad_(True)
        grad, = torch.autograd.grad(torch_box_score_xyxy_first(raw, target, IOU), [raw])
        matched = int((grad[target.sample, :, 4:] != 0).sum())
        print(f"ssdlite seed image {row}: {matched} candidates matched")
        assert matched >= 2
        np.testing.assert_allclose(seeds.values[row], grad[target.sample].numpy(), rtol=1e-9, atol=1e-12)


def test_cli_box_options_on_ssdlite_match_autograd(ssdlite, tmp_path):
    """`camrt explain ... --target box:...:L --box-iou 0.3 --box-format xyxy --box-layout
    candidates-first`: Grad-CAM at backbone.features.0 equals Grad-CAM's formula on torch float64
    autograd of the box score; the record carries the options and L."""
    from camrt.execution.session import ExplainSession
    from camrt.imaging.preprocess import preprocess
    from tests.helpers import random_image, write_image

    from .test_seeded_targets import _cli

    model, path = ssdlite
    image = random_image(np.random.default_rng(3), *SSD_SIZE)
    write_image(str(tmp_path / "img.png"), image)
    x = preprocess([image], ExplainSession(path).info.preprocessing)
    with torch.no_grad():
        head = model(torch.from_numpy(x)).numpy()
    target = best_box(head)
    text = "box:" + ",".join(f"{v:.6f}" for v in target.box) + f":{target.label}"
    result = _cli("explain", path, str(tmp_path / "img.png"), "--target", text, "--box-iou", str(IOU),
                  "--box-format", "xyxy", "--box-layout", "candidates-first", "--layer", SSD_LAYER,
                  "--format", "npy", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    box = tuple(record["target_params"]["box"])
    assert record["target_params"] == {"box": list(box), "label": target.label, "iou_threshold": IOU,
                                       "box_format": "xyxy", "layout": "candidates-first"}
    one = BoxTarget(0, box, target.label)
    reference = gradcam_reference(model, SSD_LAYER, x, one, SSD_SIZE)
    diff = float(np.abs(np.load(record["heatmap"]) - reference).max())
    print(f"ssdlite cli box gradcam: max diff {diff:.2e}")
    assert np.ptp(reference) > 0.5 and diff <= 1e-4
    with torch.no_grad():
        score = float(torch_box_score_xyxy_first(torch.from_numpy(head).double(), one, IOU))
    assert record["score"] == pytest.approx(score, rel=1e-4) and score > 0


def test_box_option_errors(ssdlite, tmp_path):
    """Bad values and misplaced options: each a one-line error naming the flag."""
    from camrt.errors import InputError, UsageError
    from camrt.explainer import Explainer
    from camrt.seeds.targets import BoxScoreTarget
    from camrt.target_parsing import parse_target

    from .test_seeded_targets import _cli

    with pytest.raises(UsageError, match=r"--box-iou 1.5: the box IoU threshold must be in \[0, 1\)"):
        parse_target("box:1,2,30,40", box_iou=1.5)
    with pytest.raises(UsageError, match=r"--box-iou 'x': could not convert"):
        parse_target("box:1,2,30,40", box_iou="x")
    with pytest.raises(UsageError, match=r"--box-format 'xywh': box format 'xywh': choose one of cxcywh, xyxy"):
        parse_target("box:1,2,30,40", box_format="xywh")
    with pytest.raises(UsageError, match=r"--box-layout 'nc': box head layout 'nc': choose one of candidates-last"):
        parse_target("box:1,2,30,40", box_layout="nc")
    with pytest.raises(UsageError, match=r"--box-iou applies to --target box:\.\.\., not to '3'"):
        parse_target("3", box_iou=0.3)
    with pytest.raises(UsageError, match=r"--box-format does not apply to --target seg:\.\.\."):
        parse_target("seg:1", box_format="xyxy")
    result = _cli("explain", "model.onnx", "img.png", "--target", "box:1,2,30,40", "--box-format", "xywh")
    assert result.exit_code == 2 and "'xywh' is not one of 'cxcywh', 'xyxy'" in result.output
    model, path = ssdlite
    x = np.random.default_rng(0).standard_normal((1, 3, *SSD_SIZE)).astype(np.float32)
    # the SSDlite head [B, N, 4 + C] read in the default layout [B, 4 + C, N]: negative extents are refused
    with pytest.raises(InputError, match=r"candidate boxes have x2 < x1 or y2 < y1 when the head is read as cxcywh"):
        Explainer(path, layer=SSD_LAYER).explain(x, targets=BoxScoreTarget((10, 10, 60, 60), 1))


@pytest.mark.slow
def test_retinanet_box_gradcam_matches_autograd(tmp_path_factory):
    """RetinaNet ResNet-50 FPN (sigmoid scores, 128x128), a box target at backbone.body.layer3: the
    same candidates match as in torch; the gradient torch float32 itself gets is 6e-2 (max-relative)
    from torch float64 there (random weights: ReLU switches flip), so camrt's gradient and its
    Grad-CAM map through the Explainer are held to the design's criterion: no further from torch
    float64 than twice torch float32 is."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from camrt.execution.session import ExplainSession
    from camrt.explainer import Explainer
    from camrt.postprocess import finalize
    from camrt.seeds.targets import BoxScoreTarget

    from .detector_heads import RawDetectionHead, calibrated

    torch.manual_seed(0)
    model = calibrated(RawDetectionHead(retinanet_resnet50_fpn(weights=None, weights_backbone=None), RETINA_SIZE),
                       RETINA_SIZE)
    path = _export(tmp_path_factory, model, RETINA_LAYER, RETINA_SIZE, "retinanet")
    x = np.random.default_rng(5).standard_normal((1, 3, *RETINA_SIZE)).astype(np.float32)
    with torch.no_grad():
        head = model(torch.from_numpy(x)).numpy()
    target = best_box(head)
    request = BoxScoreTarget(target.box, target.label, IOU, "xyxy", "candidates-first")
    grad_name = contract.gradient_output(RETINA_LAYER)
    made = {}

    def make_seed(forward):
        made["seeds"], _ = request.seeds(forward)
        return made["seeds"]

    got = ExplainSession(path).run_seeded(x, make_seed, [grad_name])[grad_name]
    matched = sorted(set(np.nonzero(made["seeds"].values[0][:, 4:])[0].tolist()))
    loss = lambda out: torch_box_score_xyxy_first(out, target, IOU)  # noqa: E731
    act64, grad64 = _layer_autograd(model, RETINA_LAYER, torch.from_numpy(x), loss)
    _, grad32 = _layer_autograd(model, RETINA_LAYER, torch.from_numpy(x), loss, dtype=torch.float32)
    raw = torch.from_numpy(head).double().requires_grad_(True)
    reference_matched = torch.autograd.grad(loss(raw), [raw])[0][0, :, 4:].nonzero()[:, 0].unique().tolist()
    assert matched == reference_matched and len(matched) >= 2
    scale = np.abs(grad64).max()
    ours, torch32 = np.abs(got - grad64).max() / scale, np.abs(grad32 - grad64).max() / scale
    print(f"retinanet layer3 gradient vs float64: camrt {ours:.1e}, torch float32 {torch32:.1e}")
    assert ours <= 2 * torch32 + 1e-4

    def gradcam(grad):
        return finalize([(grad.mean(axis=(2, 3))[0][:, None, None] * act64[0]).sum(0)], RETINA_SIZE)

    heatmap = Explainer(path, method="gradcam", layer=RETINA_LAYER).explain(x, targets=request)[0].heatmap
    map_ours = float(np.abs(heatmap - gradcam(grad64)).max())
    map_torch32 = float(np.abs(gradcam(grad32) - gradcam(grad64)).max())
    print(f"retinanet box gradcam vs float64: camrt {map_ours:.1e}, torch float32 {map_torch32:.1e}")
    assert np.ptp(gradcam(grad64)) > 0.5 and map_ours <= 2 * map_torch32 + 1e-4
