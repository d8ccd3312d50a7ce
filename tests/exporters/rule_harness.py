"""The finite-difference harness of the backward-rule tests (tests/exporters/test_backward_rules*.py).

Finite-difference checks of every backward rule (DESIGN.md, "Testing oracles").

Each test builds a tiny ONNX graph X -> op(s) -> Y (opset 18; Gelu 20), mostly with a dynamic
batch dimension, asks `differentiate` for d<G, Y>/dX with a random cotangent G fed as a graph
input (the score sum(G * Y)), and compares the gradient subgraph with central differences
(step 1e-5) of <G, Y(X)>:

* the oracle runs the forward graph in float64 with onnx.reference.ReferenceEvaluator;
* the gradient graph in float64, run by ReferenceEvaluator, must match it within 1e-6 of
  max|oracle| (and 1e-6 relative);
* the gradient graph in float32, run by onnxruntime (CPU), must match it within 1e-4 of
  max|oracle|. Both gradient graphs also pass onnx.checker's full check (types, shapes), and
  their forward outputs must match the reference. onnxruntime has no float64 kernels for
  several ops (AveragePool, GlobalAveragePool, Erf, ...), hence the reference evaluator there.

Some reference ops are wrong or compute in float32 (onnx 1.23); they are replaced below through
`new_ops` by implementations of the spec that onnxruntime's forward outputs confirm. Geometries
where onnxruntime itself departs from the spec (SAME padding with dilations or negative total
padding in pools, SAME with dilations in Conv) are left out of the strategies.

Hypothesis draws the structure (shapes, strides, pads, axes, ...); the values come from a numpy
generator seeded by hypothesis. Ops with kinks get inputs kept away from their breakpoints and
max-pooling gets inputs without ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ReferenceConvTranspose

from camrt_exporters.autodiff.graph import GraphIndex
from camrt_exporters.autodiff.reverse import ForwardPatches, differentiate
from camrt_exporters.autodiff.rules import VANILLA

OPSET = 18
FD_STEP = 1e-5
RTOL_F64 = 1e-6
RTOL_F32 = 1e-4
BATCH = "N"

FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ELEM = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


# --------------------------------------------------------------------------------------------
# reference evaluator fixes (onnx 1.23): ops whose reference implementation is wrong or float32
# --------------------------------------------------------------------------------------------


_erf = np.vectorize(math.erf, otypes=[np.float64])


class Erf(OpRun):
    """The reference evaluator's Erf rounds to float32 (np.vectorize(otypes="f")), which ruins
    float64 finite differences; this one keeps float64."""

    op_domain = ""

    def _run(self, x):
        return (_erf(x).astype(x.dtype),)


class Gelu(OpRun):
    """The reference evaluator expands Gelu through its function body, whose Erf is the
    float32 one above (new_ops do not reach function bodies); this is the spec's formula."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            y = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        else:
            y = 0.5 * x * (1 + _erf(x / math.sqrt(2)))
        return (y.astype(x.dtype),)


class ConvTranspose(_ReferenceConvTranspose):
    """The reference evaluator's grouped ConvTranspose slices W by output channels and writes one
    output channel per group (wrong for group > 1); run it group by group with group=1 instead."""

    op_domain = ""

    def _run(self, X, W, B=None, group=None, **attrs):
        if not group or group == 1:
            return super()._run(X, W, B, group=1, **attrs)
        biases = np.split(B, group) if B is not None else [None] * group
        parts = [
            super(ConvTranspose, self)._run(x, w, b, group=1, **attrs)[0]
            for x, w, b in zip(np.split(X, group, axis=1), np.split(W, group, axis=0), biases)
        ]
        return (np.concatenate(parts, axis=1),)


def spec_pads(x_shape, auto_pad, kernel_shape, strides, dilations) -> list[int]:
    """auto_pad as explicit pads, from the ONNX operator spec of MaxPool/AveragePool."""
    spatial = x_shape[2:]
    strides = strides or [1] * len(spatial)
    dilations = dilations or [1] * len(spatial)
    if auto_pad == "VALID":
        return [0] * (2 * len(spatial))
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel_shape, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def pool_taps(size, k, s, d, begin, end, ceil_mode) -> list[list[int]]:
    """Per output position along one axis, the input positions its window covers (padding
    included, so some may lie outside [0, size)). As onnxruntime does it: with ceil_mode a last
    window that would start in the right padding is dropped."""
    span = size + begin + end - (k - 1) * d - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + begin:
        out -= 1
    return [[o * s - begin + j * d for j in range(k)] for o in range(out)]


def _pool(x, kernel_shape, strides, pads, dilations, ceil_mode, count_include_pad, mode):
    """N-D max/average pooling; max pooling also returns the flat indices into X (batch and
    channel offsets included, as the spec says); count_include_pad counts cells up to the end
    padding (onnxruntime, torch)."""
    n = len(kernel_shape)
    spatial = x.shape[2:]
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    pads = pads or [0] * (2 * n)
    taps = [pool_taps(spatial[i], kernel_shape[i], strides[i], dilations[i], pads[i], pads[n + i], ceil_mode)
            for i in range(n)]
    out_shape = [len(t) for t in taps]
    flat = x.reshape(x.shape[0] * x.shape[1], -1)
    y = np.empty((flat.shape[0], *out_shape), dtype=x.dtype)
    indices = np.empty(y.shape, dtype=np.int64)
    for o in np.ndindex(*out_shape):
        window_taps = [taps[i][o[i]] for i in range(n)]
        inside = [[p for p in t if 0 <= p < spatial[i]] for i, t in enumerate(window_taps)]
        cells = np.ravel_multi_index(np.meshgrid(*inside, indexing="ij"), spatial).ravel()
        window = flat[:, cells]
        if mode == "max":
            best = window.argmax(axis=1)
            y[(slice(None), *o)] = window[np.arange(len(flat)), best]
            indices[(slice(None), *o)] = cells[best] + np.arange(len(flat)) * flat.shape[1]
        else:
            in_pads = [sum(p < spatial[i] + pads[n + i] for p in t) for i, t in enumerate(window_taps)]
            y[(slice(None), *o)] = window.sum(axis=1) / (np.prod(in_pads) if count_include_pad else len(cells))
    return y.reshape(*x.shape[:2], *out_shape), indices.reshape(*x.shape[:2], *out_shape)


class _Pool(OpRun):
    """The reference evaluator's pools are wrong outside 2-D with pads or auto_pad, and its MaxPool
    Indices leave out the batch and channel offsets the spec (and onnxruntime) include."""

    op_domain = ""

    def _run(self, x, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape=None,
             pads=None, storage_order=0, strides=None):
        if auto_pad not in ("NOTSET", ""):
            pads = spec_pads(x.shape, auto_pad, kernel_shape, strides, dilations)
        y, indices = _pool(x, kernel_shape, strides, pads, dilations, ceil_mode, count_include_pad, self.mode)
        return (y, indices) if len(self.output) > 1 else (y,)


class MaxPool(_Pool):
    mode = "max"


class AveragePool(_Pool):
    mode = "average"


class GlobalMaxPool(OpRun):
    """The reference evaluator's GlobalMaxPool reduces axes (r-2, r-1), right only for 4-D inputs."""

    op_domain = ""

    def _run(self, x):
        return (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)


def reference(model: onnx.ModelProto, extra_ops: tuple[type[OpRun], ...] = ()) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=[Erf, Gelu, ConvTranspose, MaxPool, AveragePool, GlobalMaxPool, *extra_ops])



# --------------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A forward graph from input "X" to output "Y"; float initializers are stored in float64."""

    nodes: list[onnx.NodeProto]
    x: np.ndarray  # float64 input, batch first
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    #: every node maps batch sample b of X to batch sample b of Y only (lets FD run batched)
    batch_independent: bool = True
    opset: int = OPSET
    #: False: X's batch dimension is static (for ops that reduce over the batch)
    dynamic_batch: bool = True
    #: non-batch axes of X given symbolic dims (as shape inference leaves some exported files)
    symbolic_axes: tuple[int, ...] = ()
    #: Y has X's shape, declared because ONNX shape inference leaves it unknown (GroupNormalization)
    y_shaped_like_x: bool = False
    #: more reference-op fixes (OpRun classes) for this case's oracle, kept in the test files that need them
    reference_ops: tuple[type[OpRun], ...] = ()


def _cast_init(name: str, value: np.ndarray, dtype) -> onnx.TensorProto:
    value = np.asarray(value)
    if value.dtype.kind == "f":
        value = value.astype(dtype)
    return numpy_helper.from_array(value, name)


def forward_model(case: Case, dtype) -> onnx.ModelProto:
    x_dims = [BATCH if case.dynamic_batch else case.x.shape[0], *case.x.shape[1:]]
    for axis in case.symbolic_axes:
        x_dims[axis] = f"d{axis}"
    graph = helper.make_graph(
        case.nodes,
        "forward",
        [helper.make_tensor_value_info("X", ELEM[dtype], x_dims)],
        [helper.make_tensor_value_info("Y", ELEM[dtype], x_dims if case.y_shaped_like_x else None)],
        initializer=[_cast_init(k, v, dtype) for k, v in case.inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 9
    return model


def gradient_model(case: Case, dtype, rules=VANILLA) -> onnx.ModelProto:
    """Forward graph + the gradient subgraph: inputs X, G (cotangent of Y); outputs Y, dX."""
    forward = forward_model(case, dtype)
    index = GraphIndex(forward)
    y_shape = index.shape("Y")
    assert y_shape is not None, "shape inference gave no shape for Y"
    patches = ForwardPatches()
    backward = differentiate(index, score="Y", seed="G", wrt=["X"], rules=rules, patches=patches, prefix="bwd")
    nodes = [patches.apply(n) for n in forward.graph.node]
    nodes += backward.nodes
    nodes.append(helper.make_node("Identity", [backward.gradients["X"]], ["dX"], name="dX"))
    # G and Y get symbolic dims: ONNX shape inference can disagree with the runtimes (pools
    # with ceil_mode whose last window starts in the right padding: the runtimes drop it).
    g_dims = [f"y{i}" for i in range(len(y_shape))]
    dx_info = onnx.ValueInfoProto()
    dx_info.CopyFrom(forward.graph.input[0])
    dx_info.name = "dX"
    graph = helper.make_graph(
        nodes,
        "gradient",
        [forward.graph.input[0], helper.make_tensor_value_info("G", ELEM[dtype], g_dims)],
        [helper.make_tensor_value_info("Y", ELEM[dtype], g_dims), dx_info],
        initializer=[*forward.graph.initializer, *backward.initializers],
    )
    model = helper.make_model(graph, opset_imports=forward.opset_import)
    model.ir_version = forward.ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def finite_differences(case: Case, g: np.ndarray) -> np.ndarray:
    """Central differences of <g, Y(X)> w.r.t. X, in float64 by the reference evaluator."""
    run = reference(forward_model(case, np.float64), case.reference_ops)
    x = case.x
    if case.batch_independent:
        # Perturb element p of every sample at once: sample b of the output only sees sample b.
        batch, per_sample = x.shape[0], x[0].size
        steps = (np.eye(per_sample) * FD_STEP).reshape(per_sample, 1, *x.shape[1:])
        stacked = np.concatenate([x[None] + steps, x[None] - steps]).reshape(-1, *x.shape[1:])
        ys = run.run(None, {"X": stacked})[0].reshape(2, per_sample, batch, *g.shape[1:])
        scores = (ys * g).reshape(2, per_sample, batch, -1).sum(axis=-1)
        grad = (scores[0] - scores[1]) / (2 * FD_STEP)
        return grad.T.reshape(x.shape)
    grad = np.zeros_like(x)
    for i in range(x.size):
        step = np.zeros(x.size)
        step[i] = FD_STEP
        step = step.reshape(x.shape)
        up = np.sum(g * run.run(None, {"X": x + step})[0])
        down = np.sum(g * run.run(None, {"X": x - step})[0])
        grad.flat[i] = (up - down) / (2 * FD_STEP)
    return grad


def check(case: Case, rng: np.random.Generator, rules=VANILLA) -> None:
    """Compare the float64 (reference) and float32 (onnxruntime) gradient graphs with FD, for a
    random cotangent G; the forward outputs of both graphs must match the reference too."""
    model64 = gradient_model(case, np.float64, rules)
    model32 = gradient_model(case, np.float32, rules)
    y_ref = reference(forward_model(case, np.float64), case.reference_ops).run(None, {"X": case.x})[0]
    g = rng.standard_normal(y_ref.shape)
    fd = finite_differences(case, g)
    # Tolerances are relative to max|FD|, floored for gradients that are (nearly) zero: the
    # cotangent is O(1), so float32 rounding of O(1) intermediate terms is ~1e-7 regardless.
    scale = max(float(np.abs(fd).max(initial=0.0)), 1e-2)

    y64, dx64 = reference(model64, case.reference_ops).run(None, {"X": case.x, "G": g})
    np.testing.assert_allclose(y64, y_ref, rtol=1e-12, atol=1e-12)
    assert dx64.shape == case.x.shape
    np.testing.assert_allclose(dx64, fd, rtol=RTOL_F64, atol=RTOL_F64 * scale)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model32.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y32, dx32 = session.run(None, {"X": case.x.astype(np.float32), "G": g.astype(np.float32)})
    np.testing.assert_allclose(y32, y_ref, rtol=RTOL_F32, atol=RTOL_F32 * max(np.abs(y_ref).max(initial=0), 1))
    assert dx32.shape == case.x.shape
    np.testing.assert_allclose(dx32, fd, rtol=0, atol=RTOL_F32 * scale)


def node(op_type: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> onnx.NodeProto:
    outputs = outputs or ["Y"]
    return helper.make_node(op_type, inputs, outputs, name=f"{op_type}_{outputs[0]}", **attrs)


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)


def away_from(rng: np.random.Generator, shape, low: float, high: float, kinks=(), margin: float = 0.05):
    """Uniform values in [low, high] at least `margin` away from every kink."""
    x = rng.uniform(low, high, size=shape)
    for _ in range(100):
        bad = np.zeros(x.shape, dtype=bool)
        for k in kinks:
            bad |= np.abs(x - k) < margin
        if not bad.any():
            return x
        x[bad] = rng.uniform(low, high, size=int(bad.sum()))
    raise AssertionError("could not draw values away from the kinks")


def distinct(rng: np.random.Generator, shape, gap: float = 0.01) -> np.ndarray:
    """Pairwise distinct values (no ties within gap), for max-pooling."""
    size = int(np.prod(shape))
    return (rng.permutation(size) * gap - size * gap / 2 + rng.uniform(0, gap / 10, size)).reshape(shape)


@st.composite
def shapes(draw, min_rank=2, max_rank=4, min_side=1, max_side=4, max_size=48):
    """A batch-first shape."""
    rank = draw(st.integers(min_rank, max_rank))
    shape = [draw(st.integers(1, 2))] + [draw(st.integers(min_side, max_side)) for _ in range(rank - 1)]
    assume(int(np.prod(shape)) <= max_size)
    return tuple(shape)


@st.composite
def broadcast_partner(draw, x_shape, widen=True):
    """(operand shape, output shape): an operand of rank <= rank(X) that broadcasts with X (and
    may widen X's size-1 dimensions, unless `widen` is False)."""
    rank = len(x_shape)
    out = list(x_shape)
    for i in range(1, rank):
        if widen and x_shape[i] == 1 and draw(st.booleans()):
            out[i] = draw(st.integers(2, 3))
    widened = [i for i in range(rank) if out[i] != x_shape[i]]
    w_rank = draw(st.integers(rank - min(widened, default=rank), rank - 1))
    w = [1 if (x_shape[i] == out[i] and draw(st.booleans())) else out[i] for i in range(rank - w_rank, rank)]
    if w_rank == rank - 1 and draw(st.booleans()):
        w = [1] + w  # same rank as X, with a 1 in the batch position
    assume(int(np.prod(out)) <= 64)
    return tuple(w), tuple(out)


def run_gradient(case: Case, g: np.ndarray, rules, dtype) -> np.ndarray:
    """dX from the gradient graph: float64 by the reference evaluator, float32 by onnxruntime."""
    model = gradient_model(case, dtype, rules)
    if dtype is np.float64:
        return reference(model).run(None, {"X": case.x, "G": g})[1]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": case.x.astype(np.float32), "G": g.astype(np.float32)})[1]
