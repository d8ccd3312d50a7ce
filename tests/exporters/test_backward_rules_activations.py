"""Finite-difference checks of the activation, Max/Min, PRelu and reduction backward rules
(the harness: tests/exporters/rule_harness.py)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from camrt_exporters.autodiff.graph import GraphIndex
from camrt_exporters.autodiff.reverse import ForwardPatches, differentiate
from camrt_exporters.autodiff.rules import VANILLA

from .rule_harness import (
    FEW,
    SOME,
    Case,
    away_from,
    broadcast_partner,
    check,
    distinct,
    gradient_model,
    node,
    seeds,
    shapes,
)


def _normal(rng, shape):
    return rng.standard_normal(shape) * 1.5


UNARY = {
    "Elu": lambda rng, s: away_from(rng, s, -3, 2, kinks=[0]),
    "Selu": lambda rng, s: away_from(rng, s, -3, 2, kinks=[0]),
    "ThresholdedRelu": lambda rng, s: away_from(rng, s, -1, 3, kinks=[1.0]),
    "Mish": _normal,
    "Softsign": lambda rng, s: away_from(rng, s, -3, 3, kinks=[0]),
    "Sin": _normal,
    "Cos": _normal,
    # piecewise constant: away from the jumps (Round's at half-integers), FD gives 0 too
    "Sign": lambda rng, s: away_from(rng, s, -2, 2, kinks=[0]),
    "Floor": lambda rng, s: away_from(rng, s, -2.9, 2.9, kinks=[-2, -1, 0, 1, 2]),
    "Ceil": lambda rng, s: away_from(rng, s, -2.9, 2.9, kinks=[-2, -1, 0, 1, 2]),
    "Round": lambda rng, s: away_from(rng, s, -2.4, 2.4, kinks=[-1.5, -0.5, 0.5, 1.5]),
}


@FEW
@given(x_shape=shapes(), seed=seeds, alpha=st.floats(0.3, 2.0))
def test_elu_alpha(x_shape, seed, alpha):
    rng = np.random.default_rng(seed)
    check(Case([node("Elu", ["X"], alpha=alpha)], away_from(rng, x_shape, -3, 2, kinks=[0])), rng)


@FEW
@given(x_shape=shapes(), seed=seeds, alpha=st.floats(0.3, 2.0))
def test_celu(x_shape, seed, alpha):
    """Celu is float32-only in ONNX, so no float64 harness: onnxruntime's float32 gradient against
    the closed form dy/dx = 1 for x > 0, exp(x/alpha) otherwise."""
    rng = np.random.default_rng(seed)
    x = away_from(rng, x_shape, -3, 2, kinks=[0])
    case = Case([node("Celu", ["X"], alpha=alpha)], x)
    g = rng.standard_normal(x_shape)
    session = ort.InferenceSession(gradient_model(case, np.float32).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    _, dx = session.run(None, {"X": x.astype(np.float32), "G": g.astype(np.float32)})
    np.testing.assert_allclose(dx, g * np.where(x > 0, 1.0, np.exp(x / alpha)), rtol=1e-5, atol=1e-6)


@FEW
@given(x_shape=shapes(), seed=seeds, alpha=st.floats(0.5, 2.0), gamma=st.floats(0.5, 2.0))
def test_selu_attributes(x_shape, seed, alpha, gamma):
    rng = np.random.default_rng(seed)
    check(Case([node("Selu", ["X"], alpha=alpha, gamma=gamma)], away_from(rng, x_shape, -3, 2, kinks=[0])), rng)


@FEW
@given(x_shape=shapes(min_rank=3), seed=seeds, per_channel=st.booleans())
def test_prelu(x_shape, seed, per_channel):
    """Slope per channel ([C, 1, ...], as torch exports it) or a scalar, a constant."""
    rng = np.random.default_rng(seed)
    slope_shape = [x_shape[1]] + [1] * (len(x_shape) - 2) if per_channel else [1]
    slope = rng.uniform(-0.5, 0.5, slope_shape)
    check(Case([node("PRelu", ["X", "S"])], away_from(rng, x_shape, -2, 2, kinks=[0]), {"S": slope}), rng)


@pytest.mark.parametrize("op", ["Max", "Min"])
@SOME
@given(data=st.data(), x_shape=shapes(), seed=seeds, operands=st.integers(1, 3))
def test_max_min(op, data, x_shape, seed, operands):
    """Variadic with constants that broadcast to X; values pairwise distinct (no ties)."""
    rng = np.random.default_rng(seed)
    inits, inputs = {}, ["X"]
    for i in range(operands - 1):
        w_shape, _ = data.draw(broadcast_partner(x_shape, widen=False))
        inits[f"W{i}"] = np.zeros(w_shape)
        inputs.append(f"W{i}")
    values = distinct(rng, [int(np.prod(x_shape))] + [int(np.prod(v.shape)) or 1 for v in inits.values()], gap=0.05)
    x = rng.permutation(values.ravel())[: int(np.prod(x_shape))].reshape(x_shape)
    pool = np.setdiff1d(distinct(rng, (256,), gap=0.05) + 20.0, x)  # disjoint from X
    offset = 0
    for name, v in inits.items():
        inits[name] = pool[offset:offset + v.size].reshape(v.shape) * rng.choice([-1.0, 1.0])
        offset += v.size
    perm = data.draw(st.permutations(inputs))
    check(Case([node(op, perm)], x, inits), rng)


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_ties_split(op):
    """Tied operands share the gradient equally (torch's maximum/minimum): a closed form, with a
    broadcast operand tying two of X's elements, and Max(X, X) whose derivative is exactly 1."""
    x = np.array([[1.0, 2.0, -1.0]]) * (1 if op == "Max" else -1)
    w = np.array([2.0]) * (1 if op == "Max" else -1)
    g = np.array([[0.6, -1.0, 0.3]])
    # Max(X, W, X): W wins at 0 and 2; at 1 a three-way tie, X's two occurrences get 2 * g / 3
    for inputs, want in ((["X", "W", "X"], [[0.0, -2.0 / 3, 0.0]]), (["X", "X"], g)):
        case = Case([node(op, inputs)], x, {"W": w})
        session = ort.InferenceSession(gradient_model(case, np.float32).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        _, dx = session.run(None, {"X": x.astype(np.float32), "G": g.astype(np.float32)})
        np.testing.assert_allclose(dx, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceMean"])
@SOME
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds, keepdims=st.sampled_from([None, 0, 1]),
       opset=st.sampled_from([13, 18]))
def test_reduce(op, data, x_shape, seed, keepdims, opset):
    """Axes as an attribute (opset 13) or a constant input (18), negative axes, keepdims;
    distinct values for ReduceMax/Min (no ties)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    attrs = {} if keepdims is None else {"keepdims": keepdims}
    axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=rank - 1, unique=True))
    axes = [a - rank if data.draw(st.booleans()) else a for a in axes]
    inits, inputs = {}, ["X"]
    uses_input = opset >= 18 or op == "ReduceSum"
    if uses_input:
        inits["axes"] = np.array(axes, dtype=np.int64)
        inputs.append("axes")
    else:
        attrs["axes"] = axes
    x = distinct(rng, x_shape) if op in ("ReduceMax", "ReduceMin") else rng.standard_normal(x_shape)
    check(Case([node(op, inputs, **attrs)], x, inits, opset=opset), rng)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@FEW
@given(seed=seeds)
def test_reduce_extremum_ties_share(op, seed):
    """Tied extrema share the gradient equally (torch's amax/amin): a closed form."""
    rng = np.random.default_rng(seed)
    x = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 0.5, 0.5]]) * (1 if op == "ReduceMax" else -1)
    case = Case([node(op, ["X", "axes"], keepdims=0)], x, {"axes": np.array([1])})
    g = rng.standard_normal(2)
    session = ort.InferenceSession(gradient_model(case, np.float32).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    _, dx = session.run(None, {"X": x.astype(np.float32), "G": g.astype(np.float32)})
    expected = np.array([[0, g[0] / 2, g[0] / 2, 0], [g[1] / 3, 0, g[1] / 3, g[1] / 3]])
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-6)



# --------------------------------------------------------------------------------------------
# reductions and normalisations over symbolic (dynamic) dims: torch's exports with dynamic axes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2"])
@SOME
@given(data=st.data(), x_shape=shapes(min_rank=3, max_rank=4), seed=seeds, keepdims=st.sampled_from([0, 1]),
       with_batch=st.booleans())
def test_reduce_over_symbolic_axes(op, data, x_shape, seed, keepdims, with_batch):
    """Reduced axes with symbolic dims, the dynamic batch among them or not (ReduceMean's count
    is then taken at run time)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=rank - 1, unique=True))
    symbolic = tuple(data.draw(st.lists(st.sampled_from(axes), min_size=1, unique=True)))
    axes = [0, *axes] if with_batch else axes
    x = distinct(rng, x_shape) if op == "ReduceMax" else rng.standard_normal(x_shape)
    case = Case([node(op, ["X", "axes"], keepdims=keepdims)], x, {"axes": np.array(axes, dtype=np.int64)},
                batch_independent=not with_batch, symbolic_axes=symbolic)
    check(case, rng)


@FEW
@given(x_shape=shapes(min_rank=3, max_rank=4), seed=seeds)
def test_global_average_pool_symbolic_spatial(x_shape, seed):
    rng = np.random.default_rng(seed)
    symbolic = tuple(range(2, len(x_shape)))
    check(Case([node("GlobalAveragePool", ["X"])], rng.standard_normal(x_shape), symbolic_axes=symbolic), rng)


@FEW
@given(x_shape=shapes(min_rank=3, max_rank=3), seed=seeds)
def test_layer_normalization_symbolic_sequence(x_shape, seed):
    """[batch, tokens, features] with a symbolic token count, normalised over tokens and features."""
    rng = np.random.default_rng(seed)
    assume(x_shape[1] * x_shape[2] >= 3)
    case = Case([node("LayerNormalization", ["X", "scale"], axis=1)], rng.standard_normal(x_shape) * 2,
                {"scale": rng.standard_normal(x_shape[1:])}, symbolic_axes=(1,))
    check(case, rng)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@FEW
@given(x_shape=shapes(min_rank=3, max_rank=3), seed=seeds)
def test_softmax_symbolic_axis(op, x_shape, seed):
    rng = np.random.default_rng(seed)
    check(Case([node(op, ["X"], axis=-1)], rng.standard_normal(x_shape), symbolic_axes=(1, 2)), rng)


#: ops whose rules this file tests (test_backward_rules.py checks every VANILLA rule is tested)
TESTED_OPS = {*UNARY, "Elu", "Celu", "Selu", "PRelu", "Max", "Min", "ReduceMax", "ReduceMin", "ReduceL2",
              "ReduceSumSquare"}


# --------------------------------------------------------------------------------------------
# torch's legacy exporter (opset 17, dynamic batch and spatial dims) against torch autograd
# --------------------------------------------------------------------------------------------


def test_torch_legacy_export_matches_autograd():
    """A ConvNeXt-V2 GRN (ReduceL2), GroupNorm (exported as InstanceNormalization), PReLU, Mish,
    Max, Sin, Selu, amax (ReduceMax) and means over dynamic H, W: d<G, Y>/dX against autograd."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.GroupNorm(2, 4)
            self.prelu = torch.nn.PReLU(4)

        def forward(self, x):
            x = torch.nn.functional.mish(self.prelu(self.norm(x))).permute(0, 2, 3, 1)
            gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
            y = (0.7 * (x * gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + x).permute(0, 3, 1, 2)
            y = torch.maximum(y, torch.tensor(0.05)).sin() + torch.nn.functional.selu(y)
            return y.amax(dim=2).mean(dim=2, keepdim=True) + y.mean((2, 3)).unsqueeze(-1)

    torch.manual_seed(0)
    block = Block().eval()
    x, g = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 1)
    buffer = io.BytesIO()
    torch.onnx.export(block, (x,), buffer, input_names=["X"], output_names=["Y"], opset_version=17, dynamo=False,
                      dynamic_axes={"X": {0: "N", 2: "H", 3: "W"}})
    model = onnx.load_from_string(buffer.getvalue())
    exported = {n.op_type for n in model.graph.node}
    assert {"InstanceNormalization", "PRelu", "ReduceL2", "Max", "Sin", "Selu", "ReduceMax", "ReduceMean"} <= exported
    patches = ForwardPatches()
    backward = differentiate(GraphIndex(model), score="Y", seed="G", wrt=["X"], rules=VANILLA, patches=patches,
                             prefix="bwd")
    graph = helper.make_graph(
        [patches.apply(n) for n in model.graph.node] + backward.nodes
        + [helper.make_node("Identity", [backward.gradients["X"]], ["dX"])],
        "gradient",
        [model.graph.input[0], helper.make_tensor_value_info("G", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("dX", TensorProto.FLOAT, None)],
        initializer=[*model.graph.initializer, *backward.initializers],
    )
    gradient = helper.make_model(graph, opset_imports=model.opset_import)
    gradient.ir_version = model.ir_version
    session = ort.InferenceSession(gradient.SerializeToString(), providers=["CPUExecutionProvider"])
    dx = session.run(None, {"X": x.numpy(), "G": g.numpy()})[0]
    x.requires_grad_()
    (block(x) * g).sum().backward()
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=0, atol=1e-5 * np.abs(x.grad.numpy()).max())
