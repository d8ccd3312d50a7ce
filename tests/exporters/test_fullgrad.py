"""FullGrad against pytorch-grad-cam 1.5.7's FullGrad, and its bias terms against the full-gradient
completeness identity.

Models: resnet18 (224x224) and mobilenet_v2 (64x64, to keep the test short), fixed random weights
with calibrated BatchNorm statistics, on random NCHW inputs, and EfficientNet-Lite0 with its real
weights on two photographs (224x224); each exported once with `fullgrad=True` (BatchNormalization
nodes kept unfused, so the file's bias-carrying nodes are pytorch-grad-cam's BatchNorm2d modules;
no model has a Conv2d with a bias). Explicit targets, heatmaps at the input size on both sides
(no resampling). FullGrad is built on the input gradient, which crosses every
ReLU/ReLU6 switch, so the criterion is the one for input-gradient methods: relative L2
<= 1e-2 against pytorch-grad-cam, and no worse than twice pytorch-grad-cam's own error against
pytorch-grad-cam run on a float64 copy of the model (floor: test_input_gradients.FLOAT32_FLOOR), or,
where onnxruntime is shown to flip more ReLU/ReLU6 switches than torch float32 (on the input or an
augmented copy of it), within the 1e-2 alone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from camrt import contract

from .models import load, switch_flips
from .test_input_gradients import FLOAT32_FLOOR, _input, l2_rel

pytest.importorskip("pytorch_grad_cam")
MODELS = {"resnet18": 224, "mobilenet_v2": 64, "efficientnet_lite0": 224}
TARGETS = [1, 250]
PGC_L2 = 1e-2


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    from camrt_exporters.export import export_torch, write_model

    name = request.param
    size = MODELS[name]
    model = load(name)
    onnx_model, _ = export_torch(model, input_size=(size, size), rules=[contract.RULE_VANILLA], fullgrad=True)
    path = tmp_path_factory.mktemp("fullgrad") / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    return name, model, str(path), _input(name, size)


def _pytorch_grad_cam(model, x, **options):
    import torch
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with FullGrad(model, []) as cam:
        return cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in TARGETS], **options)


def test_bias_terms_are_pytorch_grad_cams_modules(exported):
    """One bias term per BatchNorm2d (and Conv2d with a bias) module: the dynamo export keeps them unfused."""
    import torch

    from camrt.modelfile.metadata import read_contract

    name, model, path, _ = exported
    modules = [m for m in model.modules() if type(m) in (torch.nn.Conv2d, torch.nn.BatchNorm2d) and m.bias is not None]
    assert len(read_contract(path).bias_terms) == len(modules), name


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)


@pytest.mark.parametrize("aug_smooth", [False, True], ids=["plain", "aug_smooth"])
def test_fullgrad_matches_pytorch_grad_cam(exported, aug_smooth):
    """aug_smooth=True: the mean of the maps of the six flipped / scaled inputs, as pytorch-grad-cam's
    FullGrad computes it (it returns the mean un-normalised: both sides are min-max normalised here)."""
    from camrt import Explainer, postprocess

    name, model, path, x = exported
    explained = Explainer(path, method="fullgrad", aug_smooth=aug_smooth).explain(x, targets=TARGETS)
    ours = np.stack([_minmax(r.heatmap) for r in explained])
    reference = np.stack([_minmax(m) for m in _pytorch_grad_cam(model, x, aug_smooth=aug_smooth)])
    truth = np.stack([_minmax(m) for m in _pytorch_grad_cam(copy.deepcopy(model).double(), x.astype(np.float64),
                                                            aug_smooth=aug_smooth)])
    if aug_smooth:  # the option matters
        plain = _pytorch_grad_cam(model, x)
        assert min(l2_rel(_minmax(plain[i]), reference[i]) for i in range(len(x))) > 10 * FLOAT32_FLOOR
    for i in range(len(x)):
        assert np.ptp(reference[i]) > 0.5, f"{name}: degenerate reference map {i}"
        vs_reference = l2_rel(ours[i], reference[i])
        ours_vs_truth, theirs_vs_truth = l2_rel(ours[i], truth[i]), l2_rel(reference[i], truth[i])
        message = (f"{name} aug_smooth={aug_smooth} sample {i}: relative L2 vs pytorch-grad-cam {vs_reference:.2e}; "
                   f"vs its float64 run: camrt {ours_vs_truth:.2e}, pytorch-grad-cam float32 {theirs_vs_truth:.2e}")
        assert vs_reference <= PGC_L2, message
        if ours_vs_truth > max(2 * theirs_vs_truth, FLOAT32_FLOOR):
            # shown, not assumed: onnxruntime flips a ReLU/ReLU6 switch that torch does not, on the
            # input or one of its augmented copies
            copies = [postprocess.augment(x[i:i + 1], flip, factor)
                      for flip, factor in (postprocess.AUGMENTATIONS if aug_smooth else [(False, 1.0)])]
            flips_ours, flips_torch32 = switch_flips(model, copy.deepcopy(model).double(), np.concatenate(copies),
                                                     input_size=x.shape[2:], fullgrad=True)
            message += f"; switches differing from float64: onnxruntime {flips_ours}, torch32 {flips_torch32}"
            assert flips_ours > flips_torch32, message
        print(message)


@pytest.mark.parametrize("exported", ["resnet18"], indirect=True)
def test_bias_terms_complete_the_logit(exported):
    """Full-gradient completeness (Srinivas & Fleuret 2019, sec. 3): for a piecewise-linear network
    f(x) = <grad_x f, x> + sum over biases <grad_b f, b>. resnet18's biases are its BatchNorms' (the
    file's bias terms, each d f / d output * b) and the classifier's, so the sum of the terms plus
    <input gradient, x> plus fc.bias[c] is the logit: an independent check of every term's gradient
    and effective bias. (mobilenet_v2's ReLU6 saturates, which the identity does not cover.)"""
    from camrt import Explainer
    from camrt.methods.base import GraphOutputs

    name, model, path, x = exported
    explainer = Explainer(path, method="fullgrad")
    outputs = GraphOutputs(explainer.session.run(x, TARGETS, explainer.fetch), x)
    terms = [t.astype(np.float64).sum(axis=(1, 2, 3)) for t in outputs.bias_gradients()]
    input_part = (outputs.input_gradient(contract.RULE_VANILLA).astype(np.float64) * x).sum(axis=(1, 2, 3))
    fc_bias = model.fc.bias.detach().numpy().astype(np.float64)[TARGETS]
    logits = outputs.logits[np.arange(len(x)), TARGETS]
    total = input_part + np.sum(terms, axis=0) + fc_bias
    scale = np.abs(input_part) + np.sum(np.abs(terms), axis=0) + np.abs(fc_bias)
    print(f"{name}: logits {logits}, decomposition {total}, |parts| {scale}")
    assert len(terms) == 20
    np.testing.assert_array_less(np.abs(total - logits), 1e-5 * scale)


@pytest.mark.parametrize("exported", ["resnet18"], indirect=True)
def test_fullgrad_eigen_smooth_matches_pytorch_grad_cam(exported):
    """eigen_smooth=True: the first principal component of the 3 + L maps at 1/8 of the input size,
    as pytorch-grad-cam computes it (same SVD sign convention), within the same relative L2."""
    from camrt import Explainer

    name, model, path, x = exported
    ours = np.stack([r.heatmap for r in Explainer(path, method="fullgrad", eigen_smooth=True).explain(x, targets=TARGETS)])
    reference = _pytorch_grad_cam(model, x, eigen_smooth=True)
    figures = [l2_rel(ours[i], reference[i]) for i in range(len(x))]
    print(f"{name} fullgrad eigen_smooth: relative L2 vs pytorch-grad-cam {figures}")
    assert all(np.ptp(m) > 0.5 for m in reference) and max(figures) <= PGC_L2, figures
