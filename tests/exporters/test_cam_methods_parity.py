"""camrt's CAM-family methods equal pytorch-grad-cam 1.5.7's class of the same name.

For each method, on resnet18 (layer4, fixed random weights) and EfficientNet-Lite0 (real weights,
layer _bn1): the same model, layer, NCHW 224x224 input (three of scikit-image's photographs, no
resampling on either side) and explicit targets; both maps min-max normalised; criterion
max|camrt - pytorch-grad-cam| <= 1e-4. Each model is exported once (module-scoped fixture) and each
pytorch-grad-cam class is run once per model. The targets are EfficientNet-Lite0's top-1 classes of
the photographs (Egyptian cat, espresso, and 450 for the astronaut), explicit for both models: a
class with no positive evidence at the layer gives an all-zero map on both sides, which would
compare nothing, so every reference map is checked to be non-degenerate.

CAM (not in pytorch-grad-cam) is compared with torchcam's CAM at the layer that feeds each model's
global average pooling (CAM_LAYERS), with the closed form CAM = Grad-CAM x h*w there, and refused at
a layer without such a head.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from camrt import contract

from .models import load, photos

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("skimage")

#: camrt method name -> pytorch-grad-cam 1.5.7 class name
METHODS = {
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
}
MODELS = [("resnet18", "layer4"), ("regnet_y_400mf", "trunk_output"), ("efficientnet_lite0", "_bn1")]
#: model -> (the layer that feeds its global average pooling: CAM's, a layer CAM is not defined for)
CAM_LAYERS = {"resnet18": ("layer4", "layer3"), "regnet_y_400mf": ("trunk_output", "trunk_output.block3"),
              "efficientnet_lite0": ("_swish@1", "_bn1")}
#: model -> two layers of different resolutions (7x7 and 14x14), for multi-layer fusion
MULTI_LAYERS = {"resnet18": ("layer4", "layer3"), "regnet_y_400mf": ("trunk_output", "trunk_output.block3"),
                "efficientnet_lite0": ("_bn1", "_blocks.10")}
#: model -> (hard bound against the reference, why 1e-4 is out of reach) for MULTI_LAYERS' second layer
SWITCH_CROSSING = {"regnet_y_400mf": (2e-2, (
    "below trunk_output, regnet_y_400mf's gradients (fixed random weights) cross block4's ReLUs, and 3 of "
    "their switches on these photos differ from torch float64's in onnxruntime's forward pass and 3 in "
    "torch float32's (checked, hard: switch_flips). Grad-CAM at trunk_output.block3 is then up to 1.5e-2 "
    "(camrt) and 5.7e-3 (pytorch-grad-cam float32) from pytorch-grad-cam's float64 run (measured), the "
    "issue's switch-crossing case; bound 2e-2 against the reference, hard"))}
TARGETS = [285, 967, 450]
TOLERANCE = 1e-4
#: (model, method) -> (looser bound against pytorch-grad-cam and bound against pytorch-grad-cam run on a
#: float64 copy of the model, both hard; why 1e-4 against pytorch-grad-cam is out of reach)
KNOWN = {
    ("efficientnet_lite0", "xgradcam"): (1e-3, 1e-3, (
        "XGrad-CAM divides each channel by sum_ab A^k_ab; EfficientNet-Lite0's _bn1 is a signed BatchNorm "
        "output (before the ReLU6), where some channel sums cancel to ~1e-3 of sum_ab |A^k_ab|, so "
        "onnxruntime's float32 activations (max relative difference from float64 ~1.5e-6) move those "
        "channels' weights by up to ~1e-3 relative and the map by up to ~3e-4 (pytorch-grad-cam float32 "
        "is itself up to 8.5e-5 from its float64 run; with onnxruntime's graph optimisations at 'extended' "
        "instead of 'all', i.e. without the NCHWc convolution kernels, camrt is 4.3e-5 from it and 9.7e-5 "
        "from pytorch-grad-cam: test_extended_graph_optimization_meets_the_bound). "
        "camrt's formula applied to pytorch-grad-cam's own activations and gradients matches it to <= 1e-5 "
        "(checked, hard; ~1e-6 is float32 summation order), so the residual is ill-conditioning of the "
        "method on this layer, not a formula difference.")),
    **{("regnet_y_400mf", method): (2e-4, TOLERANCE, (
        f"{method} on regnet_y_400mf (fixed random weights) lands at 1.0e-4 at one pixel of one photo: "
        "pytorch-grad-cam's float32 map is itself 6.4e-5 from its float64 run there, camrt's 3.6e-5 "
        "(checked, hard: camrt within 1e-4 of the float64 map); camrt's formula applied to "
        "pytorch-grad-cam's own tensors matches it to <= 1e-5 (checked, hard); with graph_optimization="
        "'extended' camrt is 8.0e-5 from pytorch-grad-cam (test_extended_graph_optimization_meets_the_bound)"))
       for method in ("xgradcam", "hirescam")},
}


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)


@pytest.fixture(scope="module", params=MODELS, ids=[name for name, _ in MODELS])
def exported(request, tmp_path_factory):
    """(name, layer, torch model, path of its contract file, input batch), exported once per model
    (with CAM_LAYERS' and MULTI_LAYERS' layers too)."""
    from camrt_exporters.export import export_torch, write_model

    name, layer = request.param
    model = load(name)
    layers = list(dict.fromkeys([layer, *CAM_LAYERS[name], *MULTI_LAYERS[name]]))  # the first one is the default
    onnx_model, _ = export_torch(model, layers=layers, rules=[contract.RULE_VANILLA])
    path = tmp_path_factory.mktemp("cam-methods") / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    x = photos()
    return name, layer, model, str(path), x


@pytest.mark.parametrize("method", list(METHODS))
def test_method_matches_pytorch_grad_cam(request, exported, method):
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer
    from camrt_exporters.torch_frontend import parse_layer

    name, layer, model, path, x = exported
    results = Explainer(path, method=method).explain(x, targets=TARGETS)
    assert [r.target for r in results] == TARGETS and all(r.method == method for r in results)
    module = dict(model.named_modules())[parse_layer(model, layer).module]
    with getattr(pytorch_grad_cam, METHODS[method])(model=model, target_layers=[module]) as cam:
        reference = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in TARGETS])
        tensors = (cam.activations_and_grads.activations[0].numpy(), cam.activations_and_grads.gradients[0].numpy())
    diffs = [float(np.abs(_minmax(r.heatmap) - _minmax(reference[i])).max()) for i, r in enumerate(results)]
    for i, r in enumerate(results):
        assert np.ptp(reference[i]) > 0.5, f"{method} {name}: degenerate reference map for sample {i}"
    message = f"{method} on {name}/{layer}: max diff per sample {['%.2e' % d for d in diffs]}"
    known = KNOWN.get((name, method))
    if known is not None and max(diffs) > TOLERANCE:
        loose, truth_bound, reason = known
        assert max(diffs) <= loose, message
        _check_formula_on_reference_tensors(tensors, method, reference, x.shape[2:])
        truth = _reference_maps(copy.deepcopy(model).double(), layer, method, x.astype(np.float64), TARGETS)
        ours_vs_truth = max(float(np.abs(_minmax(r.heatmap) - _minmax(truth[i])).max()) for i, r in enumerate(results))
        theirs_vs_truth = max(float(np.abs(_minmax(reference[i]) - _minmax(truth[i])).max()) for i in range(len(x)))
        message += (f"; vs pytorch-grad-cam's float64 run: camrt {ours_vs_truth:.2e}, "
                    f"pytorch-grad-cam float32 {theirs_vs_truth:.2e}")
        print(message)
        assert ours_vs_truth <= truth_bound, message
        request.applymarker(pytest.mark.xfail(strict=False, reason=reason))
    assert max(diffs) <= TOLERANCE, message


@pytest.mark.parametrize("method", ["xgradcam", "hirescam"])
def test_extended_graph_optimization_meets_the_bound(exported, method):
    """graph_optimization="extended" (onnxruntime without its NCHWc convolution kernels): the
    methods of the KNOWN cases land within 1e-4 of pytorch-grad-cam and of its float64 run on every
    model, the ill-conditioned ones included (measured 8.0e-5 regnet, 9.7e-5 Lite0 XGrad-CAM)."""
    from camrt import Explainer

    name, layer, model, path, x = exported
    results = Explainer(path, method=method, graph_optimization="extended").explain(x, targets=TARGETS)
    reference = _reference_maps(model, layer, method, x, TARGETS)
    truth = _reference_maps(copy.deepcopy(model).double(), layer, method, x.astype(np.float64), TARGETS)
    vs_reference = max(float(np.abs(_minmax(r.heatmap) - _minmax(reference[i])).max()) for i, r in enumerate(results))
    vs_truth = max(float(np.abs(_minmax(r.heatmap) - _minmax(truth[i])).max()) for i, r in enumerate(results))
    message = f"{name}/{method} extended: vs pytorch-grad-cam {vs_reference:.2e}, vs its float64 run {vs_truth:.2e}"
    print(message)
    assert vs_reference <= TOLERANCE and vs_truth <= TOLERANCE, message


def _check_formula_on_reference_tensors(tensors, method, reference, size):
    """camrt's method on pytorch-grad-cam's own activations and gradients reproduces its maps."""
    from camrt import postprocess
    from camrt.methods.base import GraphOutputs
    from camrt.plugins.registry import build_method_registry

    acts, grads = tensors
    values = {contract.activation_output("L"): acts, contract.gradient_output("L"): grads}
    raw = build_method_registry().get(method)().explain(GraphOutputs(values, np.empty(0)), layer="L")
    for i in range(len(raw)):
        ours = postprocess.finalize([raw[i]], tuple(size))
        diff = np.abs(_minmax(ours) - _minmax(reference[i])).max()
        assert diff <= 1e-5, f"{method}: formula differs on sample {i}: {diff:.2e}"  # float32 summation order


@pytest.mark.parametrize("method", list(METHODS))
def test_raw_maps_match_pytorch_grad_cam_formula(method):
    """The raw maps (before ReLU) equal pytorch-grad-cam's get_cam_image on signed random tensors.

    On the layers above the gradient is 0 wherever the activation is negative (a ReLU/ReLU6 follows),
    so Layer-CAM and Grad-CAM element-wise give identical maps there; signed activations and
    gradients tell every formula apart (and eigencam's sign convention is checked without a ReLU).
    """
    import pytorch_grad_cam
    import torch

    from camrt.methods.base import GraphOutputs
    from camrt.plugins.registry import build_method_registry

    rng = np.random.default_rng(5)
    acts = (rng.standard_normal((2, 64, 7, 9)) + 0.3).astype(np.float32)
    grads = (rng.standard_normal((2, 64, 7, 9)) * 1e-2).astype(np.float32)
    values = {contract.activation_output("L"): acts, contract.gradient_output("L"): grads}
    ours = build_method_registry().get(method)().explain(GraphOutputs(values, np.empty(0)), layer="L")
    layer = torch.nn.Conv2d(1, 1, 1)  # a stand-in model: only the class's get_cam_image runs, on our tensors
    with getattr(pytorch_grad_cam, METHODS[method])(model=layer, target_layers=[layer]) as reference_cam:
        reference = reference_cam.get_cam_image(None, layer, None, acts, grads, False)
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (2, 7, 9)
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= 1e-5 * scale, f"{method}: raw maps differ"


def test_methods_listed_by_cli():
    from click.testing import CliRunner

    from camrt.cli import build_cli

    result = CliRunner().invoke(build_cli(), ["methods", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    listed = {m["name"]: m for m in json.loads(result.stdout)}
    for method in METHODS:
        assert method in listed, f"{method} missing from `camrt methods --json`: {sorted(listed)}"
        assert listed[method]["plugin"].startswith("camrt.methods.")
        assert listed[method]["description"]
    assert listed["eigencam"]["requires"] == {"activations": True, "gradients": False, "input_gradient": None}
    assert listed["layercam"]["requires"] == {"activations": True, "gradients": True, "input_gradient": None}


def _reference_maps(model, layer, method, x, targets, cam_options=None, **options):
    """pytorch-grad-cam's maps of `method` (camrt's name) on `layer` (or a tuple of layers) for
    explicit targets (`cam_options`: keyword arguments of the pytorch-grad-cam class)."""
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference_class = getattr(pytorch_grad_cam, {"gradcam": "GradCAM", "ablationcam": "AblationCAM", "scorecam": "ScoreCAM", **METHODS}[method])
    modules = _modules(model, (layer,) if isinstance(layer, str) else layer)
    with reference_class(model=model, target_layers=modules, **(cam_options or {})) as cam:
        return cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in targets], **options)


_FLIPS: dict[str, tuple[int, int]] = {}


def _check_fusion(request, name, model, x, diffs, message):
    """max(diffs) <= 1e-4, or, where the second layer's gradients cross flipping ReLU switches
    (SWITCH_CROSSING), the looser hard bound, with the flips shown in both float32 implementations."""
    print(message)
    if name in SWITCH_CROSSING and max(diffs) > TOLERANCE:
        from .models import switch_flips

        loose, reason = SWITCH_CROSSING[name]
        assert max(diffs) <= loose, message
        if name not in _FLIPS:  # one count per model for the module
            _FLIPS[name] = switch_flips(model, copy.deepcopy(model).double(), x, after=MULTI_LAYERS[name][1])
        flips_ours, flips_torch = _FLIPS[name]
        assert flips_ours > 0 and flips_torch > 0, f"{message}; no switch flips ({flips_ours}, {flips_torch})"
        request.applymarker(pytest.mark.xfail(strict=False, reason=reason))
    assert max(diffs) <= TOLERANCE, message


def _modules(model, layers):
    """The torch modules of camrt layer names."""
    from camrt_exporters.torch_frontend import parse_layer

    named = dict(model.named_modules())
    return [named[parse_layer(model, layer).module] for layer in layers]


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_several_layers_mean_fusion_matches_pytorch_grad_cam(request, exported, method):
    """Two layers of different resolutions fused by the mean (pytorch-grad-cam's
    aggregate_multi_layers: per layer ReLU, min-max and upsampling, then the mean and one min-max),
    within the same 1e-4; Layer-CAM with fusion="mean" (its default is the paper's, tested below)."""
    from camrt import Explainer

    name, _, model, path, x = exported
    layers = MULTI_LAYERS[name]
    options = {"fusion": "mean"} if method == "layercam" else {}
    results = Explainer(path, method=method, layer=list(layers), **options).explain(x, targets=TARGETS)
    assert all(r.layer == ",".join(layers) for r in results)
    reference = _reference_maps(model, layers, method, x, TARGETS)
    assert all(np.ptp(m) > 0.5 for m in reference), f"{name}/{method}: degenerate reference maps"
    diffs = [float(np.abs(_minmax(r.heatmap) - _minmax(reference[i])).max()) for i, r in enumerate(results)]
    message = f"{name}/{method} layers {layers}, mean fusion: max diff per sample {['%.2e' % d for d in diffs]}"
    _check_fusion(request, name, model, x, diffs, message)


def test_layercam_paper_fusion_matches_torchcam(request, exported):
    """Layer-CAM's own fusion (Jiang et al. 2021, eq. 9: tanh(2 M) of each normalised layer map, then
    the element-wise maximum at the largest layer's resolution) against torchcam's LayerCAM and its
    fuse_cams on the same two layers; torchcam stops at the fused 14x14 map, so the reference is
    upsampled with torch's bilinear (align_corners=False) and min-max normalised. The mean fusion is
    checked to give a different map, so the comparison tells the two apart."""
    import torch
    from torchcam.methods import LayerCAM

    from camrt import Explainer
    from camrt_exporters.torch_frontend import parse_layer

    name, _, model, path, x = exported
    layers = MULTI_LAYERS[name]
    explainer = Explainer(path, method="layercam", layer=list(layers))
    assert explainer.method.layer_fusion() == "tanh-max"
    results = explainer.explain(x, targets=TARGETS)
    with LayerCAM(model, target_layer=[parse_layer(model, layer).module for layer in layers]) as extractor:
        cams = extractor(class_idx=TARGETS, scores=model(torch.from_numpy(x)))
        fused = extractor.fuse_cams(cams)
    upsampled = torch.nn.functional.interpolate(fused[:, None], size=x.shape[2:], mode="bilinear",
                                                align_corners=False)[:, 0].detach().numpy()
    reference = [_minmax(m) for m in upsampled]
    assert all(np.ptp(m) > 0.5 for m in reference), f"{name}: degenerate reference maps"
    diffs = [float(np.abs(_minmax(r.heatmap) - reference[i]).max()) for i, r in enumerate(results)]
    mean_fused = Explainer(path, method="layercam", layer=list(layers), fusion="mean").explain(x, targets=TARGETS)
    apart = min(float(np.abs(r.heatmap - m.heatmap).max()) for r, m in zip(results, mean_fused))
    message = (f"{name} layercam layers {layers}, paper fusion: max diff per sample {['%.2e' % d for d in diffs]}; "
               f"mean fusion differs by >= {apart:.2e}")
    assert apart > 0.05, message
    _check_fusion(request, name, model, x, diffs, message)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam",
                                    "eigencam", "eigengradcam"])
def test_eigen_smooth_matches_pytorch_grad_cam(request, exported, method):
    """eigen_smooth=True: the first principal component of the weighted activations (channel
    weighting) or of the element-wise weighted activations (HiResCAM, Grad-CAM element-wise,
    Layer-CAM), as pytorch-grad-cam computes it (same sign convention), within the same 1e-4.
    Eigen-CAM and EigenGrad-CAM are projections already: the option changes nothing, on either side."""
    from camrt import Explainer

    name, layer, model, path, x = exported
    ours = Explainer(path, method=method, eigen_smooth=True).explain(x, targets=TARGETS)
    if method.startswith("eigen"):
        plain = Explainer(path, method=method).explain(x, targets=TARGETS)
        assert all(np.array_equal(a.heatmap, b.heatmap) for a, b in zip(ours, plain))
    reference = _reference_maps(model, layer, method, x, TARGETS, eigen_smooth=True)
    diffs = []
    for i, result in enumerate(ours):
        assert np.ptp(reference[i]) > 0, f"{name}/{method} sample {i}: degenerate reference map"
        diffs.append(float(np.abs(_minmax(result.heatmap) - _minmax(reference[i])).max()))
    message = f"{name}/{method} eigen_smooth: max diff per sample {['%.2e' % d for d in diffs]}"
    known = KNOWN.get((name, method))
    if known is not None and max(diffs) > TOLERANCE:  # the same conditioning as without eigen_smooth
        assert max(diffs) <= known[0], message
        request.applymarker(pytest.mark.xfail(strict=False, reason=known[2]))
    assert max(diffs) <= TOLERANCE, message


def _cam_raw_maps(path, method, layer, x, **options):
    """camrt's raw maps [B, h, w] (before postprocessing) of `method` at `layer`."""
    from camrt import Explainer
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(path, method=method, layer=layer, **options)
    values = explainer.session.run(x, TARGETS, explainer.fetch)
    return explainer.method.explain(GraphOutputs(values, x), layer=layer)


def test_cam_matches_torchcam(exported):
    """CAM (Zhou et al. 2016) against torchcam 0.5's CAM, which weights the hooked layer's maps by the
    fc weights of the class, applies no ReLU and min-max normalises at the layer's resolution (eps
    1e-8) without upsampling. So the comparison is at the layer's resolution (camrt's raw maps, min-max
    normalised), plus camrt's heatmap against torchcam's raw map through camrt's postprocessing."""
    import torch
    from torchcam.methods import CAM

    from camrt import Explainer, postprocess
    from camrt_exporters.torch_frontend import parse_layer

    name, _, model, path, x = exported
    layer = CAM_LAYERS[name][0]
    fc = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][0]
    with CAM(model, target_layer=parse_layer(model, layer).module, fc_layer=fc) as extractor:
        with torch.no_grad():
            model(torch.from_numpy(x))
        reference = extractor(class_idx=TARGETS, normalized=False)[0].numpy()
    ours = _cam_raw_maps(path, "cam", layer, x)
    assert ours.shape == reference.shape
    diffs = [float(np.abs(_minmax(ours[i]) - _minmax(reference[i])).max()) for i in range(len(x))]
    results = Explainer(path, method="cam", layer=layer).explain(x, targets=TARGETS)
    heatmap_diffs = [float(np.abs(r.heatmap - postprocess.finalize([reference[i]], x.shape[2:], apply_relu=False)).max())
                     for i, r in enumerate(results)]
    message = f"cam on {name}/{layer}: max diff per sample {diffs}, heatmaps {heatmap_diffs}"
    print(message)
    assert all(np.ptp(m) > 0 for m in reference), f"{name}: flat reference maps"
    assert max(diffs) <= TOLERANCE and max(heatmap_diffs) <= TOLERANCE, message


def test_cam_equals_gradcam_on_gap_fc_head(exported):
    """Closed form: on GAP -> FC, d y^c / d A^k_ij = w_k^c / (h w), so Grad-CAM's raw map is CAM's
    divided by h w, and after Grad-CAM's ReLU both give the same normalised map."""
    from camrt import postprocess

    name, _, _, path, x = exported
    layer = CAM_LAYERS[name][0]
    cam = _cam_raw_maps(path, "cam", layer, x)
    gradcam = _cam_raw_maps(path, "gradcam", layer, x)
    area = cam.shape[1] * cam.shape[2]
    scale = np.abs(cam).max(axis=(1, 2), keepdims=True)
    assert np.abs(gradcam * area - cam).max(axis=(1, 2)).max() <= 1e-4 * scale.min(), name
    diff = np.abs(postprocess.normalize(postprocess.relu(cam)) - postprocess.normalize(postprocess.relu(gradcam))).max()
    assert diff <= TOLERANCE, f"{name}: normalised maps differ by {diff:.2e}"


def test_cam_eigen_smooth_equals_gradcam_eigen_smooth_on_gap_fc_head(exported):
    """eigen_smooth (the projection of the weighted activations on their first principal component,
    checked against pytorch-grad-cam for Grad-CAM above) is linear in the weights, so the closed form
    carries over: CAM's raw map is Grad-CAM's times h w."""
    name, _, _, path, x = exported
    layer = CAM_LAYERS[name][0]
    cam = _cam_raw_maps(path, "cam", layer, x, eigen_smooth=True)
    gradcam = _cam_raw_maps(path, "gradcam", layer, x, eigen_smooth=True)
    area = cam.shape[1] * cam.shape[2]
    scale = np.abs(cam).max(axis=(1, 2), keepdims=True)
    assert np.abs(gradcam * area - cam).max(axis=(1, 2)).max() <= 1e-4 * scale.min(), name
    plain = _cam_raw_maps(path, "cam", layer, x)
    assert np.abs(plain - cam).max() > 1e-2 * scale.min()  # the option matters


def test_cam_refuses_a_layer_without_gap_fc_head(exported):
    """resnet18's layer3 feeds layer4, EfficientNet-Lite0's _bn1 its head activation: the file has
    no class weights for them and `cam` says so, naming the layer and pointing to gradcam."""
    from camrt import Explainer
    from camrt.errors import ModelError
    from camrt.modelfile.metadata import read_contract

    name, _, _, path, _ = exported
    cam_layer, other = CAM_LAYERS[name]
    assert read_contract(path).cam_layers == [cam_layer]
    with pytest.raises(ModelError, match=rf"layer\(s\) {other} .*not followed by global average pooling.*gradcam"):
        Explainer(path, method="cam", layer=other)
