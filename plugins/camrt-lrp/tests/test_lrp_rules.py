"""The three LRP rule sets against zennit 0.5.1 on two small CNNs (lrp_oracle.py: oracle and tolerance).

- `biased`: Conv-BN-ReLU, a residual block (BN folded, the addition Norm-ruled: zennit.layer.Sum), MaxPool,
  a strided Conv, global average pooling (Norm), two Linear layers with biases (epsilon). Exported as
  `camrt export` does it: torch's ONNX optimiser folds BatchNorm into the Conv.
- `bias_free`: the same net without any bias (BatchNorm's mean and shift 0, its scale random),
  exported with --fullgrad, which keeps BatchNormalization nodes: the plugin folds them itself. Without
  biases no relevance is absorbed, so conservation must hold: sum of the input relevance = the target
  score (the method's starting relevance), within CONSERVATION_REL (the stabilisers, 1e-6 per division,
  and float32 round-off; measured 1.8e-5..2.2e-5), checked with the method below.
- the heatmap method end to end through `camrt.Explainer`, against the channel sum of zennit's relevance
  for the output relevance one-hot * score.
- `near_cancelling_net`: a residual sum a + b with b close to -a, where the Norm rule's shares a / (a + b)
  magnify any change of a or b a hundredfold. It pins the oracle's ExactMergeBatchNorm (lrp_oracle.py):
  zennit 0.5.1's own merge leaves each BatchNorm computing x / sqrt(1 + eps), which here moves zennit's
  relevance by 1.2e-2..3.8e-2 (max-relative; camrt is within 1.2e-5 of the exact merge), far beyond the
  tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lrp_oracle import (
    MAX_REL,
    RULE_SETS,
    ExactMergeBatchNorm,
    assert_matches_zennit,
    max_rel_per_sample,
    randomize_batchnorm,
    run_file,
    sum_modules,
    zennit_relevance,
)

from camrt import contract

CONSERVATION_REL = 1e-4
SIZE = 16
TARGETS = np.array([contract.TOP1_TARGET, 2], np.int64)


class Residual(torch.nn.Module):
    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.canonizer_sum = None

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = x + out if self.canonizer_sum is None else self.canonizer_sum(torch.stack([x, out], dim=-1))
        return self.relu(out)


def small_net(bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=bias), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        Residual(8, bias), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=bias), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 12, bias=bias), torch.nn.ReLU(), torch.nn.Linear(12, 5, bias=bias),
    ).eval()
    randomize_batchnorm(net)
    if not bias:
        with torch.no_grad():
            for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.running_mean.zero_()
                bn.bias.zero_()
    return net


@pytest.fixture(scope="module", params=["biased", "bias_free"])
def exported(request, tmp_path_factory):
    from camrt_exporters.export import export_torch, write_model

    net = small_net(bias=request.param == "biased")
    fullgrad = request.param == "bias_free"
    model, _ = export_torch(net, input_size=(SIZE, SIZE), rules=[contract.RULE_VANILLA, *RULE_SETS], fullgrad=fullgrad)
    batchnorms = sum(1 for node in model.graph.node if node.op_type == "BatchNormalization")
    assert (batchnorms > 0) == fullgrad, "the unfolded case needs BatchNormalization nodes in the file"
    path = tmp_path_factory.mktemp("lrp") / "net.camrt.onnx"
    write_model(model, path)
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return {"kind": request.param, "net": net, "model": model, "path": str(path), "x": x,
            "outputs": run_file(model, x, TARGETS)}


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_relevance_equals_zennit(exported, rule_set):
    outputs = exported["outputs"]
    targets = outputs[contract.TARGET_INDEX_OUTPUT]
    with sum_modules([exported["net"][3]]):
        assert_matches_zennit(outputs[contract.input_gradient_output(rule_set)], exported["net"], exported["x"],
                              targets, rule_set, what=exported["kind"])


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_method_map_is_the_channel_sum_of_score_relevance(exported, rule_set):
    from camrt import Explainer
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(exported["path"], method=rule_set)
    x = exported["x"]
    outputs = GraphOutputs(explainer.session.run(x, TARGETS, explainer.fetch), x)
    maps = explainer.method.explain(outputs, layer=None)
    targets = outputs.target_index
    with sum_modules([exported["net"][3]]):
        reference = zennit_relevance(exported["net"], x, targets, rule_set)
    score = exported["net"](torch.from_numpy(x)).detach().numpy()[np.arange(len(targets)), targets]
    expected = (reference * score[:, None, None, None]).sum(axis=1)
    errors = max_rel_per_sample(maps, expected)
    assert errors.max() <= MAX_REL, f"{rule_set}: {errors}"
    if exported["kind"] == "bias_free":  # conservation: the relevance sums to the target score
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), score, rtol=CONSERVATION_REL)
        relevance = outputs.input_gradient(rule_set).astype(np.float64)  # for the output relevance one-hot
        np.testing.assert_allclose(relevance.sum(axis=(1, 2, 3)), 1.0, rtol=0, atol=CONSERVATION_REL)


def test_conv_transpose_is_refused_not_differentiated():
    from camrt_exporters import ExportError
    from camrt_exporters.export import export_torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ConvTranspose2d(4, 4, 2, stride=2),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    with pytest.raises(ExportError, match="ConvTranspose.*no LRP rule"):
        export_torch(net, input_size=(8, 8), rules=[RULE_SETS[0]])


class NearCancellingResidual(torch.nn.Module):
    """x + b, b = BatchNorm(Conv1x1(x)) = -0.99 x + a small shift: the sum is about a hundredth of either."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels, eps=1e-3)
        self.canonizer_sum = None
        with torch.no_grad():
            self.conv.weight.copy_(-0.99 * torch.eye(channels).view(channels, channels, 1, 1))
            self.bn.bias.copy_(torch.linspace(-0.01, 0.01, channels))

    def forward(self, x):
        out = self.bn(self.conv(x))
        return x + out if self.canonizer_sum is None else self.canonizer_sum(torch.stack([x, out], dim=-1))


def near_cancelling_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4, eps=1e-3), NearCancellingResidual(4),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():  # a BatchNorm that is not the identity before the merge (the block's keeps mean 0, var 1)
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, -0.1]))
        net[1].running_var.copy_(torch.tensor([0.5, 1.5, 0.8, 1.2]))
    return net


def test_the_oracle_merge_keeps_the_function():
    """ExactMergeBatchNorm's canonized net computes the net's logits (float64): zennit explains the given net."""
    from zennit.core import Composite

    net = near_cancelling_net().double()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)))
    want, before = net(x), {name: value.clone() for name, value in net.state_dict().items()}
    with Composite(canonizers=[ExactMergeBatchNorm()]).context(net):
        got = net(x)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-12, atol=0)
    after = net.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items()), "the merge was not undone"
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)), "eps was not restored"


@pytest.fixture(scope="module")
def near_cancelling():
    from camrt_exporters.export import export_torch

    net = near_cancelling_net()
    model, _ = export_torch(net, input_size=(SIZE, SIZE), rules=list(RULE_SETS))
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return net, x, run_file(model, x, TARGETS)


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_relevance_equals_zennit_where_the_residual_sum_nearly_cancels(near_cancelling, rule_set):
    net, x, outputs = near_cancelling
    with sum_modules([net[2]]):
        assert_matches_zennit(outputs[contract.input_gradient_output(rule_set)], net, x,
                              outputs[contract.TARGET_INDEX_OUTPUT], rule_set, what="near-cancelling")
