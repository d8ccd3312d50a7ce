"""camrt/input_grad/{vanilla,guided} against the truth (torch float64) and against Captum (float32).

Input gradients cross every ReLU and MaxPool switch; in float32 a few switches flip between any two
implementations. Criteria (relative L2, ||a - b|| / ||b||):
- vs torch float64 (model.double()): camrt's error <= 2 x torch float32's own error, or, where
  onnxruntime is shown to flip a ReLU/ReLU6 switch that torch does not, <= 1e-2; with a floor of
  5e-5 (float32 arithmetic alone: resnet18's guided gradient is 1.0e-5 from float64 with no pixel off
  by more than 1e-3 of the maximum, while torch float32 happens to be 1.4e-7);
- vs Captum Saliency(abs=False) / GuidedBackprop in float32: <= 1e-2.
EfficientNet-Lite0 runs on a real photograph (scikit-image's chelsea) with its real weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from camrt import contract

from .models import load, switch_flips

captum = pytest.importorskip("captum")
ARCHITECTURES = ["resnet18", "mobilenet_v3_large", "efficientnet_lite0"]
CAPTUM_L2 = 1e-2
FLOAT32_FLOOR = 5e-5


def l2_rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _input(name, size=224):
    if name != "efficientnet_lite0":
        return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    import cv2
    import skimage.data

    photos = [cv2.resize(getattr(skimage.data, n)(), (224, 224), interpolation=cv2.INTER_AREA) for n in ("chelsea", "coffee")]
    return ((np.stack(photos).astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request):
    from camrt_exporters.export import export_torch
    from camrt_exporters.validate import run_contract

    model = load(request.param)
    onnx_model, _ = export_torch(model, rules=[contract.RULE_VANILLA, contract.RULE_GUIDED])
    x = _input(request.param)
    got = run_contract(onnx_model, onnx_model.graph.input[0].name, x, np.full(len(x), contract.TOP1_TARGET))
    return request.param, model, x, got


@pytest.mark.parametrize("rule_set", [contract.RULE_VANILLA, contract.RULE_GUIDED])
def test_input_gradient_vs_float64_truth(exported, rule_set):
    import torch

    from camrt_exporters.torch_frontend import reference_gradients

    name, model, x, got = exported
    targets = torch.from_numpy(got[contract.TARGET_INDEX_OUTPUT])
    torch32 = reference_gradients(model, [], torch.from_numpy(x), targets, rule_set)["input_grad"]
    truth = reference_gradients(copy.deepcopy(model).double(), [], torch.from_numpy(x).double(), targets,
                                rule_set)["input_grad"]
    ours = l2_rel(got[contract.input_gradient_output(rule_set)], truth)
    theirs = l2_rel(torch32, truth)
    message = f"{name} {rule_set}: camrt vs float64 {ours:.2e}, torch float32 vs float64 {theirs:.2e}"
    if ours > max(2 * theirs, FLOAT32_FLOOR):
        # shown, not assumed: onnxruntime's forward pass flips a ReLU/ReLU6 switch that torch's does not
        flips_ours, flips_torch32 = switch_flips(model, copy.deepcopy(model).double(), x)
        message += f"; switches differing from float64: onnxruntime {flips_ours}, torch32 {flips_torch32}"
        assert flips_ours > 0 and ours <= CAPTUM_L2, message
    print(message)


@pytest.mark.parametrize("rule_set", [contract.RULE_VANILLA, contract.RULE_GUIDED])
def test_input_gradient_vs_captum(exported, rule_set):
    import torch
    from captum.attr import GuidedBackprop, Saliency

    name, model, x, got = exported
    targets = got[contract.TARGET_INDEX_OUTPUT].tolist()
    attribution = Saliency(model) if rule_set == contract.RULE_VANILLA else GuidedBackprop(model)
    kwargs = {"abs": False} if rule_set == contract.RULE_VANILLA else {}
    ref = attribution.attribute(torch.from_numpy(x), target=targets, **kwargs).detach().numpy()
    error = l2_rel(got[contract.input_gradient_output(rule_set)], ref)
    print(f"{name} {rule_set}: relative L2 vs Captum {error:.2e}")
    assert error <= CAPTUM_L2, f"{name} {rule_set}: relative L2 vs Captum {error:.2e} > {CAPTUM_L2}"
