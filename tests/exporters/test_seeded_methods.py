"""Methods with further passes explain seeded targets (`ExplainContext.target_scores` /
`target_gradients`): Ablation-CAM scores the target's L on the ablated activations; SmoothGrad,
Smooth Grad-CAM++ and Integrated Gradients differentiate L at each noisy / interpolated input, its
seed made from that input's own score (a segmentation region stays the clean input's).

Oracles, on the same model and input: pytorch-grad-cam 1.5.7's AblationCAM with
`SemanticSegmentationTarget` (torchvision LR-ASPP MobileNetV3) and `SimilarityToConceptTarget`
(resnet18 without fc); Captum's NoiseTunnel(Saliency) and IntegratedGradients of a forward function
returning L, fed camrt's noise; Smooth Grad-CAM++'s formula on torch autograd of L at the layer for
the same noisy inputs. Heatmaps compared as max abs of min-max normalised maps.
"""

from __future__ import annotations

import numpy as np
import pytest

from .test_seeded_targets import (
    DET_SIZE,
    SEG_LAYER,
    SimilarityToConceptTarget,
    TinyYolo,
    _box_targets,
    _export,
    _minmax,
    _SegOut,
    _TinyEmbedder,
    _TinySegmenter,
    _torch_box_score,
)

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("captum")

TINY_SIZE = (32, 32)


def _finalized(attribution: np.ndarray, size) -> np.ndarray:
    """An input-space attribution [C, H, W] as camrt displays it: max over channels of |a|, min-max."""
    from camrt.postprocess import finalize

    return finalize([np.abs(attribution).max(axis=0)], size, apply_relu=False)


# --- Ablation-CAM: L scored on the ablated activations -----------------------------------------
def _with_batch_statistics(model, size):
    """`model` in eval mode with its BatchNorm statistics measured on 4 random inputs (train-mode
    cumulative averages). torchvision's LR-ASPP with weights=None keeps the initial statistics
    (mean 0, var 1), under which backbone.16's activations shrink to ~1e-8: ablating one channel
    then moves L by less than float32 resolves, and every Ablation-CAM weight is 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, *size))
    return model.eval()


@pytest.mark.slow  # pytorch-grad-cam runs the whole model once per channel (960, 512)
def test_ablationcam_of_a_seg_target_matches_pytorch_grad_cam(tmp_path_factory):
    """LR-ASPP (64x64, backbone.16, 960 channels, one image): pytorch-grad-cam's AblationCAM with
    SemanticSegmentationTarget (the clean input's argmax region, kept for every ablated copy).
    backbone.16 ends in Hardswish (signed), so pytorch-grad-cam is given the paper's zeroing
    AblationLayer, as for class targets (tests/exporters/test_extra_pass_methods.py)."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    from camrt.explainer import Explainer
    from camrt.seeds.targets import SegmentationTarget

    from .test_extra_pass_methods import zeroing_ablation_layer

    size = (64, 64)
    torch.manual_seed(0)
    model = _with_batch_statistics(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None), size)
    path = _export(tmp_path_factory, model, SEG_LAYER, size, "lraspp-ablation", score_output="out")
    x = np.random.default_rng(1).standard_normal((1, 3, *size)).astype(np.float32)
    with torch.no_grad():
        argmax = _SegOut(model)(torch.from_numpy(x)).argmax(1).numpy()
    category = int(np.bincount(argmax.ravel()).argmax())
    got = Explainer(path, method="ablationcam", layer=SEG_LAYER, batch_size=128).explain(
        x, targets=SegmentationTarget(category))[0]
    with AblationCAM(model=_SegOut(model), target_layers=[model.backbone["16"]], batch_size=128,
                     ablation_layer=zeroing_ablation_layer()) as cam:
        reference = cam(torch.from_numpy(x), targets=[
            SemanticSegmentationTarget(category, (argmax[0] == category).astype(np.float32))])[0]
    diff = float(np.abs(got.heatmap - _minmax(reference)).max())
    print(f"ablationcam seg (lraspp): max diff {diff:.2e}")
    assert np.ptp(reference) > 0.5 and diff <= 1e-4
    assert got.record()["target_kind"] == "seg"


@pytest.mark.slow  # pytorch-grad-cam runs the whole model once per channel (960, 512)
def test_ablationcam_of_a_similarity_target_matches_pytorch_grad_cam(tmp_path_factory):
    """resnet18 without fc (96x96, layer4, 512 channels after a ReLU, one image): pytorch-grad-cam's
    AblationCAM with SimilarityToConceptTarget (the cosine of each ablated copy's embedding)."""
    from pytorch_grad_cam import AblationCAM
    from torchvision.models import resnet18

    from camrt.explainer import Explainer
    from camrt.seeds.targets import SimilarityTarget

    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    size = (96, 96)
    path = _export(tmp_path_factory, model, "layer4", size, "embedder-ablation")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, *size)).astype(np.float32)
    with torch.no_grad():
        concept = model(torch.from_numpy(rng.standard_normal((1, 3, *size)).astype(np.float32)))[0]
    got = Explainer(path, method="ablationcam", layer="layer4", batch_size=64).explain(
        x, targets=SimilarityTarget(concept.numpy()))[0]
    with AblationCAM(model=model, target_layers=[model.layer4], batch_size=64) as cam:
        reference = cam(torch.from_numpy(x), targets=[SimilarityToConceptTarget(concept)])[0]
    diff = float(np.abs(got.heatmap - _minmax(reference)).max())
    print(f"ablationcam similar (resnet18): max diff {diff:.2e}")
    assert np.ptp(reference) > 0.5 and diff <= 1e-4


# --- noisy and interpolated inputs on small models ----------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (torch model, contract file, inputs [2, 3, 32, 32], camrt target, L as a torch
    function of (score rows, sample)): a seg target (the clean argmax region of the most frequent
    class, fixed) and a similarity target."""
    from camrt.seeds.targets import SegmentationTarget, SimilarityTarget

    torch.manual_seed(3)
    x = np.random.default_rng(8).standard_normal((2, 3, *TINY_SIZE)).astype(np.float32)
    segmenter, embedder = _TinySegmenter().eval(), _TinyEmbedder().eval()
    with torch.no_grad():
        argmax = segmenter(torch.from_numpy(x)).argmax(1)
    category = int(np.bincount(argmax.numpy().ravel()).argmax())
    regions = (argmax == category).float()
    concept = torch.tensor([0.3, -1.0, 0.5])
    return {
        "seg": (segmenter, _export(tmp_path_factory, segmenter, "feat", TINY_SIZE, "tinyseg-methods"), x,
                SegmentationTarget(category),
                lambda out, b: (out[:, category] * regions[b].to(out.dtype)).sum(dim=(1, 2))),
        "similar": (embedder, _export(tmp_path_factory, embedder, "feat", TINY_SIZE, "tinyemb-methods"), x,
                    SimilarityTarget(concept.numpy()),
                    lambda out, b: torch.nn.functional.cosine_similarity(out, concept[None].to(out.dtype), dim=1)),
    }


@pytest.mark.parametrize("kind", ["seg", "similar"])
def test_smoothgrad_of_a_seeded_target_matches_captum(tiny, kind, monkeypatch):
    """Captum NoiseTunnel(Saliency) of a forward function returning L, fed camrt's noise
    (default_rng(seed), sample by sample, copy by copy, times sigma)."""
    from captum.attr import NoiseTunnel, Saliency

    from camrt.explainer import Explainer
    from camrt.methods.smoothgrad import noise_sigma

    model, path, x, target, loss = tiny[kind]
    n, spread, seed = 5, 0.2, 4
    ours = Explainer(path, method="smoothgrad", n_samples=n, stdev_spread=spread, seed=seed, batch_size=2).explain(
        x, targets=target)
    rng = np.random.default_rng(seed)
    sigma = noise_sigma(x, spread)
    noise = [rng.standard_normal((n, *x.shape[1:]), dtype=np.float32) * sigma[b] for b in range(len(x))]
    for b in range(len(x)):
        monkeypatch.setattr(torch, "normal", lambda *args, **kwargs: torch.from_numpy(noise[b]))
        reference = NoiseTunnel(Saliency(lambda inp: loss(model(inp), b))).attribute(
            torch.from_numpy(x[b:b + 1]), nt_type="smoothgrad", nt_samples=n, stdevs=float(sigma[b]),
            abs=False).detach().numpy()[0]
        monkeypatch.undo()
        diff = float(np.abs(ours[b].heatmap - _finalized(reference, TINY_SIZE)).max())
        print(f"smoothgrad {kind} image {b}: max diff {diff:.2e}")
        assert diff <= 1e-4


@pytest.mark.parametrize("kind", ["seg", "similar"])
def test_integrated_gradients_of_a_seeded_target_matches_captum(tiny, kind):
    """Captum IntegratedGradients of a forward function returning L (same steps, quadrature,
    baseline 0); the completeness record's score difference is L(x) - L(0) in torch."""
    from captum.attr import IntegratedGradients

    from camrt.explainer import Explainer

    model, path, x, target, loss = tiny[kind]
    steps = 12
    ours = Explainer(path, method="integrated-gradients", steps=steps, batch_size=5).explain(x, targets=target)
    for b in range(len(x)):
        forward = lambda inp, b=b: loss(model(inp), b)  # noqa: E731
        reference = IntegratedGradients(forward).attribute(
            torch.from_numpy(x[b:b + 1]), baselines=torch.zeros(1, *x.shape[1:]), n_steps=steps,
            method="gausslegendre").detach().numpy()[0]
        diff = float(np.abs(ours[b].heatmap - _finalized(reference, TINY_SIZE)).max())
        print(f"integrated gradients {kind} image {b}: max diff {diff:.2e}")
        assert diff <= 1e-4
        with torch.no_grad():
            difference = float(forward(torch.from_numpy(x[b:b + 1]))[0] - forward(torch.zeros(1, *x.shape[1:]))[0])
        completeness = ours[b].extra["completeness"]
        record = ours[b].record()
        assert record["completeness"] == completeness and record["target_kind"] == kind
        assert completeness["score_difference"] == pytest.approx(difference, rel=1e-4, abs=1e-6)
        assert completeness["attribution_sum"] == pytest.approx(float(reference.sum()), rel=1e-3, abs=1e-5)


def _layer_gradients(model, module, inputs, loss):
    """(activations, d L / d activations) of `module` in float64 torch, one row per input."""
    import copy

    double = copy.deepcopy(model).double()
    captured = {}
    handle = dict(double.named_modules())[module].register_forward_hook(lambda m, a, out: captured.__setitem__("a", out))
    try:
        score = loss(double(torch.from_numpy(inputs).double()))
        grad, = torch.autograd.grad(score.sum(), [captured["a"]])
    finally:
        handle.remove()
    return captured["a"].detach().numpy(), grad.numpy()


@pytest.mark.parametrize("kind", ["seg", "similar"])
def test_smooth_gradcampp_of_a_seeded_target_matches_its_formula(tiny, kind):
    """Smooth Grad-CAM++ (Omeiza et al. 2019, the paper's form camrt documents): Grad-CAM++ weights
    from the moments of dL/dA over the same noisy inputs, in float64 torch, on the clean activations."""
    from camrt.explainer import Explainer
    from camrt.postprocess import finalize

    model, path, x, target, loss = tiny[kind]
    n, std, seed = 4, 0.3, 6
    ours = Explainer(path, method="smooth-gradcam++", layer="feat", n_samples=n, std=std, seed=seed,
                     batch_size=3).explain(x, targets=target)
    rng = np.random.default_rng(seed)
    for b in range(len(x)):
        noisy = x[b][None] + rng.standard_normal((n, *x.shape[1:]), dtype=np.float32) * np.float32(std)
        _, grads = _layer_gradients(model, "feat", noisy, lambda out: loss(out, b))
        clean, _ = _layer_gradients(model, "feat", x[b:b + 1], lambda out: loss(out, b))
        d1, d2, d3 = (np.mean(grads ** p, axis=0) for p in (1, 2, 3))
        sums = clean[0].sum(axis=(1, 2), keepdims=True)
        alpha = np.where(d2 != 0, d2 / (2 * d2 + sums * d3 + 1e-6), 0)
        weights = (alpha * np.maximum(d1, 0)).sum(axis=(1, 2))
        reference = finalize([np.einsum("k,khw->hw", weights, clean[0])], TINY_SIZE)
        diff = float(np.abs(ours[b].heatmap - reference).max())
        print(f"smooth-gradcam++ {kind} image {b}: max diff {diff:.2e}")
        assert np.ptp(np.einsum("k,khw->hw", weights, clean[0])) > 0 and diff <= 1e-4


# --- a box target: matched again on every pass -------------------------------------------------
@pytest.fixture(scope="module")
def yolo_box(tmp_path_factory):
    """(YOLO-style model, its seeded file, one input, the box (x1, y1, x2, y2) and label of its best candidate)."""
    torch.manual_seed(0)
    model = TinyYolo().eval()
    path = _export(tmp_path_factory, model, "stem", DET_SIZE, "tinyyolo-methods")
    x = np.random.default_rng(4).standard_normal((1, 3, *DET_SIZE)).astype(np.float32)
    with torch.no_grad():
        chosen = _box_targets(model(torch.from_numpy(x)).numpy())[0]
    return model, path, x, chosen


def _torch_box_scores(model, chosen, threshold):
    """L of each row of a batch: the box-matched score of its own candidates (torchvision's box_iou)."""
    from camrt.seeds.boxes import BoxTarget

    def box_score(inp):
        head = model(inp)
        return torch.stack([_torch_box_score(head, BoxTarget(i, chosen.box, chosen.label), threshold)
                            for i in range(len(inp))])
    return box_score


def test_integrated_gradients_of_a_box_target_matches_captum(yolo_box):
    """L = the box-matched score (IoU threshold 0.9) of each path point's own candidates; at the
    black baseline none matches (L = 0: a zero seed row, no gradient there). Captum
    IntegratedGradients (riemann_left: the baseline is a path point) of the same L."""
    from captum.attr import IntegratedGradients as CaptumIG

    from camrt.explainer import Explainer
    from camrt.methods.integrated_gradients import IntegratedGradients, quadrature
    from camrt.seeds.targets import BoxScoreTarget

    model, path, x, chosen = yolo_box
    steps, threshold = 16, 0.9
    got = Explainer(path, method=IntegratedGradients(steps=steps, method="riemann_left", batch_size=8)).explain(
        x, targets=BoxScoreTarget(chosen.box, chosen.label, iou_threshold=threshold))[0]
    box_score = _torch_box_scores(model, chosen, threshold)
    with torch.no_grad():
        alphas = torch.from_numpy(quadrature("riemann_left", steps)[0]).float()
        unmatched = int((box_score(torch.from_numpy(x) * alphas[:, None, None, None]) == 0).sum())
    reference = CaptumIG(box_score).attribute(torch.from_numpy(x), baselines=0.0, n_steps=steps,
                                              method="riemann_left").detach().numpy()[0]
    diff = float(np.abs(got.heatmap - _finalized(reference, DET_SIZE)).max())
    print(f"integrated gradients box: max diff {diff:.2e} ({unmatched} of {steps} path points match no candidate)")
    assert unmatched > 0 and diff <= 1e-4


def test_smoothgrad_of_a_box_target_matches_captum(yolo_box, monkeypatch):
    """Each noisy copy's candidates matched again (IoU threshold 0.5); Captum NoiseTunnel(Saliency)
    of the same L fed camrt's noise."""
    from captum.attr import NoiseTunnel, Saliency

    from camrt.explainer import Explainer
    from camrt.methods.smoothgrad import noise_sigma
    from camrt.seeds.targets import BoxScoreTarget

    model, path, x, chosen = yolo_box
    n, spread, seed = 6, 0.3, 2
    got = Explainer(path, method="smoothgrad", n_samples=n, stdev_spread=spread, seed=seed, batch_size=4).explain(
        x, targets=BoxScoreTarget(chosen.box, chosen.label))[0]
    sigma = noise_sigma(x, spread)
    noise = np.random.default_rng(seed).standard_normal((n, *x.shape[1:]), dtype=np.float32) * sigma[0]
    monkeypatch.setattr(torch, "normal", lambda *args, **kwargs: torch.from_numpy(noise))
    reference = NoiseTunnel(Saliency(_torch_box_scores(model, chosen, 0.5))).attribute(
        torch.from_numpy(x), nt_type="smoothgrad", nt_samples=n, stdevs=float(sigma[0]), abs=False).detach().numpy()[0]
    monkeypatch.undo()
    diff = float(np.abs(got.heatmap - _finalized(reference, DET_SIZE)).max())
    print(f"smoothgrad box: max diff {diff:.2e}")
    assert diff <= 1e-4


def test_guided_gradcam_of_a_seg_target_matches_captum(tmp_path_factory):
    """Guided Grad-CAM reads one seeded pass (guided backprop's input gradient and the layer's
    gradient of L): Captum's GuidedGradCam (bilinear) of a module returning L (the clean argmax
    region of the most frequent class, fixed), one image at a time."""
    from captum.attr import GuidedGradCam

    from camrt import contract
    from camrt.explainer import Explainer
    from camrt.seeds.targets import SegmentationTarget
    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(3)
    model = _TinySegmenter().eval()
    onnx_model, _ = export_torch(model, layers=["feat"], input_size=TINY_SIZE, seed=True,
                                 rules=[contract.RULE_VANILLA, contract.RULE_GUIDED])
    path = tmp_path_factory.mktemp("tinyseg-guided") / "tinyseg.camrt.onnx"
    write_model(onnx_model, path)
    x = np.random.default_rng(8).standard_normal((2, 3, *TINY_SIZE)).astype(np.float32)
    with torch.no_grad():
        argmax = model(torch.from_numpy(x)).argmax(1)
    category = int(np.bincount(argmax.numpy().ravel()).argmax())
    ours = Explainer(str(path), method="guided-gradcam", layer="feat").explain(x, targets=SegmentationTarget(category))

    class RegionScore(torch.nn.Module):
        def __init__(self, region):
            super().__init__()
            self.model, self.region = model, region

        def forward(self, inp):
            return (self.model(inp)[:, category] * self.region).sum(dim=(1, 2))[:, None]

    for b in range(len(x)):
        wrapped = RegionScore((argmax[b] == category).float())
        reference = GuidedGradCam(wrapped, wrapped.model.feat).attribute(
            torch.from_numpy(x[b:b + 1]), target=0, interpolate_mode="bilinear").detach().numpy()[0]
        diff = float(np.abs(ours[b].heatmap - _finalized(reference, TINY_SIZE)).max())
        print(f"guided-gradcam seg image {b}: max diff {diff:.2e}")
        assert np.ptp(np.abs(reference).max(axis=0)) > 0 and diff <= 1e-4
