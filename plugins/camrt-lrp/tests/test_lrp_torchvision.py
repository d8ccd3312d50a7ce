"""The LRP rule sets against zennit 0.5.1 on torchvision's vgg11_bn, resnet18 and mobilenet_v2 (weights=None,
seed 0, random BatchNorm statistics, eval mode; small inputs to stay fast). lrp_oracle.py: oracle, tolerance.

zennit's canonizers, with lrp_oracle.ExactMergeBatchNorm for zennit's SequentialMergeBatchNorm (whose merged
BatchNorm is not an exact identity in 0.5.1): VGGCanonizer's merge alone, ResNetCanonizer's (also the
residual additions through zennit.layer.Sum, Norm-ruled). zennit 0.5.1 has none for MobileNetV2, whose
residual addition and global average pooling are functional calls that zennit's module hooks never see
(they keep their gradient); `mobilenet_canonizers` below routes both through modules (Sum,
AdaptiveAvgPool2d) as ResNetCanonizer does for ResNets, which is what camrt's rules do on every Add of two
activations and every average pool.

vgg11_bn at 224x224, where AdaptiveAvgPool2d((7, 7)) is an identity: at smaller sizes torch exports the
adaptive pooling through GatherND, which has no backward rule in camrt yet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from lrp_oracle import (
    L2_REL,
    RULE_SETS,
    ExactMergeBatchNorm,
    assert_matches_zennit,
    l2_rel_per_sample,
    randomize_batchnorm,
    resnet_canonizers,
    run_file,
    zennit_float64,
)
from zennit.canonizers import AttributeCanonizer
from zennit.layer import Sum

from camrt import contract

pytestmark = pytest.mark.slow

TARGETS = np.array([contract.TOP1_TARGET, 7], np.int64)


def _inverted_residual_forward(self, x):
    return self.canonizer_sum(torch.stack([x, self.conv(x)], dim=-1))


def _mobilenet_forward(self, x):
    return self.classifier(torch.flatten(self.canonizer_avgpool(self.features(x)), 1))


def _mobilenet_attributes(name, module):
    if isinstance(module, torchvision.models.mobilenetv2.InvertedResidual) and module.use_res_connect:
        return {"forward": _inverted_residual_forward.__get__(module), "canonizer_sum": Sum()}
    if isinstance(module, torchvision.models.MobileNetV2):
        return {"forward": _mobilenet_forward.__get__(module), "canonizer_avgpool": torch.nn.AdaptiveAvgPool2d(1)}
    return None


def mobilenet_canonizers():
    return [ExactMergeBatchNorm(), AttributeCanonizer(_mobilenet_attributes)]


MODELS = {  # name: (input size, zennit canonizers)
    "vgg11_bn": (224, lambda: [ExactMergeBatchNorm()]),
    "resnet18": (64, resnet_canonizers),
    "mobilenet_v2": (64, mobilenet_canonizers),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request):
    from camrt_exporters.export import export_torch

    torch.manual_seed(0)
    net = getattr(torchvision.models, request.param)(weights=None).eval()
    randomize_batchnorm(net)
    size = MODELS[request.param][0]
    model, _ = export_torch(net, input_size=(size, size), rules=list(RULE_SETS))
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    return {"name": request.param, "net": net, "x": x, "outputs": run_file(model, x, TARGETS), "float64": {}}


def zennit_truth(exported, rule_set: str) -> np.ndarray:
    """zennit's float64 relevance, computed once per model and rule set (vgg11_bn at 224 takes a while)."""
    if rule_set not in exported["float64"]:
        exported["float64"][rule_set] = zennit_float64(
            exported["net"], exported["x"], exported["outputs"][contract.TARGET_INDEX_OUTPUT], rule_set,
            MODELS[exported["name"]][1]())
    return exported["float64"][rule_set]


#: (model, rule set): float32 round-off of onnxruntime's forward pass switching one MaxPool near-tie (lrp_oracle.py,
#: "Known departure"); the relevance stays within L2_REL of zennit float64 (test_relevance_is_close_to_zennit).
MAXPOOL_TIE = ("target 7: onnxruntime float32 switches a MaxPool near-tie (second MaxPool, channel 118, output "
               "(16, 30), inputs 4.6e-7 relative apart) that zennit float32 does not; all the error is in its "
               "receptive field")
KNOWN_DEPARTURES = {
    ("vgg11_bn", "lrp-epsilon-plus-flat"): f"{MAXPOOL_TIE}: 1.4e-4 max-relative (zennit float32's own 6e-6)",
    ("vgg11_bn", "lrp-epsilon-gamma-box"): f"{MAXPOOL_TIE}: 2.4e-4 max-relative (zennit float32's own 7e-6)",
    ("vgg11_bn", "lrp-epsilon-alpha2-beta1"): f"{MAXPOOL_TIE}: 2.5e-4 max-relative (zennit float32's own 7e-6)",
}


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_relevance_is_close_to_zennit(exported, rule_set):
    outputs = exported["outputs"]
    errors = l2_rel_per_sample(outputs[contract.input_gradient_output(rule_set)], zennit_truth(exported, rule_set))
    print(f"{exported['name']} {rule_set}: relative L2 to zennit float64 {errors}")
    assert errors.max() <= L2_REL, f"{exported['name']} {rule_set}: relative L2 to zennit float64 {errors}"


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_relevance_equals_zennit(exported, rule_set, request):
    departure = KNOWN_DEPARTURES.get((exported["name"], rule_set))
    if departure:
        request.applymarker(pytest.mark.xfail(reason=f"known departure from zennit: {departure}", strict=False))
    outputs = exported["outputs"]
    canonizers = MODELS[exported["name"]][1]()
    assert_matches_zennit(outputs[contract.input_gradient_output(rule_set)], exported["net"], exported["x"],
                          outputs[contract.TARGET_INDEX_OUTPUT], rule_set, canonizers, exported["name"],
                          truth=zennit_truth(exported, rule_set))
