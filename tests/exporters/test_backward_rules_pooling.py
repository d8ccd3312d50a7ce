"""Finite-difference checks of the pooling, reduction, normalisation and softmax backward rules.

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

from camrt_exporters.autodiff.rules import VANILLA
from camrt_exporters.errors import ExportError

from .rule_harness import (
    FEW,
    RTOL_F64,
    SOME,
    Case,
    check,
    distinct,
    finite_differences,
    gradient_model,
    node,
    pool_taps,
    reference,
    run_gradient,
    seeds,
    shapes,
    spec_pads,
)


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


# regressions: cases that failed before the rule was fixed


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


def test_ceil_mode_pool_whose_last_window_starts_in_the_padding_is_refused():
    """MaxPool(k=1, s=2, ceil_mode) on width 4: onnxruntime gives 2 columns, ONNX shape inference 3,
    so static shapes downstream would be wrong; the export refuses it naming the node."""
    rng = np.random.default_rng(0)
    nodes = [node("MaxPool", ["X"], ["P"], kernel_shape=[1, 1], strides=[2, 2], ceil_mode=1),
             node("AveragePool", ["P"], kernel_shape=[2, 2])]
    with pytest.raises(ExportError, match=r"MaxPool, ceil_mode.*says 3 outputs.*onnxruntime computes 2"):
        check(Case(nodes, distinct(rng, (1, 1, 4, 4))), rng)


TESTED_OPS = {"AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum",
              "BatchNormalization", "LayerNormalization", "Softmax", "LogSoftmax"}
