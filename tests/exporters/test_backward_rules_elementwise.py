"""Finite-difference checks of the element-wise backward rules: unary ops, LeakyRelu, HardSigmoid,
Clip, Gelu, Dropout, Cast, Pow, the broadcasting binary ops, Sum and Where.

The harness (tests/exporters/rule_harness.py) builds a tiny ONNX graph X -> op(s) -> Y, asks
`differentiate` for d<G, Y>/dX and compares float64 (reference evaluator) and float32
(onnxruntime) gradient graphs with central differences; hypothesis draws the structure.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto

from .rule_harness import FEW, SOME, Case, away_from, broadcast_partner, check, node, seeds, shapes
from .test_backward_rules_activations import UNARY as ACTIVATION_UNARY


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


# regressions: cases that failed before the rule was fixed


def test_pow_exponent_broadcasting_x_up():
    """X (N,2,1) ** P (3,1) -> Y (N,2,3)... was: dX shaped like Y, (N,2,3) instead of (N,2,1)."""
    rng = np.random.default_rng(0)
    check(Case([node("Pow", ["X", "P"])], rng.uniform(0.5, 2, (2, 2, 1)), {"P": rng.uniform(-1, 2, (1, 3))}), rng)


TESTED_OPS = {*UNARY, *BINARY, "LeakyRelu", "HardSigmoid", "Clip", "Gelu", "Dropout", "Cast", "CastLike", "Pow", "Where"}
