"""Finite-difference checks of every backward rule (DESIGN.md, "Testing oracles").

The harness (tests/exporters/rule_harness.py) builds a tiny ONNX graph X -> op(s) -> Y, asks
`differentiate` for d<G, Y>/dX and compares float64 (reference evaluator) and float32
(onnxruntime) gradient graphs with central differences; hypothesis draws the structure.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from camrt_exporters.autodiff.graph import GraphIndex
from camrt_exporters.autodiff.reverse import ForwardPatches, differentiate
from camrt_exporters.autodiff.rules import DECONVNET, GUIDED, VANILLA
from camrt_exporters.errors import ExportError, UnsupportedOpError

from .rule_harness import (
    BATCH,
    FEW,
    RTOL_F32,
    RTOL_F64,
    SOME,
    Case,
    away_from,
    broadcast_partner,
    check,
    distinct,
    finite_differences,
    forward_model,
    gradient_model,
    node,
    pool_taps,
    reference,
    seeds,
    shapes,
    spec_pads,
)
from .test_backward_rules_activations import TESTED_OPS as ACTIVATION_AND_REDUCTION_OPS
from .test_backward_rules_activations import UNARY as ACTIVATION_UNARY
from .test_backward_rules_normalization import TESTED_OPS as NORMALIZATION_OPS
from .test_backward_rules_spatial import TESTED_OPS as SPATIAL_OPS

# --------------------------------------------------------------------------------------------
# element-wise ops
# --------------------------------------------------------------------------------------------


def _normal(rng, shape):
    return rng.standard_normal(shape) * 1.5


UNARY = {
    "Identity": _normal,
    "Neg": _normal,
    "Exp": lambda rng, s: rng.uniform(-2, 2, s),
    "Log": lambda rng, s: rng.uniform(0.5, 3, s),
    "Sqrt": lambda rng, s: rng.uniform(0.5, 3, s),
    "Reciprocal": lambda rng, s: away_from(rng, s, -2, 2, kinks=[0], margin=0.4),
    "Abs": lambda rng, s: away_from(rng, s, -2, 2, kinks=[0]),
    "Relu": lambda rng, s: away_from(rng, s, -2, 2, kinks=[0]),
    "Sigmoid": _normal,
    "Tanh": _normal,
    "Softplus": _normal,
    "Erf": _normal,
    "HardSwish": lambda rng, s: away_from(rng, s, -5, 5, kinks=[-3, 3]),
    **ACTIVATION_UNARY,  # Elu, Mish, Sin, ... (test_backward_rules_activations.py)
}


@pytest.mark.parametrize("op", sorted(UNARY))
@FEW
@given(x_shape=shapes(), seed=seeds)
def test_unary(op, x_shape, seed):
    rng = np.random.default_rng(seed)
    check(Case([node(op, ["X"])], UNARY[op](rng, x_shape)), rng)


@FEW
@given(x_shape=shapes(), seed=seeds, alpha=st.floats(0.01, 0.5), negative=st.booleans())
def test_leaky_relu(x_shape, seed, alpha, negative):
    rng = np.random.default_rng(seed)
    x = away_from(rng, x_shape, -2, 2, kinks=[0])
    check(Case([node("LeakyRelu", ["X"], alpha=-alpha if negative else alpha)], x), rng)


@FEW
@given(x_shape=shapes(), seed=seeds, alpha=st.floats(0.1, 1.0), beta=st.floats(0.0, 1.0))
def test_hard_sigmoid(x_shape, seed, alpha, beta):
    rng = np.random.default_rng(seed)
    x = away_from(rng, x_shape, -6, 6, kinks=[-beta / alpha, (1 - beta) / alpha])
    check(Case([node("HardSigmoid", ["X"], alpha=alpha, beta=beta)], x), rng)


@FEW
@given(x_shape=shapes(), seed=seeds, bounds=st.sampled_from(["", "min", "max", "both", "empty_min"]))
def test_clip(x_shape, seed, bounds):
    rng = np.random.default_rng(seed)
    low, high = sorted(rng.uniform(-1.5, 1.5, 2))
    high += 0.2
    inits = {}
    inputs = ["X"]
    if bounds in ("min", "both"):
        inits["lo"] = np.array(low)
        inputs.append("lo")
    if bounds in ("max", "both", "empty_min"):
        if bounds == "empty_min":
            inputs.append("")
        inits["hi"] = np.array(high)
        inputs.append("hi")
    x = away_from(rng, x_shape, -2.5, 2.5, kinks=[low, high])
    check(Case([node("Clip", inputs)], x, inits), rng)


@FEW
@given(x_shape=shapes(), seed=seeds, approximate=st.sampled_from(["none", "tanh"]))
def test_gelu(x_shape, seed, approximate):
    """Gelu entered the default domain in opset 20."""
    rng = np.random.default_rng(seed)
    check(Case([node("Gelu", ["X"], approximate=approximate)], _normal(rng, x_shape), opset=20), rng)


@FEW
@given(x_shape=shapes(), seed=seeds, with_ratio=st.booleans())
def test_dropout_inference(x_shape, seed, with_ratio):
    rng = np.random.default_rng(seed)
    inits = {"ratio": np.array(0.3, dtype=np.float32)} if with_ratio else {}
    inputs = ["X", "ratio"] if with_ratio else ["X"]
    check(Case([node("Dropout", inputs)], _normal(rng, x_shape), inits), rng)


@FEW
@given(x_shape=shapes(), seed=seeds)
def test_cast(x_shape, seed):
    """X -> Cast(double) -> Tanh -> Cast(X's type) -> Y: both Cast rules, one of them across types."""
    rng = np.random.default_rng(seed)
    nodes = [
        node("Cast", ["X"], ["Xd"], to=TensorProto.DOUBLE),
        node("Tanh", ["Xd"], ["T"]),
        node("CastLike", ["T", "X"]),
    ]
    check(Case(nodes, _normal(rng, x_shape)), rng)


@FEW
@given(x_shape=shapes(), seed=seeds, exponent=st.sampled_from([2.0, 3.0, 0.5, -1.0, 1.5, "tensor"]),
       integer=st.booleans())
def test_pow(x_shape, seed, exponent, integer):
    """Pow with a constant exponent: scalar (float or int64) or an element-wise tensor."""
    rng = np.random.default_rng(seed)
    if exponent == "tensor":
        p = rng.uniform(-1.5, 2.5, x_shape[1:])
    elif integer and float(exponent).is_integer():
        p = np.array(int(exponent), dtype=np.int64)
    else:
        p = np.array(exponent)
    check(Case([node("Pow", ["X", "P"])], rng.uniform(0.5, 2.0, x_shape), {"P": p}), rng)


@FEW
@given(data=st.data(), x_shape=shapes(), seed=seeds)
def test_pow_broadcast_exponent(data, x_shape, seed):
    """An exponent that broadcasts X to a larger shape: the gradient must be summed back."""
    rng = np.random.default_rng(seed)
    p_shape, _ = data.draw(broadcast_partner(x_shape))
    p = rng.uniform(-1.0, 2.5, p_shape)
    check(Case([node("Pow", ["X", "P"])], rng.uniform(0.5, 2.0, x_shape), {"P": p}), rng)


BINARY = ["Add", "Sub", "Mul", "Div", "Sum"]


@pytest.mark.parametrize("op", BINARY)
@SOME
@given(data=st.data(), x_shape=shapes(), seed=seeds, x_first=st.booleans())
def test_binary_broadcasting(op, data, x_shape, seed, x_first):
    """X op W and W op X, where either side may broadcast against the other."""
    rng = np.random.default_rng(seed)
    w_shape, _ = data.draw(broadcast_partner(x_shape))
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    if op == "Div":  # keep denominators away from zero
        x, w = (x, np.sign(w) * (np.abs(w) + 0.5)) if x_first else (np.sign(x) * (np.abs(x) + 0.5), w)
    inputs = ["X", "W"] if x_first else ["W", "X"]
    check(Case([node(op, inputs)], x, {"W": w}), rng)


@pytest.mark.parametrize("op", BINARY)
@FEW
@given(x_shape=shapes(), seed=seeds)
def test_binary_same_tensor(op, x_shape, seed):
    """X op X: one node with the same tensor twice accumulates both contributions."""
    rng = np.random.default_rng(seed)
    x = away_from(rng, x_shape, -2, 2, kinks=[0], margin=0.3)
    check(Case([node(op, ["X", "X"])], x), rng)


@FEW
@given(data=st.data(), x_shape=shapes(), seed=seeds, n_terms=st.integers(1, 4))
def test_sum_variadic(data, x_shape, seed, n_terms):
    rng = np.random.default_rng(seed)
    inits = {}
    out_shape = x_shape
    for i in range(n_terms - 1):
        w_shape, out_shape = data.draw(broadcast_partner(x_shape)) if i == 0 else (
            data.draw(broadcast_partner(out_shape, widen=False))[0], out_shape)
        inits[f"W{i}"] = rng.standard_normal(w_shape)
    inputs = data.draw(st.permutations(["X", *inits]))
    check(Case([node("Sum", inputs)], rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), x_shape=shapes(), seed=seeds, x_position=st.sampled_from([1, 2, "both"]))
def test_where(data, x_shape, seed, x_position):
    """Where(cond, a, b) with X as a, b or both, and broadcasting condition and other branch."""
    rng = np.random.default_rng(seed)
    w_shape, out_shape = data.draw(broadcast_partner(x_shape))
    c_shape = out_shape[len(out_shape) - data.draw(st.integers(0, len(out_shape) - 1)):]
    c_shape = tuple(d if data.draw(st.booleans()) else 1 for d in c_shape)
    inits = {"C": rng.uniform(size=c_shape) < 0.5}
    inputs = ["C", "X", "X"]
    if x_position != "both":
        inputs[3 - x_position] = "W"
        inits["W"] = rng.standard_normal(w_shape)
    check(Case([node("Where", inputs)], rng.standard_normal(x_shape), inits), rng)


# --------------------------------------------------------------------------------------------
# Conv, Gemm, MatMul
# --------------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    """Conv geometry: 1-3 spatial dims, groups, strides, dilations, pads or auto_pad, bias."""
    n = draw(st.sampled_from([1, 1, 2, 2, 2, 3]))
    group = draw(st.integers(1, 3))
    c_in = group * draw(st.integers(1, 2))
    m = group * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    strides = [draw(st.integers(1, 3)) for _ in range(n)]
    dilations = [draw(st.integers(1, 2)) for _ in range(n)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad.startswith("SAME"):  # onnxruntime: "Dilation not supported for AutoPadType::SAME_*"
        dilations = [1] * n
    pads = [draw(st.integers(0, 2)) for _ in range(2 * n)] if auto_pad == "NOTSET" else None
    spatial = [draw(st.integers(1, 7 if n < 3 else 4)) for _ in range(n)]
    for i in range(n):
        extent = dilations[i] * (kernel[i] - 1) + 1
        padded = spatial[i] + (pads[i] + pads[n + i] if pads else 0)
        assume(auto_pad.startswith("SAME") or padded >= extent)
    batch = draw(st.integers(1, 2))
    assume(c_in * int(np.prod(spatial)) <= 64)
    attrs = dict(strides=strides, dilations=dilations, group=group)
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    return (batch, c_in, *spatial), (m, c_in // group, *kernel), attrs, draw(st.booleans()), draw(st.booleans())


@SOME
@given(case=conv_cases(), seed=seeds)
def test_conv(case, seed):
    """Both code paths: Conv on the flipped kernel (stride 1) and ConvTranspose (strided, large
    pads, or weights that are not constants)."""
    x_shape, w_shape, attrs, bias, constant_weight = case
    rng = np.random.default_rng(seed)
    inits = {"W": rng.standard_normal(w_shape)}
    nodes = []
    w = "W"
    if not constant_weight:  # computed at run time: the rule cannot flip it
        nodes.append(node("Identity", ["W"], ["Wr"]))
        w = "Wr"
    inputs = ["X", w]
    if bias:
        inits["B"] = rng.standard_normal(w_shape[0])
        inputs.append("B")
    nodes.append(node("Conv", inputs, **attrs))
    check(Case(nodes, rng.standard_normal(x_shape), inits), rng)


@SOME
@given(seed=seeds, batch=st.integers(1, 3), k=st.integers(1, 4), m=st.integers(1, 4),
       alpha=st.floats(-2, 2), beta=st.floats(-2, 2), trans_a=st.booleans(), trans_b=st.booleans(),
       x_as=st.sampled_from(["A", "B"]),
       bias=st.sampled_from(["none", "vector", "row", "scalar", "from_x", "from_x_broadcast"]))
def test_gemm(seed, batch, k, m, alpha, beta, trans_a, trans_b, x_as, bias):
    """Gemm with X (batch, k) as A or as B (through Transposes), every trans flag, and C constant
    (broadcast) or computed from X (so C's gradient is checked too)."""
    rng = np.random.default_rng(seed)
    attrs = dict(alpha=alpha, beta=beta, transA=int(trans_a), transB=int(trans_b))
    inits = {}
    nodes = []
    if x_as == "A":  # Y = op(A) @ op(B), op(A) = X: (batch, k)
        a = "X"
        if trans_a:
            nodes.append(node("Transpose", ["X"], ["Xt"], perm=[1, 0]))
            a = "Xt"
        inits["W"] = rng.standard_normal((m, k) if trans_b else (k, m))
        inputs, out, c_rows = [a, "W"], "Y", "batch"
    else:  # Y^T = op(A) @ op(B), op(B) = X^T: (k, batch)
        b = "X"
        if not trans_b:
            nodes.append(node("Transpose", ["X"], ["Xt"], perm=[1, 0]))
            b = "Xt"
        inits["W"] = rng.standard_normal((k, m) if trans_a else (m, k))
        inputs, out, c_rows = ["W", b], "Yt", "m"
    if bias == "vector":
        inits["C"] = rng.standard_normal(m if c_rows == "batch" else 1)
    elif bias == "row":
        inits["C"] = rng.standard_normal((1, m) if c_rows == "batch" else (m, 1))
    elif bias == "scalar":
        inits["C"] = rng.standard_normal(())
    elif bias == "from_x":
        # C = X @ V (batch, m) or (X @ V)^T (m, batch): a second path from X into Gemm
        inits["V"] = rng.standard_normal((k, m))
        nodes.append(node("MatMul", ["X", "V"], ["XV"]))
        if c_rows == "m":
            nodes.append(node("Transpose", ["XV"], ["XVt"], perm=[1, 0]))
        inputs.append("XV" if c_rows == "batch" else "XVt")
    elif bias == "from_x_broadcast":  # C = sum(X, axis 1): (batch, 1), broadcast over Y's columns
        assume(c_rows == "batch")
        inits["axis1"] = np.array([1], dtype=np.int64)
        nodes.append(node("ReduceSum", ["X", "axis1"], ["Xsum"]))
        inputs.append("Xsum")
    if bias in ("vector", "row", "scalar"):
        inputs.append("C")
    nodes.append(node("Gemm", inputs, [out], **attrs))
    if out == "Yt":
        nodes.append(node("Transpose", ["Yt"], perm=[1, 0]))
    check(Case(nodes, rng.standard_normal((batch, k)), inits), rng)


@st.composite
def matmul_shapes(draw):
    """X (N, *bx, M, K) and W (*bw, K, P) with broadcastable stack dims, rank(W) <= rank(X)."""
    n_stack = draw(st.integers(0, 2))
    stack_out = [draw(st.integers(1, 3)) for _ in range(n_stack)]
    stack_x = [d if draw(st.booleans()) else 1 for d in stack_out]
    # W's stack: the output's size, or 1 where X has it; a leading 1 may sit in X's batch position
    stack_w = [d if xd != d or draw(st.booleans()) else 1 for d, xd in zip([1, *stack_out], [1, *stack_x])]
    stack_w = stack_w[len(stack_w) - draw(st.integers(0, n_stack + 1)):]
    m, k, p = (draw(st.integers(1, 3)) for _ in range(3))
    x_shape = (draw(st.integers(1, 2)), *stack_x, m, k)
    return x_shape, (*stack_w, k, p)


@SOME
@given(shapes_=matmul_shapes(), seed=seeds, x_left=st.booleans())
def test_matmul(shapes_, seed, x_left):
    """X @ W with broadcast stacks, or W^T @ X^T written as Transpose(W @ X) with X on the right."""
    x_shape, w_shape = shapes_
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    if x_left:
        check(Case([node("MatMul", ["X", "W"])], x, {"W": rng.standard_normal(w_shape)}), rng)
        return
    # W' (p, k) @ X^T(..., k, m) -> (..., p, m): put X on the right through a Transpose
    rank = len(x_shape)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    w = rng.standard_normal((*w_shape[:-2], w_shape[-1], w_shape[-2]))
    nodes = [node("Transpose", ["X"], ["Xt"], perm=perm), node("MatMul", ["W", "Xt"])]
    check(Case(nodes, x, {"W": w}), rng)


@FEW
@given(x_shape=shapes(min_rank=3, max_rank=4), seed=seeds)
def test_matmul_both_operands_from_x(x_shape, seed):
    """X @ X^T: both gradients, one of them through a run-time Transpose of a non-constant."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    nodes = [node("Transpose", ["X"], ["Xt"], perm=perm), node("MatMul", ["X", "Xt"])]
    check(Case(nodes, rng.standard_normal(x_shape)), rng)


# --------------------------------------------------------------------------------------------
# pooling, reductions, normalisation, softmax
# --------------------------------------------------------------------------------------------


@st.composite
def pool_cases(draw, dilated: bool):
    """Pool geometry: 1-3 spatial dims, strides, pads (< kernel, as onnxruntime requires),
    ceil_mode, auto_pad and, for MaxPool, dilations."""
    n = draw(st.sampled_from([1, 2, 2, 3]))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    strides = [draw(st.integers(1, 3)) for _ in range(n)]
    dilations = [draw(st.integers(1, 2)) if dilated else 1 for _ in range(n)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = dict(kernel_shape=kernel, strides=strides)
    # onnxruntime gets the output size of SAME_* pooling with dilations wrong (fewer windows)
    if dilated and not auto_pad.startswith("SAME") and draw(st.booleans()):
        attrs["dilations"] = dilations
    else:
        dilations = [1] * n
    pads = [0] * (2 * n)
    if auto_pad == "NOTSET":
        pads = [draw(st.integers(0, k - 1)) for k in kernel * 2]
        attrs["pads"] = pads
        attrs["ceil_mode"] = int(draw(st.booleans()))
    else:
        attrs["auto_pad"] = auto_pad
    spatial = [draw(st.integers(1, 6 if n < 3 else 3)) for _ in range(n)]
    if auto_pad != "NOTSET":
        pads = spec_pads((1, 1, *spatial), auto_pad, kernel, strides, dilations)
    if auto_pad.startswith("SAME"):
        # onnxruntime does not clamp SAME padding at 0: "padding values must be non-negative"
        # (1-D) or wrong windows (3-D) when a stride skips past the input's end
        assume(all((math.ceil(size / s) - 1) * s + k >= size for size, k, s in zip(spatial, kernel, strides)))
    for i in range(n):
        taps = pool_taps(spatial[i], kernel[i], strides[i], dilations[i], pads[i], pads[n + i],
                          attrs.get("ceil_mode", 0))
        assume(taps and all(any(0 <= p < spatial[i] for p in t) for t in taps))  # no window of padding only
    channels = draw(st.integers(1, 3))
    assume(channels * int(np.prod(spatial)) <= 64)
    return (draw(st.integers(1, 2)), channels, *spatial), attrs


@SOME
@given(case=pool_cases(dilated=False), seed=seeds, count_include_pad=st.integers(0, 1))
def test_average_pool(case, seed, count_include_pad):
    x_shape, attrs = case
    rng = np.random.default_rng(seed)
    nodes = [node("AveragePool", ["X"], count_include_pad=count_include_pad, **attrs)]
    check(Case(nodes, rng.standard_normal(x_shape)), rng)


@SOME
@given(case=pool_cases(dilated=True), seed=seeds, ask_indices=st.booleans())
def test_max_pool(case, seed, ask_indices):
    """Distinct values (no ties) so the argmax is stable under the FD step. With ask_indices the
    forward node already has an Indices output that the rule must reuse."""
    x_shape, attrs = case
    rng = np.random.default_rng(seed)
    outputs = ["Y", "I"] if ask_indices else ["Y"]
    check(Case([node("MaxPool", ["X"], outputs, **attrs)], distinct(rng, x_shape)), rng)


@FEW
@given(x_shape=shapes(min_rank=3, max_rank=5), seed=seeds)
def test_global_average_pool(x_shape, seed):
    rng = np.random.default_rng(seed)
    check(Case([node("GlobalAveragePool", ["X"])], rng.standard_normal(x_shape)), rng)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
@SOME
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds, keepdims=st.sampled_from([None, 0, 1]),
       how=st.sampled_from(["axes", "axes", "no_axes", "empty_noop"]))
def test_reduce(op, data, x_shape, seed, keepdims, how):
    """Axes as a constant input (opset 18), negative axes, keepdims, no or empty axes (reduce all,
    batch included, down to a scalar without keepdims) and noop_with_empty_axes."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    attrs = {} if keepdims is None else {"keepdims": keepdims}
    inits = {}
    inputs = ["X"]
    batch_independent = True
    if how == "axes":
        axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=rank - 1, unique=True))
        axes = [a - rank if data.draw(st.booleans()) else a for a in axes]
        inits["axes"] = np.array(axes, dtype=np.int64)
        inputs.append("axes")
    else:
        batch_independent = how == "empty_noop"  # else it reduces over the batch: static batch
        if how == "empty_noop":
            attrs["noop_with_empty_axes"] = 1
        if data.draw(st.booleans()):  # an empty axes input means the same as no axes
            inits["axes"] = np.array([], dtype=np.int64)
            inputs.append("axes")
    case = Case([node(op, inputs, **attrs)], rng.standard_normal(x_shape), inits, batch_independent,
                dynamic_batch=batch_independent)
    check(case, rng)


@FEW
@given(x_shape=shapes(min_rank=2, max_rank=4), seed=seeds, epsilon=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_batch_normalization(x_shape, seed, epsilon):
    rng = np.random.default_rng(seed)
    c = x_shape[1]
    inits = {"scale": rng.standard_normal(c), "bias": rng.standard_normal(c),
             "mean": rng.standard_normal(c), "var": rng.uniform(0.1, 2.0, c)}
    nodes = [node("BatchNormalization", ["X", "scale", "bias", "mean", "var"], epsilon=epsilon)]
    check(Case(nodes, rng.standard_normal(x_shape), inits), rng)


@SOME
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, min_side=2), seed=seeds, bias=st.booleans(),
       epsilon=st.sampled_from([1e-5, 0.1]), negative_axis=st.booleans())
def test_layer_normalization(data, x_shape, seed, bias, epsilon, negative_axis):
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    # over 2 elements xhat = +-1 and the gradient is ~0 by cancellation of O(rstd) terms, so
    # float32 cannot match it to 1e-4 of its size
    assume(int(np.prod(x_shape[axis:])) >= 3)
    inits = {"scale": rng.standard_normal(x_shape[axis:])}
    if bias:
        inits["bias"] = rng.standard_normal(x_shape[axis:])
    inputs = ["X", "scale", "bias"] if bias else ["X", "scale"]
    attrs = dict(axis=axis - rank if negative_axis else axis, epsilon=epsilon)
    check(Case([node("LayerNormalization", inputs, **attrs)], rng.standard_normal(x_shape) * 2, inits), rng)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@SOME
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4), seed=seeds)
def test_softmax(op, data, x_shape, seed):
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.one_of(st.none(), st.integers(1, rank - 1), st.integers(-rank + 1, -1)))
    attrs = {} if axis is None else {"axis": axis}
    check(Case([node(op, ["X"], **attrs)], rng.standard_normal(x_shape) * 2, {}), rng)


# --------------------------------------------------------------------------------------------
# data movement
# --------------------------------------------------------------------------------------------


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds, batch_code=st.sampled_from([0, -1]))
def test_reshape(data, x_shape, seed, batch_code):
    """Reshape to a random factorisation of the per-sample size; batch kept by 0 or -1."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(x_shape[1:]))
    dims = []
    rest = size
    while rest > 1 and len(dims) < 3:
        d = data.draw(st.sampled_from([f for f in range(1, rest + 1) if rest % f == 0]))
        dims.append(d)
        rest //= d
    dims.append(rest)
    if batch_code == 0 and data.draw(st.booleans()):
        dims[data.draw(st.integers(0, len(dims) - 1))] = -1
    shape = np.array([batch_code, *dims] if batch_code == 0 else [-1, *dims], dtype=np.int64)
    check(Case([node("Reshape", ["X", "shape"])], rng.standard_normal(x_shape), {"shape": shape}), rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds)
def test_flatten(data, x_shape, seed):
    """Flatten at every axis; all but axis 1 mix the batch into Y's first dimension (FD element
    by element)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(-rank, rank))
    case = Case([node("Flatten", ["X"], axis=axis)], rng.standard_normal(x_shape),
                batch_independent=(axis + rank if axis < 0 else axis) == 1)
    check(case, rng)


@FEW
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, max_side=3), seed=seeds)
def test_squeeze_unsqueeze(data, x_shape, seed):
    """Unsqueeze (axes as input, negative allowed) then Squeeze of some size-1 axes. (Squeeze
    without axes cannot be used with a dynamic batch: it would drop a batch of 1.)"""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    out_rank = rank + data.draw(st.integers(1, 2))
    new_axes = data.draw(st.lists(st.integers(1, out_rank - 1), min_size=out_rank - rank,
                                  max_size=out_rank - rank, unique=True))
    new_axes = [a - out_rank if data.draw(st.booleans()) else a for a in new_axes]
    unsqueezed = [d for d in x_shape]
    for a in sorted(a % out_rank for a in new_axes):
        unsqueezed.insert(a, 1)
    ones = [i for i, d in enumerate(unsqueezed) if d == 1 and i > 0]
    drop = data.draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
    drop = [a - out_rank if data.draw(st.booleans()) else a for a in drop]
    inits = {"new_axes": np.array(new_axes, dtype=np.int64), "drop": np.array(drop, dtype=np.int64)}
    nodes = [node("Unsqueeze", ["X", "new_axes"], ["U"]), node("Squeeze", ["U", "drop"])]
    check(Case(nodes, rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=5, max_side=3), seed=seeds)
def test_transpose(data, x_shape, seed):
    """Any permutation; one that moves the batch axis gets FD element by element."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    perm = data.draw(st.one_of(st.none(), st.permutations(range(rank))))
    attrs = {} if perm is None else {"perm": list(perm)}
    keeps_batch = perm is not None and perm[0] == 0
    case = Case([node("Transpose", ["X"], **attrs)], rng.standard_normal(x_shape),
                batch_independent=keeps_batch, dynamic_batch=keeps_batch)
    check(case, rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_side=3), seed=seeds)
def test_expand(data, x_shape, seed):
    rng = np.random.default_rng(seed)
    target, _ = data.draw(broadcast_partner(x_shape))
    inits = {"shape": np.array(target, dtype=np.int64)}
    check(Case([node("Expand", ["X", "shape"])], rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds, n_parts=st.integers(1, 4))
def test_concat(data, x_shape, seed, n_parts):
    """Concat of X (possibly twice) with constants along a non-batch axis (negative allowed)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    inits = {}
    inputs = ["X"]
    for i in range(n_parts - 1):
        if data.draw(st.booleans()):
            inputs.append("X")
        else:
            shape = list(x_shape[1:])
            shape[axis - 1] = data.draw(st.integers(1, 3))
            inits[f"W{i}"] = rng.standard_normal(shape)
            inputs.append(f"W{i}")
    nodes = []
    if inits:  # constants get X's (dynamic) batch by Expand to Shape(X)[:1] + their shape
        nodes.append(node("Shape", ["X"], ["batch"], start=0, end=1))
    for name in list(inits):
        inits[name + "_dims"] = np.array(inits[name].shape, dtype=np.int64)
        nodes.append(node("Concat", ["batch", name + "_dims"], [name + "_shape"], axis=0))
        nodes.append(node("Expand", [name, name + "_shape"], [name + "_b"]))
        inputs[inputs.index(name)] = name + "_b"
    inputs = data.draw(st.permutations(inputs))
    attrs = dict(axis=axis - rank if data.draw(st.booleans()) else axis)
    check(Case([*nodes, node("Concat", inputs, **attrs)], rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4, min_side=2, max_side=5), seed=seeds,
       how=st.sampled_from(["sizes", "num_outputs"]))
def test_split(data, x_shape, seed, how):
    """Split by sizes (input) or num_outputs (opset 18, uneven last part); Y concatenates a
    random non-empty subset of the parts in random order, so unused parts get zero gradients."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    size = x_shape[axis]
    inits = {}
    if how == "sizes":
        cuts = sorted(data.draw(st.lists(st.integers(1, size - 1), max_size=3, unique=True)))
        sizes = np.diff([0, *cuts, size])
        inits["split"] = sizes.astype(np.int64)
        n_out, inputs, attrs = len(sizes), ["X", "split"], {}
    else:
        n_out = data.draw(st.integers(2, size))
        assume(-(-size // n_out) * (n_out - 1) < size)  # every part non-empty
        inputs, attrs = ["X"], {"num_outputs": n_out}
    parts = [f"P{i}" for i in range(n_out)]
    used = data.draw(st.lists(st.sampled_from(parts), min_size=1, unique=True))
    attrs["axis"] = axis - rank if data.draw(st.booleans()) else axis
    nodes = [node("Split", inputs, parts, **attrs), node("Concat", used, axis=axis)]
    check(Case(nodes, rng.standard_normal(x_shape), inits), rng)


@SOME
@given(data=st.data(), x_shape=shapes(max_rank=4, max_side=5), seed=seeds, give_axes=st.booleans(),
       give_steps=st.booleans())
def test_slice(data, x_shape, seed, give_axes, give_steps):
    """Unit-step slices: negative and out-of-range starts/ends (clamped), empty slices excluded,
    axes omitted or given (negative allowed), explicit unit steps."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    big = np.iinfo(np.int64).max
    if give_axes:
        axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, unique=True))
    else:
        axes = list(range(rank))
    starts, ends = [], []
    for a in axes:
        dim = x_shape[a]
        if a == 0:  # without axes the batch is sliced too: take all of it
            starts.append(0)
            ends.append(big)
            continue
        start = data.draw(st.integers(0, dim - 1))
        end = data.draw(st.integers(start + 1, dim))
        starts.append(data.draw(st.sampled_from([start, start - dim])))
        ends.append(data.draw(st.sampled_from([end, end - dim if end < dim else big, end + 3])))
    inits = {"starts": np.array(starts, dtype=np.int64), "ends": np.array(ends, dtype=np.int64)}
    inputs = ["X", "starts", "ends"]
    if give_axes or give_steps:
        inits["axes"] = np.array([a - rank if data.draw(st.booleans()) else a for a in axes], dtype=np.int64)
        inputs.append("axes")
    if give_steps:
        inits["steps"] = np.ones(len(axes), dtype=np.int64)
        inputs.append("steps")
    check(Case([node("Slice", inputs)], rng.standard_normal(x_shape), inits), rng)


@SOME
@given(data=st.data(), x_shape=shapes(max_rank=4, max_side=3), seed=seeds, value=st.sampled_from([None, 0.0, 1.5]),
       give_axes=st.booleans(), pad_batch=st.booleans())
def test_pad(data, x_shape, seed, value, give_axes, pad_batch):
    """Constant padding: pads as input, optional constant_value and axes (opset 18); padding the
    batch axis needs a static batch."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    if give_axes:
        axes = data.draw(st.lists(st.integers(0 if pad_batch else 1, rank - 1), min_size=1, unique=True))
    else:
        axes = list(range(rank))
    pads = [0 if (a == 0 and not pad_batch) else data.draw(st.integers(0, 2)) for a in axes * 2]
    inits = {"pads": np.array(pads, dtype=np.int64)}
    inputs = ["X", "pads"]
    if value is not None or give_axes:
        inputs.append("value" if value is not None else "")
        if value is not None:
            inits["value"] = np.array(value)
    if give_axes:
        inits["axes"] = np.array([a - rank if data.draw(st.booleans()) else a for a in axes], dtype=np.int64)
        inputs.append("axes")
    case = Case([node("Pad", inputs, mode="constant")], rng.standard_normal(x_shape), inits,
                batch_independent=not pad_batch, dynamic_batch=not pad_batch)
    check(case, rng)


# --------------------------------------------------------------------------------------------
# rule sets, graph walking, errors
# --------------------------------------------------------------------------------------------


def run_gradient(case: Case, g: np.ndarray, rules, dtype) -> np.ndarray:
    """dX from the gradient graph: float64 by the reference evaluator, float32 by onnxruntime."""
    model = gradient_model(case, dtype, rules)
    if dtype is np.float64:
        return reference(model).run(None, {"X": case.x, "G": g})[1]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": case.x.astype(np.float32), "G": g.astype(np.float32)})[1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@SOME
@given(x_shape=shapes(), seed=seeds)
def test_modified_relu_rules_closed_form(dtype, x_shape, seed):
    """One Relu: guided = g * 1[x > 0] * 1[g > 0]; deconvnet = max(g, 0); vanilla = g * 1[x > 0]."""
    rng = np.random.default_rng(seed)
    x = away_from(rng, x_shape, -2, 2, kinks=[0])
    g = away_from(rng, x_shape, -2, 2, kinks=[0])
    case = Case([node("Relu", ["X"])], x)
    tol = dict(rtol=1e-6 if dtype is np.float32 else 1e-12, atol=0)
    np.testing.assert_allclose(run_gradient(case, g, VANILLA, dtype), g * (x > 0), **tol)
    np.testing.assert_allclose(run_gradient(case, g, GUIDED, dtype), g * (x > 0) * (g > 0), **tol)
    np.testing.assert_allclose(run_gradient(case, g, DECONVNET, dtype), np.maximum(g, 0), **tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@FEW
@given(seed=seeds, batch=st.integers(1, 3), widths=st.tuples(*[st.integers(1, 5)] * 4))
def test_modified_relu_rules_in_a_network(dtype, seed, batch, widths):
    """X -> MatMul -> Relu -> MatMul -> Relu -> MatMul -> Y: guided and deconvnet replace only the
    Relu rule and fall back on vanilla's MatMul rule; compared with the layer-by-layer closed form."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((a, b)) for a, b in zip(widths, widths[1:])]
    nodes = [node("MatMul", ["X", "W0"], ["H0"]), node("Relu", ["H0"], ["R0"]),
             node("MatMul", ["R0", "W1"], ["H1"]), node("Relu", ["H1"], ["R1"]),
             node("MatMul", ["R1", "W2"])]
    x = rng.standard_normal((batch, widths[0]))
    h0 = x @ weights[0]
    h1 = np.maximum(h0, 0) @ weights[1]
    assume(np.abs(h0).min() > 1e-3 and np.abs(h1).min() > 1e-3)
    g = rng.standard_normal((batch, widths[-1]))
    case = Case(nodes, x, {f"W{i}": w for i, w in enumerate(weights)})

    def closed_form(relu_backward):
        d = g @ weights[2].T
        d = relu_backward(d, h1) @ weights[1].T
        return relu_backward(d, h0) @ weights[0].T

    expected = [
        (VANILLA, closed_form(lambda d, h: d * (h > 0))),
        (GUIDED, closed_form(lambda d, h: d * (h > 0) * (d > 0))),
        (DECONVNET, closed_form(lambda d, h: np.maximum(d, 0))),
    ]
    for rules, want in expected:
        got = run_gradient(case, g, rules, dtype)
        scale = max(np.abs(want).max(), 1e-2)
        np.testing.assert_allclose(got, want, rtol=0, atol=(1e-5 if dtype is np.float32 else 1e-12) * scale)


def test_missing_rule_names_op_node_and_path():
    """Atan has no rule: the error names the op type, the node and the path from it to the score."""
    nodes = [node("Relu", ["X"], ["A"]), helper.make_node("Atan", ["A"], ["B"], name="the_arctangent"),
             node("Tanh", ["B"], ["C"]), node("Mul", ["C", "W"])]
    case = Case(nodes, np.ones((1, 3)), {"W": np.ones(3)})
    with pytest.raises(UnsupportedOpError) as caught:
        gradient_model(case, np.float32)
    err = caught.value
    assert (err.op_type, err.node_name, err.rule_set) == ("Atan", "the_arctangent", "vanilla")
    assert err.path == ["the_arctangent", "Tanh_C", "Mul_Y", "score 'Y'"]
    message = str(err)
    for part in ("'Atan'", "'the_arctangent'", "the_arctangent -> Tanh_C -> Mul_Y -> score 'Y'", "register_gradient_rules"):
        assert part in message


def test_missing_rule_in_a_modified_rule_set_falls_back_then_errors():
    """GUIDED has no Atan rule and neither has its base: the error names the guided rule set."""
    case = Case([helper.make_node("Atan", ["X"], ["Y"], name="s")], np.ones((1, 2)))
    with pytest.raises(UnsupportedOpError, match="rule set 'guided'"):
        gradient_model(case, np.float32, GUIDED)


@FEW
@given(seed=seeds, x_shape=shapes(max_rank=3))
def test_only_nodes_on_the_path_are_differentiated(seed, x_shape):
    """Branches off the path are never visited: one from X that the score does not need, and one
    the score needs that does not depend on X. Both use Sin, which has no rule, so visiting them
    would raise; the backward nodes are exactly those of the graph without the branches."""
    rng = np.random.default_rng(seed)
    x = away_from(rng, x_shape, -2, 2, kinks=[0])
    core = [node("Relu", ["X"], ["A"]), node("Tanh", ["A"], ["T"])]
    branches = [
        helper.make_node("Sin", ["X"], ["dead"], name="dead_end"),
        node("Exp", ["dead"], ["dead2"]),
        helper.make_node("Sin", ["W"], ["S"], name="constant_side"),
        node("Add", ["T", "S"]),
    ]
    inits = {"W": rng.standard_normal(x_shape[1:])}
    with_branches = Case([*core, *branches], x, inits)
    without = Case([*core, node("Add", ["T", "W"])], x, inits)
    check(with_branches, rng)

    def backward_ops(case):
        index = GraphIndex(forward_model(case, np.float32))
        result = differentiate(index, "Y", "G", ["X"], VANILLA, ForwardPatches(), "bwd")
        return [n.op_type for n in result.nodes], {i for n in result.nodes for i in n.input}

    ops, inputs = backward_ops(with_branches)
    assert ops == backward_ops(without)[0]
    assert not {"dead", "dead2", "S"} & inputs


@pytest.mark.parametrize("consumers", [2, 3])
@FEW
@given(seed=seeds, x_shape=shapes(min_rank=3, max_rank=4))
def test_gradient_accumulates_over_consumers(consumers, seed, x_shape):
    """H = Conv(X) feeds Relu, Sigmoid (and Mul with itself): dH is the sum of all contributions,
    and X itself also has a second consumer (a skip connection)."""
    rng = np.random.default_rng(seed)
    c = x_shape[1]
    k = [1] * (len(x_shape) - 2)
    inits = {"W": rng.standard_normal((c, c, *k))}
    nodes = [node("Conv", ["X", "W"], ["H"]), node("Relu", ["H"], ["R"]), node("Sigmoid", ["H"], ["S"]),
             node("Add", ["R", "S"], ["RS"])]
    if consumers == 3:
        nodes += [node("Mul", ["H", "H"], ["HH"]), node("Add", ["RS", "HH"], ["RSH"])]
    nodes.append(node("Add", [nodes[-1].output[0], "X"]))  # skip connection: X's second consumer
    x = rng.standard_normal(x_shape)
    h = np.einsum("oc...,nc...->no...", inits["W"].reshape(c, c, -1), x.reshape(*x_shape[:2], -1))
    assume(np.abs(h).min() > 0.05)  # keep the Relu off its kink
    check(Case(nodes, x, inits), rng)
    bwd = gradient_model(Case(nodes, x, inits), np.float32)
    assert sum(n.op_type == "Sum" for n in bwd.graph.node) >= 2  # dH and dX are sums


def test_dynamic_batch_same_graph_batch_1_and_3():
    """A small CNN (Conv, BatchNorm, Relu, MaxPool, strided Conv, GlobalAveragePool, Flatten, Gemm,
    Softmax) with a dynamic batch: one float32 gradient graph in onnxruntime at batch 1 and 3,
    each sample equal to its FD gradient and to the same sample run alone."""
    rng = np.random.default_rng(7)
    inits = {
        "W1": rng.standard_normal((4, 2, 3, 3)) * 0.5, "B1": rng.standard_normal(4) * 0.1,
        "s": rng.uniform(0.5, 1.5, 4), "b": rng.standard_normal(4) * 0.1,
        "m": rng.standard_normal(4) * 0.1, "v": rng.uniform(0.5, 1.5, 4),
        "W2": rng.standard_normal((3, 4, 3, 3)) * 0.5, "Wf": rng.standard_normal((5, 3)), "bf": rng.standard_normal(5),
    }
    nodes = [
        node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["bn"]),
        node("Relu", ["bn"], ["r1"]),
        node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p1", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["c2"], ["r2"]),
        node("GlobalAveragePool", ["r2"], ["gap"]),
        node("Flatten", ["gap"], ["flat"]),
        node("Gemm", ["flat", "Wf", "bf"], ["logits"], transB=1),
        node("Softmax", ["logits"]),
    ]
    x3 = rng.standard_normal((3, 2, 6, 6))
    model = gradient_model(Case(nodes, x3, inits), np.float32)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    g3 = rng.standard_normal((3, 5))
    dx3 = session.run(None, {"X": x3.astype(np.float32), "G": g3.astype(np.float32)})[1]
    for i in range(3):
        x1, g1 = x3[i:i + 1], g3[i:i + 1]
        dx1 = session.run(None, {"X": x1.astype(np.float32), "G": g1.astype(np.float32)})[1]
        fd = finite_differences(Case(nodes, x1, inits), g1)
        np.testing.assert_allclose(dx1, fd, rtol=0, atol=RTOL_F32 * max(np.abs(fd).max(), 1e-2))
        np.testing.assert_allclose(dx3[i:i + 1], dx1, rtol=0, atol=1e-6 * max(np.abs(dx1).max(), 1e-2))


# --------------------------------------------------------------------------------------------
# regressions: cases that failed before the rule was fixed
# --------------------------------------------------------------------------------------------


def test_pow_exponent_broadcasting_x_up():
    """X (N,2,1) ** P (3,1) -> Y (N,2,3)... was: dX shaped like Y, (N,2,3) instead of (N,2,1)."""
    rng = np.random.default_rng(0)
    check(Case([node("Pow", ["X", "P"])], rng.uniform(0.5, 2, (2, 2, 1)), {"P": rng.uniform(-1, 2, (1, 3))}), rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_layer_normalization_stash_type_other_than_input_type(dtype):
    """Mean and InvStdDev have the stash type (float32 by default), not X's type. Was: the rule
    mixed them with X in Sub/Mul, an invalid graph for float64 and float16 models."""
    rng = np.random.default_rng(0)
    case = Case([node("LayerNormalization", ["X", "scale"], axis=-1)], rng.standard_normal((2, 3, 4)),
                {"scale": rng.standard_normal(4)})
    model = gradient_model(case, dtype)  # full check: types are consistent
    g = rng.standard_normal((2, 3, 4))
    fd = finite_differences(case, g)
    if dtype is np.float64:
        got = reference(model).run(None, {"X": case.x, "G": g})[1]
        np.testing.assert_allclose(got, fd, rtol=0, atol=RTOL_F64 * np.abs(fd).max())
    else:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"X": case.x.astype(dtype), "G": g.astype(dtype)})[1]
        np.testing.assert_allclose(got, fd, rtol=0, atol=2e-2 * np.abs(fd).max())


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
@pytest.mark.parametrize("x_shape, attrs", [
    ((2, 1, 4), dict(kernel_shape=[1], strides=[2], ceil_mode=1)),
    ((1, 2, 1, 3), dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
])
def test_pool_ceil_mode_window_starting_in_the_padding(op, x_shape, attrs):
    """The runtimes drop a last window that would start in the right padding; ONNX shape inference
    keeps it. Was: AveragePool's rule took the inferred (larger) output shape for its divisor."""
    rng = np.random.default_rng(0)
    check(Case([node(op, ["X"], **attrs)], distinct(rng, x_shape)), rng)


def test_slice_whole_dynamic_batch_axis():
    """Slice over all axes (no axes input) with 0..INT64_MAX on the dynamic batch, as exporters
    write x[:, 1:3]. Was: ExportError "slices a dynamic axis 0"."""
    rng = np.random.default_rng(0)
    inits = {"starts": np.array([0, 1], dtype=np.int64),
             "ends": np.array([np.iinfo(np.int64).max, 3], dtype=np.int64)}
    check(Case([node("Slice", ["X", "starts", "ends"])], rng.standard_normal((2, 4)), inits), rng)


def test_ceil_mode_pool_whose_last_window_starts_in_the_padding_is_refused():
    """MaxPool(k=1, s=2, ceil_mode) on width 4: onnxruntime gives 2 columns, ONNX shape inference 3,
    so static shapes downstream would be wrong; the export refuses it naming the node."""
    rng = np.random.default_rng(0)
    nodes = [node("MaxPool", ["X"], ["P"], kernel_shape=[1, 1], strides=[2, 2], ceil_mode=1),
             node("AveragePool", ["P"], kernel_shape=[2, 2])]
    with pytest.raises(ExportError, match=r"MaxPool, ceil_mode.*says 3 outputs.*onnxruntime computes 2"):
        check(Case(nodes, distinct(rng, (1, 1, 4, 4))), rng)


# --------------------------------------------------------------------------------------------
# rules added with these tests
# --------------------------------------------------------------------------------------------


@SOME
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, max_side=4), seed=seeds,
       index_rank=st.integers(0, 2))
def test_gather(data, x_shape, seed, index_rank):
    """Gather with constant indices along a non-batch axis: scalar (x[:, 0], a ViT class token),
    1-D or 2-D indices, negative and repeated indices."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    dim = x_shape[axis]
    index_shape = tuple(data.draw(st.integers(1, 3)) for _ in range(index_rank))
    indices = rng.integers(-dim, dim, size=index_shape).astype(np.int64)
    attrs = dict(axis=axis - rank if data.draw(st.booleans()) else axis)
    check(Case([node("Gather", ["X", "I"], **attrs)], rng.standard_normal(x_shape), {"I": indices}), rng)


@FEW
@given(x_shape=shapes(min_rank=3, max_rank=5), seed=seeds)
def test_global_max_pool(x_shape, seed):
    rng = np.random.default_rng(seed)
    check(Case([node("GlobalMaxPool", ["X"])], distinct(rng, x_shape)), rng)


def test_global_max_pool_ties_share_the_gradient():
    """A channel of zeros (a dead ReLU map): every position is a maximum and gets g / count."""
    x = np.zeros((1, 2, 2, 3))
    x[0, 1] = np.arange(6).reshape(2, 3)
    g = np.array([[[[1.2]], [[-0.7]]]])
    want = np.zeros_like(x)
    want[0, 0] = 1.2 / 6
    want[0, 1, 1, 2] = -0.7
    case = Case([node("GlobalMaxPool", ["X"])], x)
    for dtype in (np.float64, np.float32):
        np.testing.assert_allclose(run_gradient(case, g, VANILLA, dtype), want, rtol=1e-6, atol=0)


TESTED_OPS = {
    *UNARY, *BINARY, "LeakyRelu", "HardSigmoid", "Clip", "Gelu", "Dropout", "Cast", "CastLike", "Pow", "Where",
    "Conv", "Gemm", "MatMul", "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
    "ReduceSum", "BatchNormalization", "LayerNormalization", "Softmax", "LogSoftmax", "Reshape", "Flatten",
    "Squeeze", "Unsqueeze", "Transpose", "Expand", "Concat", "Split", "Slice", "Pad", "Gather",
    *ACTIVATION_AND_REDUCTION_OPS, *NORMALIZATION_OPS, *SPATIAL_OPS,
}


def test_every_vanilla_rule_has_a_finite_difference_test():
    """A rule added to VANILLA needs a test here (and an entry in TESTED_OPS)."""
    assert VANILLA.op_types() == TESTED_OPS
