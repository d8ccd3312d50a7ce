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

import copy

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


def _windows(tensor: np.ndarray) -> np.ndarray:
    """[B, C, H, W] as its 2x2 stride-2 MaxPool windows [B, C, H/2, W/2, 4]."""
    b, c, h, w = tensor.shape
    return tensor.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)


def float32_switches(model, net, x: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """(sample, pool, channel, row, col) of the MaxPool windows of vgg's `features` (2x2, stride 2) whose
    winner onnxruntime's float32 forward pass of the file takes otherwise than torch float64: near-ties
    float32 cannot resolve, where any float32 implementation may route the relevance to either input."""
    import onnx

    pools = [node for node in model.graph.node if node.op_type == "MaxPool"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=node.input[0]) for node in pools)
    float32 = run_file(probe, x, TARGETS)
    h, exact = torch.from_numpy(x).double(), []
    with torch.no_grad():
        for module in copy.deepcopy(net).double().features:
            if isinstance(module, torch.nn.MaxPool2d):
                exact.append(h.numpy())
            h = module(h)
    switches = []
    for pool, (node, truth) in enumerate(zip(pools, exact)):
        ours, theirs = _windows(float32[node.input[0]]), _windows(truth)
        switched = (ours.argmax(-1) != theirs.argmax(-1)) & (theirs.max(-1) > 0)  # all-zero windows: both take the first
        switches += [(int(b), pool, int(c), int(i), int(j)) for b, c, i, j in zip(*np.nonzero(switched))]
    return switches


def receptive_field(features, pool: int, row: int, col: int, size: int) -> tuple[slice, slice]:
    """The input pixels MaxPool `pool`'s output (row, col) reads, through vgg's 3x3 Convs (padding 1) and
    2x2 pools."""
    pools = [i for i, module in enumerate(features) if isinstance(module, torch.nn.MaxPool2d)]
    rows, cols = [2 * row, 2 * row + 1], [2 * col, 2 * col + 1]
    for module in reversed(features[:pools[pool]]):
        if isinstance(module, torch.nn.Conv2d):
            rows, cols = [rows[0] - 1, rows[1] + 1], [cols[0] - 1, cols[1] + 1]
        elif isinstance(module, torch.nn.MaxPool2d):
            rows, cols = [2 * rows[0], 2 * rows[1] + 1], [2 * cols[0], 2 * cols[1] + 1]
    return slice(max(rows[0], 0), min(rows[1], size - 1) + 1), slice(max(cols[0], 0), min(cols[1], size - 1) + 1)


def switched_fields(model, net, x: np.ndarray) -> np.ndarray:
    """[B, H, W]: the input pixels in the receptive field of a window float32 switches (`float32_switches`)."""
    excluded = np.zeros((x.shape[0], *x.shape[2:]), dtype=bool)
    for sample, pool, channel, row, col in float32_switches(model, net, x):
        print(f"float32 switches MaxPool {pool} window (sample {sample}, channel {channel}, ({row}, {col}))")
        excluded[(sample, *receptive_field(net.features, pool, row, col, x.shape[2]))] = True
    return excluded


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request):
    from camrt_exporters.export import export_torch

    torch.manual_seed(0)
    net = getattr(torchvision.models, request.param)(weights=None).eval()
    randomize_batchnorm(net)
    size = MODELS[request.param][0]
    model, _ = export_torch(net, input_size=(size, size), rules=list(RULE_SETS))
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    excluded = switched_fields(model, net, x) if request.param == "vgg11_bn" else None
    return {"name": request.param, "net": net, "x": x, "outputs": run_file(model, x, TARGETS), "float64": {},
            "excluded": excluded}


def zennit_truth(exported, rule_set: str) -> np.ndarray:
    """zennit's float64 relevance, computed once per model and rule set (vgg11_bn at 224 takes a while)."""
    if rule_set not in exported["float64"]:
        exported["float64"][rule_set] = zennit_float64(
            exported["net"], exported["x"], exported["outputs"][contract.TARGET_INDEX_OUTPUT], rule_set,
            MODELS[exported["name"]][1]())
    return exported["float64"][rule_set]


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_relevance_is_close_to_zennit(exported, rule_set):
    outputs = exported["outputs"]
    errors = l2_rel_per_sample(outputs[contract.input_gradient_output(rule_set)], zennit_truth(exported, rule_set))
    print(f"{exported['name']} {rule_set}: relative L2 to zennit float64 {errors}")
    assert errors.max() <= L2_REL, f"{exported['name']} {rule_set}: relative L2 to zennit float64 {errors}"


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_relevance_equals_zennit(exported, rule_set):
    """Max-relative 1e-4 per sample (lrp_oracle.py), over every pixel but the receptive fields of the MaxPool
    windows float32 switches (vgg11_bn: one window, 10 x 10 pixels of one sample, where the error is
    1.4e-4 to 2.5e-4; the relative L2 test above covers them)."""
    outputs, excluded = exported["outputs"], exported["excluded"]
    if excluded is not None:
        assert excluded.mean() < 0.01, f"float32 MaxPool switches cover {excluded.mean():.1%} of the input"
    canonizers = MODELS[exported["name"]][1]()
    assert_matches_zennit(outputs[contract.input_gradient_output(rule_set)], exported["net"], exported["x"],
                          outputs[contract.TARGET_INDEX_OUTPUT], rule_set, canonizers, exported["name"],
                          truth=zennit_truth(exported, rule_set), excluded=excluded)
