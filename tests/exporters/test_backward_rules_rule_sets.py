"""The guided and deconvnet rule sets against closed forms, and the graph walk: missing rules named
with the op, node and path, only the nodes on the path differentiated, gradients accumulated
over consumers, one graph for every batch size.

The harness (tests/exporters/rule_harness.py) builds a tiny ONNX graph X -> op(s) -> Y, asks
`differentiate` for d<G, Y>/dX and compares float64 (reference evaluator) and float32
(onnxruntime) gradient graphs with central differences; hypothesis draws the structure.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from onnx import helper

from camrt_exporters.autodiff.graph import GraphIndex
from camrt_exporters.autodiff.reverse import ForwardPatches, differentiate
from camrt_exporters.autodiff.rules import DECONVNET, GUIDED, VANILLA
from camrt_exporters.errors import UnsupportedOpError

from .rule_harness import (
    BATCH,
    FEW,
    RTOL_F32,
    SOME,
    Case,
    away_from,
    check,
    finite_differences,
    forward_model,
    gradient_model,
    node,
    run_gradient,
    seeds,
    shapes,
)


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
