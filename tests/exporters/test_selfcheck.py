"""The export self-checks accept correct gradients and refuse wrong ones.

ONNX front end (finite differences): real torchvision models whose correct gradients the old check
refused pass, and rule sets with one deliberately wrong backward rule are refused by both the
input-gradient and the layer-gradient check, while the unmutated set passes on the same model. A
YOLOv8-style DFL head whose score curves within the usual steps passes on the smaller ones, its
gradients equal to torch float64 autograd, and negated rules are still refused there.
Torch front end: with no input-gradient rule sets the layer tensors are still checked, and a
failing model factory is a one-line export error.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner

from camrt import contract
from camrt.cli import build_cli
from camrt.errors import ExitCode
from camrt_exporters import export as export_module
from camrt_exporters import validate as validate_module
from camrt_exporters.autodiff.reverse import RuleSet
from camrt_exporters.autodiff.rules import VANILLA, linear, pooling
from camrt_exporters.errors import ValidationError
from camrt_exporters.export import export_onnx, export_torch
from camrt_exporters.validate import FD_REL, random_seed, run_contract
from tests.helpers import tiny_onnx

from .tiny_models import conv_relu_maxpool_gap_gemm_softmax

SIZE = 16


class Residual(torch.nn.Module):
    """Conv -> Relu -> (Conv -> Relu) + skip -> AveragePool -> Conv -> Relu -> GAP -> square Gemm:
    every op a mutation below targets, above the layer `relu1`."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()
        self.conv2, self.relu2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()
        self.pool = torch.nn.AvgPool2d(2)
        self.conv3, self.relu3 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        a = self.relu1(self.conv1(x))
        b = self.relu2(self.conv2(a)) + a
        c = self.relu3(self.conv3(self.pool(b)))
        return self.fc(self.gap(c).flatten(1))


def residual_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Residual().eval()


def legacy_onnx(model: torch.nn.Module, path, size: int) -> str:
    """torch's legacy (TorchScript) exporter with a dynamic batch, as the issue's repros."""
    torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "b"}})
    return str(path)


@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory) -> tuple[str, str]:
    """The Residual model as a plain ONNX file and the name of relu1's output tensor in it."""
    path = legacy_onnx(residual_model(), tmp_path_factory.mktemp("residual") / "residual.onnx", SIZE)
    relu1 = [n.output[0] for n in onnx.load(path).graph.node if n.name == "/relu1/Relu"]
    return path, relu1[0]


# Mutated backward rules: each wraps or replaces the real VANILLA rule for one op type.

def negated(op_type: str):
    real = VANILLA.rules[op_type]

    def rule(ctx, node, grads):
        return [ctx.emit("Neg", [g]) if g is not None else None for g in real(ctx, node, grads)]

    return rule


def add_dropping_second_operand(ctx, node, grads):
    first, *_ = VANILLA.rules["Add"](ctx, node, grads)
    return [first] + [None] * (len(node.input) - 1)


def gemm_without_weight_transpose(ctx, node, grads):
    """The real rule on a copy of the node whose transB is flipped: g @ W instead of g @ W^T
    (runs because the Gemm's weight is square)."""
    flipped = copy.deepcopy(node)
    trans_b = [a for a in flipped.attribute if a.name == "transB"]
    if trans_b:
        trans_b[0].i = 1 - trans_b[0].i
    else:
        flipped.attribute.append(onnx.helper.make_attribute("transB", 1))
    return linear.gemm(ctx, flipped, grads)


def global_average_pool_dividing_by_height(ctx, node, grads):
    x = node.input[0]
    return [pooling._broadcast_back(ctx, grads[0], x, 1.0 / ctx.static_shape(x)[2])]


def average_pool_dividing_by_kernel_width(ctx, node, grads):
    """The real rule scaled by the kernel height: divides a 2x2 window's gradient by 2, not 4."""
    (dx,) = VANILLA.rules["AveragePool"](ctx, node, grads)
    kernel = [a.ints for a in node.attribute if a.name == "kernel_shape"][0]
    return [ctx.mul(dx, ctx.const(float(kernel[0]), like=node.input[0]))]


MUTATIONS = {
    "Conv negated": ("Conv", negated("Conv")),
    "Relu negated": ("Relu", negated("Relu")),
    "Add drops its second operand": ("Add", add_dropping_second_operand),
    "Gemm weight not transposed": ("Gemm", gemm_without_weight_transpose),
    "GlobalAveragePool divides by H, not H*W": ("GlobalAveragePool", global_average_pool_dividing_by_height),
    "AveragePool divides by the kernel width, not its area": ("AveragePool", average_pool_dividing_by_kernel_width),
}


def mutated_vanilla(op_type: str, rule) -> RuleSet:
    return RuleSet(contract.RULE_VANILLA, {**VANILLA.rules, op_type: rule})


@pytest.fixture
def use_vanilla(monkeypatch):
    """Make the export use the given rule set as vanilla (layer gradients and the input gradient)."""

    def install(rule_set: RuleSet, input_rule_sets: bool = True):
        monkeypatch.setattr(export_module, "resolve_rule_sets",
                            lambda names: (rule_set, [rule_set] if input_rule_sets else []))

    return install


def test_unmutated_rules_pass_on_the_mutation_model(residual_onnx, use_vanilla):
    path, relu1 = residual_onnx
    use_vanilla(VANILLA)
    _, checks = export_onnx(path, layers=[relu1], rules=[contract.RULE_VANILLA])
    fd = {c.name: c for c in checks if c.kind.startswith("finite-difference")}
    assert set(fd) == {contract.input_gradient_output(contract.RULE_VANILLA), contract.gradient_output(relu1)}
    assert all(c.error <= FD_REL for c in fd.values()), [c.describe() for c in fd.values()]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_wrong_backward_rule_is_refused_by_the_input_and_the_layer_check(residual_onnx, use_vanilla, mutation):
    path, relu1 = residual_onnx
    use_vanilla(mutated_vanilla(*MUTATIONS[mutation]))
    with pytest.raises(ValidationError) as refused:
        export_onnx(path, layers=[relu1], rules=[contract.RULE_VANILLA])
    refused_tensors = {m.split(":")[0] for m in refused.value.mismatches}
    assert refused_tensors >= {contract.input_gradient_output(contract.RULE_VANILLA), contract.gradient_output(relu1)}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_real_models_with_correct_gradients_pass(tmp_path, name):
    """At 112x112 the old check refused both (resnet18 0.153, mobilenet_v3_large 0.069 > 0.02)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    _, checks = export_onnx(legacy_onnx(model, tmp_path / f"{name}.onnx", 112), rules=[contract.RULE_VANILLA])
    fd = [c for c in checks if c.kind.startswith("finite-difference")]
    assert len(fd) == 2 and all(c.ok for c in fd)


@pytest.mark.parametrize("make", [conv_relu_maxpool_gap_gemm_softmax, lambda: tiny_onnx()[0]],
                         ids=["conv_relu_maxpool_gap_gemm_softmax", "tiny_onnx"])
def test_tiny_onnx_models_pass(tmp_path, make):
    onnx.save(make(), str(tmp_path / "tiny.onnx"))
    _, checks = export_onnx(tmp_path / "tiny.onnx", rules=[contract.RULE_VANILLA])
    assert sum(c.kind.startswith("finite-difference") and c.ok for c in checks) == 2


def test_torch_front_end_checks_layer_gradients_without_input_rule_sets(use_vanilla):
    use_vanilla(VANILLA, input_rule_sets=False)
    _, checks = export_torch(residual_model(), layers=["relu1"], input_size=(SIZE, SIZE), rules=[])
    assert {contract.activation_output("relu1"), contract.gradient_output("relu1")} <= {c.name for c in checks}


def test_torch_front_end_refuses_a_wrong_layer_gradient_without_input_rule_sets(use_vanilla):
    use_vanilla(mutated_vanilla(*MUTATIONS["Conv negated"]), input_rule_sets=False)
    with pytest.raises(ValidationError) as refused:
        export_torch(residual_model(), layers=["relu1"], input_size=(SIZE, SIZE), rules=[])
    assert [m.split(":")[0] for m in refused.value.mismatches] == [contract.gradient_output("relu1")]


def test_a_failing_model_factory_is_a_one_line_export_error(tmp_path, monkeypatch, exporters_plugin):  # noqa: F811
    (tmp_path / "offline_zoo.py").write_text(
        "import urllib.error\n\n\ndef pretrained():\n"
        "    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(build_cli(), ["export", "offline_zoo:pretrained", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == ExitCode.MODEL_ERROR, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "'offline_zoo:pretrained' failed: URLError" in message
    assert not (tmp_path / "x.onnx").exists()


def test_a_check_whose_tolerance_admits_any_gradient_is_not_resolved():
    """Errors are relative to ||g||: a tolerance of 1 or more passes even a gradient of the wrong sign,
    so `camrt export` logs such a check as UNVERIFIED instead of validated."""
    from camrt_exporters.validate import Check

    assert Check("g", 0.5, 0.02 + 1e-3, "finite-difference").resolved
    unresolved = Check("g", 2.0, 4e7, "finite-difference")
    assert unresolved.ok and not unresolved.resolved


class DflBoxHead(torch.nn.Module):
    """A YOLOv8-style raw head [B, 4 + 3, N]: box distances as the expectation of a 16-bin softmax
    (DFL: a Conv with fixed arange weights), decoded to cx, cy, w, h in pixels (dist2bbox x stride),
    and sigmoid class scores. `gain` sharpens the softmaxes so that the score curves within the
    self-check's usual steps, as ultralytics' YOLOv8n does (docs/targets.md)."""

    def __init__(self, gain: float, bins: int = 16, stride: float = 8.0):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.box = torch.nn.Conv2d(16, 4 * bins, 3, stride=2, padding=1)
        self.cls = torch.nn.Conv2d(16, 3, 3, stride=2, padding=1)
        self.dfl = torch.nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)
        self.bins, self.stride, self.gain = bins, stride, gain

    def forward(self, x):
        features = torch.nn.functional.silu(self.stem(x))
        logits = self.box(features) * self.gain
        b, _, h, w = logits.shape
        bins = logits.view(b, 4, self.bins, h * w).transpose(2, 1).softmax(1)
        distances = self.dfl(bins).view(b, 4, h * w)
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        anchors = torch.stack((xs.flatten(), ys.flatten()))[None].to(x.dtype)
        left_top, right_bottom = distances.chunk(2, 1)
        x1y1, x2y2 = anchors - left_top, anchors + right_bottom
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.stride
        return torch.cat((boxes, self.cls(features).view(b, 3, h * w).sigmoid()), 1)


DFL_SIZE, DFL_GAIN = 32, 2000.0


@pytest.fixture(scope="module")
def dfl_onnx(tmp_path_factory) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = DflBoxHead(DFL_GAIN).eval()
    return model, legacy_onnx(model, tmp_path_factory.mktemp("dfl") / "dfl.onnx", DFL_SIZE)


def test_a_head_curving_within_the_usual_steps_passes_on_the_small_ones(dfl_onnx, monkeypatch):
    """The DFL head's exported gradients fed a random seed equal torch float64 autograd (2.9e-4 at the
    stem, 3.0e-4 at the input), yet differences at the usual steps (down to 3e-3 of RMS) are 0.09..0.15
    off them: the score curves there (YOLOv8n's ONNX export: 0.03..0.17). The smaller steps resolve it."""
    model, path = dfl_onnx
    stem = "/stem/Conv_output_0"
    exported, checks = export_onnx(path, layers=[stem], rules=[contract.RULE_VANILLA], seed=True)
    assert sum(c.kind.startswith("finite-difference") and c.ok for c in checks) == 4
    x = torch.randn(2, 3, DFL_SIZE, DFL_SIZE, generator=torch.Generator().manual_seed(1))
    seed = random_seed(model(x).detach().numpy(), np.random.default_rng(1))
    got = run_contract(exported, "input", x.numpy(), np.array([0, 0]), seed)
    model64, x64 = copy.deepcopy(model).double(), x.double().requires_grad_(True)
    features = {}
    model64.stem.register_forward_hook(lambda module, inputs, output: features.setdefault("stem", output))
    score = (model64(x64) * torch.from_numpy(seed).double()).sum()
    want_stem, want_input = torch.autograd.grad(score, [features["stem"], x64])
    for name, want in ((contract.gradient_output(stem), want_stem),
                       (contract.input_gradient_output(contract.RULE_VANILLA), want_input)):
        error = float(abs(got[name] - want.numpy()).max() / abs(want.numpy()).max())
        print(f"dfl head {name}: camrt vs torch float64 autograd {error:.1e}")
        assert error < 1e-3
    monkeypatch.setattr(validate_module, "FD_SMALL_STEPS", ())
    with pytest.raises(ValidationError) as refused:
        export_onnx(path, layers=[stem], rules=[contract.RULE_VANILLA], seed=True)
    assert len(refused.value.mismatches) == 4


@pytest.mark.parametrize("op_type", ["Conv", "Softmax", "Sigmoid"])
def test_a_negated_rule_is_still_refused_on_the_curving_head(dfl_onnx, use_vanilla, op_type):
    """The small steps do not let a wrong rule through (measured errors: Conv 2.0, Softmax 2.0,
    Sigmoid, which only the class rows feel, 0.072 > 0.012). The stem's gradient crosses two negated
    Convs on the box path (the box Conv and the DFL Conv), so a negated Conv shows at the input."""
    _, path = dfl_onnx
    use_vanilla(mutated_vanilla(op_type, negated(op_type)))
    with pytest.raises(ValidationError) as refused:
        export_onnx(path, layers=["/stem/Conv_output_0"], rules=[contract.RULE_VANILLA], seed=True)
    print(f"negated {op_type}: {refused.value.mismatches}")
    input_gradient = contract.input_gradient_output(contract.RULE_VANILLA)
    assert any(m.startswith(f"{input_gradient}:") for m in refused.value.mismatches)
