"""saliency, guided-backprop, deconvnet and guided-gradcam against Captum on the same model and input,
and guided-backprop against pytorch-grad-cam's GuidedBackpropReLUModel.

resnet18 and mobilenet_v3_large (fixed random weights) on random inputs and EfficientNet-Lite0 (real weights) on real
photographs (scikit-image's chelsea and coffee, (x - 127) / 128), each exported once with the
vanilla, guided and deconvnet input gradients. Compared, relative L2 ||camrt - Captum|| / ||Captum||
<= 1e-2 (input gradients cross every ReLU switch, some of which flip in float32 between
onnxruntime and torch):
- saliency: camrt's map vs Saliency(abs=True) max over channels;
- guided-backprop / deconvnet: camrt's signed attribution G vs GuidedBackprop / Deconvolution, and
  the maps max_c |G|;
- guided-gradcam: camrt's attribution vs GuidedGradCam(model, layer, interpolate_mode="bilinear")
  (the paper's bilinear upsampling; Captum's default is nearest), and the maps;
- end to end: `Explainer(path, method=<instance>)`'s heatmap vs `postprocess.finalize` of Captum's map.

Captum's GuidedBackprop / Deconvolution override nn.ReLU modules only; camrt's rule sets override
every Relu op of the graph. On these two models they coincide (checked: forward Relu ops == nn.ReLU
calls). EfficientNet-Lite0 has no ReLU at all (ReLU6 = Clip, which neither overrides), so there
guided backprop and deconvnet equal the plain gradient on both sides: a weak check of the rules,
a real check of the plumbing. Where the two counts differ and the figure exceeds the bound, the
test xfails saying so.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract

from .models import ARCHITECTURES, load, module_calls
from .test_input_gradients import _input

captum = pytest.importorskip("captum")
pytestmark = [pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients:UserWarning"),
              pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations:UserWarning")]
MODELS = ["resnet18", "mobilenet_v3_large", "efficientnet_lite0"]
CAPTUM_L2 = 1e-2
#: explicit targets per sample (-1: top-1, resolved in the graph)
TARGETS = [contract.TOP1_TARGET, 250]


def l2_rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _relu_module_calls(model) -> int:
    import torch

    return len(module_calls(model, [n for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]))


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    from camrt_exporters.export import export_torch, write_model

    name = request.param
    model = load(name)
    layer = ARCHITECTURES[name][1]
    rules = [contract.RULE_VANILLA, contract.RULE_GUIDED, contract.RULE_DECONVNET]
    onnx_model, _ = export_torch(model, layers=[layer], rules=rules)
    path = tmp_path_factory.mktemp(name) / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    relu_ops = sum(1 for n in onnx_model.graph.node if n.op_type == "Relu" and not n.name.startswith("camrt_bwd/"))
    return {"name": name, "model": model, "layer": layer, "path": str(path), "x": _input(name),
            "relu_ops": relu_ops, "relu_modules": _relu_module_calls(model)}


def _run(exported, method):
    """(attribution or None, raw maps, heatmaps, resolved targets) of camrt for `method`."""
    from camrt import Explainer
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(exported["path"], method=method)
    x = exported["x"]
    outputs = GraphOutputs(explainer.session.run(x, TARGETS, explainer.fetch), x)
    layer = explainer.layers[0] if explainer.layers else None
    attribution = method.attribution(outputs, layer=layer) if hasattr(method, "attribution") else None
    maps = method.explain(outputs, layer=layer)
    results = explainer.explain(x, targets=TARGETS)
    targets = outputs.target_index.tolist()
    assert [r.target for r in results] == targets
    return attribution, maps, [r.heatmap for r in results], targets


def _check(exported, label, figures, relu_sensitive=False, reference="Captum"):
    name = exported["name"]
    text = ", ".join(f"{k} {v:.2e}" for k, v in figures.items())
    message = (f"{name} {label}: relative L2 vs {reference}: {text} (bound {CAPTUM_L2:.0e}); forward Relu ops "
               f"{exported['relu_ops']}, nn.ReLU calls {exported['relu_modules']}")
    print(message)
    if max(figures.values()) > CAPTUM_L2 and relu_sensitive and exported["relu_ops"] != exported["relu_modules"]:
        pytest.xfail(f"{message}: camrt overrides every Relu op, {reference} only nn.ReLU modules")
    assert max(figures.values()) <= CAPTUM_L2, message


def _heatmap_figure(heatmaps, reference_maps, relu):
    from camrt import postprocess

    references = [postprocess.finalize([m], m.shape, apply_relu=relu) for m in reference_maps]
    return l2_rel(np.stack(heatmaps), np.stack(references))


def test_relu_coverage(exported):
    """camrt's rules override Relu ops, Captum's nn.ReLU modules: the same switches on these models."""
    assert exported["relu_ops"] == exported["relu_modules"], (
        f"{exported['name']}: {exported['relu_ops']} forward Relu ops, {exported['relu_modules']} nn.ReLU calls")


def test_saliency(exported):
    import torch
    from captum.attr import Saliency as CaptumSaliency

    from camrt.methods.saliency import Saliency

    method = Saliency()
    _, maps, heatmaps, targets = _run(exported, method)
    model, x = exported["model"], exported["x"]
    ref = CaptumSaliency(model).attribute(torch.from_numpy(x), target=targets, abs=True).detach().numpy().max(axis=1)
    _check(exported, "saliency", {"map": l2_rel(maps, ref), "heatmap": _heatmap_figure(heatmaps, ref, method.relu)})


@pytest.mark.parametrize("rule", [contract.RULE_GUIDED, contract.RULE_DECONVNET])
def test_guided_backprop_and_deconvnet(exported, rule):
    import torch
    from captum.attr import Deconvolution
    from captum.attr import GuidedBackprop as CaptumGuidedBackprop

    from camrt.methods.deconvnet import Deconvnet
    from camrt.methods.guided_backprop import GuidedBackprop

    method = GuidedBackprop() if rule == contract.RULE_GUIDED else Deconvnet()
    reference = CaptumGuidedBackprop if rule == contract.RULE_GUIDED else Deconvolution
    attribution, maps, heatmaps, targets = _run(exported, method)
    model, x = exported["model"], exported["x"]
    ref = reference(model).attribute(torch.from_numpy(x), target=targets).detach().numpy()
    ref_maps = np.abs(ref).max(axis=1)
    _check(exported, method.name, {
        "attribution": l2_rel(attribution, ref), "map": l2_rel(maps, ref_maps),
        "heatmap": _heatmap_figure(heatmaps, ref_maps, method.relu),
    }, relu_sensitive=True)


def test_guided_gradcam(exported):
    import torch
    from captum.attr import GuidedGradCam

    from camrt.methods.guided_gradcam import GuidedGradCAM
    from camrt_exporters.torch_frontend import parse_layer

    method = GuidedGradCAM()
    attribution, maps, heatmaps, targets = _run(exported, method)
    model, x, layer = exported["model"], exported["x"], exported["layer"]
    module = dict(model.named_modules())[parse_layer(model, layer).module]
    ref = GuidedGradCam(model, module).attribute(torch.from_numpy(x), target=targets,
                                                 interpolate_mode="bilinear").detach().numpy()
    ref_maps = np.abs(ref).max(axis=1)
    _check(exported, f"guided-gradcam@{layer}", {
        "attribution": l2_rel(attribution, ref), "map": l2_rel(maps, ref_maps),
        "heatmap": _heatmap_figure(heatmaps, ref_maps, method.relu),
    }, relu_sensitive=True)


def test_guided_backprop_matches_pytorch_grad_cam(exported):
    """guided-backprop against pytorch-grad-cam 1.5.7's GuidedBackpropReLUModel (which replaces every
    nn.ReLU module by a guided one and returns the first image's input gradient as [H, W, C]), one
    image at a time, relative L2 <= 1e-2 on the signed attribution and on the map; its distance to a
    float64 run is test_input_gradients' (the same guided rule set)."""
    import copy

    import torch
    from pytorch_grad_cam import GuidedBackpropReLUModel

    from camrt.methods.guided_backprop import GuidedBackprop

    method = GuidedBackprop()
    attribution, maps, heatmaps, targets = _run(exported, method)
    guided = GuidedBackpropReLUModel(copy.deepcopy(exported["model"]), device="cpu")
    x = exported["x"]
    ref = np.stack([guided(torch.from_numpy(x[i:i + 1].copy()), target_category=t).transpose(2, 0, 1)
                    for i, t in enumerate(targets)])
    ref_maps = np.abs(ref).max(axis=1)
    _check(exported, "guided-backprop", {
        "attribution": l2_rel(attribution, ref), "map": l2_rel(maps, ref_maps),
        "heatmap": _heatmap_figure(heatmaps, ref_maps, method.relu),
    }, relu_sensitive=True, reference="pytorch-grad-cam")
