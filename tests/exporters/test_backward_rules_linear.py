"""Finite-difference checks of the Conv, Gemm and MatMul backward rules.

The harness (tests/exporters/rule_harness.py) builds a tiny ONNX graph X -> op(s) -> Y, asks
`differentiate` for d<G, Y>/dX and compares float64 (reference evaluator) and float32
(onnxruntime) gradient graphs with central differences; hypothesis draws the structure.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from .rule_harness import FEW, SOME, Case, check, node, seeds, shapes


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


TESTED_OPS = {"Conv", "Gemm", "MatMul"}
