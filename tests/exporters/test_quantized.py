"""QDQ int8 models (onnxruntime.quantization, QuantFormat.QDQ): straight-through gradients.

Oracles: the straight-through estimator in closed form (the rules on small graphs), torch's
fake-quantize autograd (`torch.fake_quantize_per_tensor_affine`, the straight-through estimator of
Jacob et al. 2018) on a torch replay of the quantized file with its own scales and zero points
(resnet18, mobilenet_v3_large), and the export self-check's straight-through surrogate, which must
refuse a wrong rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from camrt import contract
from camrt_exporters.autodiff.graph import attribute
from camrt_exporters.autodiff.rules import VANILLA
from camrt_exporters.contract_file import prepare
from camrt_exporters.errors import ValidationError
from camrt_exporters.export import export_onnx
from camrt_exporters.straight_through import differentiated_quantizer_inputs

from . import edge_models, models
from .rule_harness import FEW, Case, gradient_model, node, seeds, shapes

#: The rules checked here instead of by finite differences: a quantizer is a step function, its
#: straight-through gradient is a convention (tested in closed form and against torch's fake-quantize).
TESTED_OPS = {"QuantizeLinear", "DequantizeLinear"}

QUANTIZED = {"int8": (TensorProto.INT8, np.int8, -128, 127), "uint8": (TensorProto.UINT8, np.uint8, 0, 255)}


def _ste_case(rng, x_shape, kind, per_axis):
    """X -> QuantizeLinear -> DequantizeLinear -> Mul(W) -> Y, X spread beyond the quantized range on both sides."""
    _, np_type, qmin, qmax = QUANTIZED[kind]
    channels = x_shape[1]
    scale = rng.uniform(0.02, 0.1, channels if per_axis else ()).astype(np.float32)
    zero_point = rng.integers(qmin + 40, qmax - 40, channels if per_axis else (), endpoint=True).astype(np_type)
    span = (qmax - qmin) * float(np.max(scale))
    x = rng.uniform(-span, span, x_shape)
    inits = {"S": scale, "Z": zero_point, "W": rng.standard_normal(x_shape[1:])}
    nodes = [node("QuantizeLinear", ["X", "S", "Z"], ["Q"], axis=1), node("DequantizeLinear", ["Q", "S", "Z"], ["D"], axis=1),
             node("Mul", ["D", "W"])]
    return Case(nodes, x, inits), scale, zero_point, qmin, qmax


@FEW
@given(x_shape=shapes(min_rank=2), seed=seeds, kind=st.sampled_from(sorted(QUANTIZED)), per_axis=st.booleans())
def test_quantize_dequantize_pair_is_straight_through(x_shape, seed, kind, per_axis):
    """dX = G * W where qmin <= round(X / s) + z <= qmax, 0 where X clipped (closed form, float64 numpy)."""
    rng = np.random.default_rng(seed)
    case, scale, zero_point, qmin, qmax = _ste_case(rng, x_shape, kind, per_axis)
    layout = [-1 if a == 1 else 1 for a in range(len(x_shape))] if per_axis else []
    s, z = scale.reshape(layout), zero_point.astype(np.float64).reshape(layout)
    unsaturated = np.rint(case.x.astype(np.float32) / s) + z
    inside = (unsaturated >= qmin) & (unsaturated <= qmax)
    g = rng.standard_normal(x_shape)
    session = ort.InferenceSession(gradient_model(case, np.float32).SerializeToString(), providers=["CPUExecutionProvider"])
    _, dx = session.run(None, {"X": case.x.astype(np.float32), "G": g.astype(np.float32)})
    np.testing.assert_allclose(dx, np.where(inside, g * case.inits["W"], 0.0), rtol=1e-5, atol=1e-6)


def test_dequantize_scales_differing_from_the_quantizer():
    """A DequantizeLinear with another scale than its QuantizeLinear: d x_hat / dx = s_dq / s_q inside the range."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 4, (3, 5))
    case = Case([node("QuantizeLinear", ["X", "S", "Z"], ["Q"]), node("DequantizeLinear", ["Q", "T", "Z"])], x,
                {"S": np.float32(0.02), "T": np.float32(0.05), "Z": np.int8(3)})
    g = rng.standard_normal(x.shape)
    session = ort.InferenceSession(gradient_model(case, np.float32).SerializeToString(), providers=["CPUExecutionProvider"])
    _, dx = session.run(None, {"X": x.astype(np.float32), "G": g.astype(np.float32)})
    unsaturated = np.rint(x.astype(np.float32) / np.float32(0.02)) + 3
    inside = (unsaturated >= -128) & (unsaturated <= 127)
    np.testing.assert_allclose(dx, np.where(inside, g * 2.5, 0.0), rtol=1e-5)
    assert 0.2 < inside.mean() < 0.8  # both branches exercised


# --------------------------------------------------------------------------------------------
# whole quantized classifiers against torch's fake-quantize autograd
# --------------------------------------------------------------------------------------------


def _constant(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32 if array.dtype.kind == "f" else np.int64))


def _along(node, value: torch.Tensor, rank: int) -> torch.Tensor:
    return value if value.numel() == 1 else value.reshape([-1 if a == attribute(node, "axis", 1) % rank else 1
                                                           for a in range(rank)])


def _fake_quantize(q_node, dq_node, x: torch.Tensor, values, at_point) -> torch.Tensor:
    """torch's fake quantization with the QuantizeLinear's scale and zero point (the pair shares them), of x
    valued as the exported file computes it (`at_point`; its gradient is torch's)."""
    x = x + (torch.from_numpy(at_point[q_node.input[0]]) - x).detach()
    scale, zero_point = values[q_node.input[1]], values[q_node.input[2]]
    assert torch.equal(scale, values[dq_node.input[1]]) and torch.equal(zero_point, values[dq_node.input[2]])
    qmin, qmax = (-128, 127) if values[q_node.input[2] + "/dtype"] == np.int8 else (0, 255)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.int(), attribute(q_node, "axis", 1), qmin, qmax)


def _pads(node) -> tuple[int, ...]:
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    assert pads[:2] == pads[2:], f"{node.name}: asymmetric pads"
    return tuple(pads[:2])


def _elementwise(n, ins):
    """The other ops of the replay (each reads `ins`, the node's input tensors)."""
    op = n.op_type
    if op == "HardSigmoid":
        return torch.clamp(ins[0] * attribute(n, "alpha", 0.2) + attribute(n, "beta", 0.5), 0, 1)
    if op == "Flatten":
        return ins[0].flatten(attribute(n, "axis", 1))
    return {"Add": torch.add, "Mul": torch.mul, "Identity": lambda x: x, "Relu": F.relu,
            "HardSwish": F.hardswish}[op](*ins)


def torch_replay(model: onnx.ModelProto, x: torch.Tensor, keep: str,
                 at_point: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized file in torch float32, each activation Q -> DQ pair a torch fake-quantize: (logits, tensor `keep`).
    `at_point`: the values of the quantizers' inputs in the exported file's run, which the replay takes as its own
    (float convolutions and integer kernels round differently, and a value off by one step flips a clipping
    switch): the comparison is then of the gradients at one point. Covers the ops onnxruntime's quantizer
    leaves in resnet18 and mobilenet_v3_large."""
    values: dict = {}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        values[init.name], values[init.name + "/dtype"] = _constant(array), array.dtype
    values[model.graph.input[0].name] = x
    quantizer_of: dict[str, onnx.NodeProto] = {}
    for n in model.graph.node:
        ins = [values.get(i) for i in n.input]
        op = n.op_type
        if op == "QuantizeLinear":
            quantizer_of[n.output[0]] = n
            out = None
        elif op == "DequantizeLinear" and n.input[0] in quantizer_of:
            q = quantizer_of[n.input[0]]
            out = _fake_quantize(q, n, values[q.input[0]], values, at_point)
        elif op == "DequantizeLinear":  # constant weights
            zero_point = ins[2] if len(ins) > 2 else torch.zeros(())
            out = (ins[0] - _along(n, zero_point, ins[0].ndim)).float() * _along(n, ins[1], ins[0].ndim)
        elif op == "Conv":
            out = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, stride=tuple(attribute(n, "strides", [1, 1])),
                           padding=_pads(n), dilation=tuple(attribute(n, "dilations", [1, 1])), groups=attribute(n, "group", 1))
        elif op == "Gemm":
            assert attribute(n, "transB", 0) == 1 and not attribute(n, "transA", 0)
            out = F.linear(ins[0], ins[1], ins[2] if len(ins) > 2 else None)
        elif op == "MaxPool":
            out = F.max_pool2d(ins[0], tuple(attribute(n, "kernel_shape")), tuple(attribute(n, "strides")), _pads(n))
        elif op == "GlobalAveragePool":
            out = ins[0].mean(dim=(2, 3), keepdim=True)
        else:
            out = _elementwise(n, ins)
        values[n.output[0]] = out
    return values[model.graph.output[0].name], values[keep]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """name -> the QDQ int8 file of the test classifier `name` (made once per module)."""
    made = {}

    def make(name: str):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            float_path = edge_models.export_float(models.load(name), folder / "float.onnx")
            made[name] = edge_models.quantize_qdq(float_path, folder / "int8.onnx", edge_models.photo_batch())
        return made[name]

    return make


@pytest.mark.slow  # 20-60 s each (a torchvision model made, quantized, exported and replayed in torch)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_int8_gradients_match_torch_fake_quantize(name, quantized):
    """The exported int8 file's layer and input gradients against torch autograd through fake-quantize with the
    file's scales and zero points, on four photographs, at the file's own forward values (see torch_replay).
    Measured relative L2 errors: resnet18 6e-8 (layer), 2e-6 (input); mobilenet_v3_large 2e-7, 1e-6."""
    int8_path = quantized(name)
    exported, _ = export_onnx(int8_path, rules=("vanilla",))
    layer = json_layers(exported)[0]
    x = edge_models.photo_batch()
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT, contract.gradient_output(layer),
             contract.input_gradient_output("vanilla")]
    logits, targets, layer_grad, input_grad = session.run(
        names, {"input": x, contract.TARGET_INPUT: np.full(len(x), contract.TOP1_TARGET, np.int64)})
    image = torch.from_numpy(x).requires_grad_(True)
    at_point = differentiated_quantizer_inputs(prepare(onnx.load(str(int8_path))), exported, {"input": x})
    torch_logits, tensor = torch_replay(onnx.load(str(int8_path)), image, layer, at_point)
    tensor.retain_grad()
    torch_logits[torch.arange(len(x)), torch.from_numpy(targets)].sum().backward()
    for got, want in ((layer_grad, tensor.grad.numpy()), (input_grad, image.grad.numpy())):
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
    np.testing.assert_allclose(logits, torch_logits.detach().numpy(), atol=1e-3 * np.abs(logits).max())


def _ste_without_clipping(ctx, node, grads):
    """A wrong QuantizeLinear rule: passes the gradient everywhere (every ReLU folded into a clip vanishes)."""
    return [ctx.emit("Div", [grads[0], node.input[1]])] + [None] * (len(node.input) - 1)


def test_self_check_refuses_a_wrong_straight_through_rule(quantized, monkeypatch):
    """The export self-check (finite differences of the straight-through surrogate) passes the int8 file and
    refuses one whose QuantizeLinear rule ignores clipping."""
    _, checks = export_onnx(quantized("resnet18"), rules=("vanilla",))
    assert checks and all(c.ok and c.resolved for c in checks)
    monkeypatch.setitem(VANILLA.rules, "QuantizeLinear", _ste_without_clipping)
    with pytest.raises(ValidationError):
        export_onnx(quantized("resnet18"), rules=("vanilla",))


def json_layers(model: onnx.ModelProto) -> list[str]:
    import json

    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta[contract.META_LAYERS])

