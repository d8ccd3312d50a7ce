"""Finite-difference checks of the backward rules of resampling and data-moving ops: Resize (and
Upsample, converted to it), Slice with steps, Concat/Slice/Pad on dynamic axes, Tile,
DepthToSpace/SpaceToDepth, ConvTranspose, Einsum.

The harness (tests/exporters/rule_harness.py) compares float64 (reference evaluator) and float32
(onnxruntime) gradient graphs with central differences; its forward check also confirms that the
reference evaluator and onnxruntime agree on every drawn geometry. The Resize rule's matrices are
onnxruntime's float32 weights, so cubic and antialiased Resize get the float32 check only. Resize
and ConvTranspose are checked against torch autograd too (F.interpolate, conv_transpose2d).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from onnx import numpy_helper
from onnx.reference.op_run import OpRun

from camrt_exporters.autodiff.graph import GraphIndex
from camrt_exporters.contract_file import prepare
from camrt_exporters.errors import ExportError

from .rule_harness import (
    FEW,
    RTOL_F32,
    SOME,
    Case,
    check,
    finite_differences,
    forward_model,
    gradient_model,
    node,
    reference,
    seeds,
    shapes,
)

#: the ops whose rules this file tests (test_backward_rules.py's inventory includes them)
TESTED_OPS = {"Resize", "Tile", "DepthToSpace", "SpaceToDepth", "ConvTranspose", "Einsum"}


def run_gradient(case: Case, g: np.ndarray) -> np.ndarray:
    """dX of the float32 gradient graph in onnxruntime, for cotangent g."""
    session = ort.InferenceSession(gradient_model(case, np.float32).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["dX"], {"X": case.x.astype(np.float32), "G": g.astype(np.float32)})[0]


def check_float32(case: Case, rng: np.random.Generator) -> None:
    """The harness's float32 check alone (onnxruntime's gradient graph against float64 finite
    differences of the reference), for rules whose constants onnxruntime computes in float32 only."""
    g = rng.standard_normal(reference(forward_model(case, np.float64), case.reference_ops).run(None, {"X": case.x})[0].shape)
    fd = finite_differences(case, g)
    np.testing.assert_allclose(run_gradient(case, g), fd, rtol=0, atol=RTOL_F32 * max(np.abs(fd).max(), 1e-2))


def torch_gradient(forward, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (forward(xt) * torch.tensor(g, dtype=torch.float64)).sum().backward()
    return xt.grad.numpy()


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------

def source_coordinates(n: int, m: int, scale: float, transform: str) -> np.ndarray:
    """Where the m outputs of one axis sample the n inputs (ONNX Resize spec, float64)."""
    x = np.arange(m, dtype=np.float64)
    return {
        "half_pixel": (x + 0.5) / scale - 0.5,
        "pytorch_half_pixel": (x + 0.5) / scale - 0.5 if m > 1 else np.zeros(m),
        "align_corners": x * (n - 1) / (m - 1) if m > 1 else np.zeros(m),
        "asymmetric": x / scale,
    }[transform]


def resize_matrix(n: int, m: int, scale: float, mode: str, transform: str, nearest_mode: str,
                  cubic_coeff_a: float, exclude_outside: int) -> np.ndarray:
    """R [m, n] of one axis, from the ONNX Resize spec in float64: the output extent m is the
    integer one (floor(n * scale) for scales), the scale the given one (m / n for sizes)."""
    source = source_coordinates(n, m, scale, transform)
    matrix = np.zeros((m, n))
    rows = np.arange(m)
    if mode == "nearest":
        rounded = {
            "round_prefer_floor": np.where(source % 1 == 0.5, np.floor(source), np.round(source)),
            "round_prefer_ceil": np.floor(source + 0.5),
            "floor": np.floor(source),
            "ceil": np.ceil(source),
        }[nearest_mode]
        matrix[rows, np.clip(rounded, 0, n - 1).astype(int)] = 1.0
    elif mode == "linear":
        source = np.clip(source, 0, n - 1)
        low = np.floor(source).astype(int)
        np.add.at(matrix, (rows, low), 1 - (source - low))
        np.add.at(matrix, (rows, np.minimum(low + 1, n - 1)), source - low)
    else:
        a = cubic_coeff_a
        low = np.floor(source).astype(int)
        for tap in range(-1, 3):
            d = np.abs(source - (low + tap))
            weight = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                              np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
            position = low + tap
            if exclude_outside:
                weight = np.where((position >= 0) & (position < n), weight, 0.0)
            np.add.at(matrix, (rows, np.clip(position, 0, n - 1)), weight)
        if exclude_outside:
            matrix /= matrix.sum(axis=1, keepdims=True)
    return matrix


class Resize(OpRun):
    """The reference evaluator's Resize computes align_corners with the unrounded output extent
    (n * scale) when given scales, where the spec (and onnxruntime) use the integer one; this is
    the spec, separable along every axis (nearest, linear, cubic; no antialias, no crop)."""

    op_domain = ""

    def _run(self, x, roi=None, scales=None, sizes=None, antialias=0, axes=None, coordinate_transformation_mode="half_pixel",
             cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
             mode="nearest", nearest_mode="round_prefer_floor"):
        assert not antialias and keep_aspect_ratio_policy == "stretch"
        axes = [a % x.ndim for a in (axes if axes is not None else range(x.ndim))]
        y = x
        for i, axis in enumerate(axes):
            n = x.shape[axis]
            if scales is not None and len(scales):
                scale = float(scales[i])
                m = int(np.floor(n * scale))
            else:
                m = int(sizes[i])
                scale = m / n
            matrix = resize_matrix(n, m, scale, mode, coordinate_transformation_mode, nearest_mode,
                                   cubic_coeff_a, exclude_outside)
            y = np.moveaxis(np.tensordot(y, matrix, axes=([axis], [1])), -1, axis)
        return (y.astype(x.dtype),)


TRANSFORMS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


@SOME
@given(data=st.data(), x_shape=shapes(min_rank=4, max_rank=4, max_side=5, max_size=100), seed=seeds,
       mode=st.sampled_from(["nearest", "linear", "cubic"]), transform=st.sampled_from(TRANSFORMS),
       by=st.sampled_from(["scales", "sizes"]))
def test_resize(data, x_shape, seed, mode, transform, by):
    """Resize of H and W (NCHW) by scales (up, down, fractional) or sizes, every coordinate transform
    and nearest rounding; cubic with its coefficient and exclude_outside."""
    rng = np.random.default_rng(seed)
    attrs = dict(mode=mode, coordinate_transformation_mode=transform)
    if mode == "nearest":
        attrs["nearest_mode"] = data.draw(st.sampled_from(NEAREST_MODES))
    if mode == "cubic":
        attrs["cubic_coeff_a"] = data.draw(st.sampled_from([-0.75, -0.5]))
        attrs["exclude_outside"] = data.draw(st.integers(0, 1))
    if by == "scales":
        scales = [data.draw(st.sampled_from([0.5, 0.6, 1.0, 1.5, 2.0, 3.0])) for _ in range(2)]
        sizes = [int(n * s) for n, s in zip(x_shape[2:], scales)]
        assume(min(sizes) >= 1)
        nodes, inits = _resize_by_scales([1.0, 1.0, *scales], **attrs)
    else:
        sizes = [data.draw(st.integers(1, 7)) for _ in range(2)]
        scales = [m / n for m, n in zip(sizes, x_shape[2:])]
        nodes, inits = _resize_by_sizes(sizes, **attrs)
    if mode == "nearest":  # onnxruntime rounds float32 coordinates: a float64 tie may fall either way
        boundary = 0.0 if attrs["nearest_mode"] in ("floor", "ceil") else 0.5
        for n, m, scale in zip(x_shape[2:], sizes, scales):
            distance = (source_coordinates(n, m, scale, transform) - boundary) % 1
            assume(np.all(np.minimum(distance, 1 - distance) > 1e-4))
    case = Case(nodes, rng.standard_normal(x_shape), inits, reference_ops=(Resize,))
    if mode == "cubic":  # onnxruntime's cubic weights (float32, the rule's matrices) are ~1e-6 off
        check_float32(case, rng)
    else:
        check(case, rng)


def _resize_by_scales(scales, **attrs):
    """Resize(X, scales): float32 scales in a Constant node (the harness stores initializers in the
    tested float type)."""
    scales_node = node("Constant", [], ["scales"], value=numpy_helper.from_array(np.array(scales, dtype=np.float32)))
    return [scales_node, node("Resize", ["X", "", "scales"], **attrs)], {}


def _resize_by_sizes(spatial, **attrs):
    """Resize(X, sizes) with sizes = Concat(Shape(X)[:2], spatial) computed at run time, as torch
    writes F.interpolate(size=...) with a dynamic batch."""
    nodes = [node("Shape", ["X"], ["batch_channels"], start=0, end=2),
             node("Concat", ["batch_channels", "spatial"], ["sizes"], axis=0),
             node("Resize", ["X", "", "", "sizes"], **attrs)]
    return nodes, {"spatial": np.array(spatial, dtype=np.int64)}


@FEW
@given(data=st.data(), seed=seeds, by=st.sampled_from(["scales", "sizes"]))
def test_resize_axes_attribute(data, seed, by):
    """Opset 18's `axes`: scales or sizes of the listed axes only (here W, or H and W)."""
    rng = np.random.default_rng(seed)
    axes = data.draw(st.sampled_from([[3], [2, 3], [-1, -2]]))
    if by == "scales":
        nodes, inits = _resize_by_scales([2.0, 0.5][:len(axes)], mode="linear", axes=axes)
    else:
        inits = {"sizes": np.array([5, 3][:len(axes)], dtype=np.int64)}
        nodes = [node("Resize", ["X", "", "", "sizes"], mode="linear", axes=axes)]
    check(Case(nodes, rng.standard_normal((2, 2, 4, 4)), inits, reference_ops=(Resize,)), rng)


@FEW
@given(data=st.data(), seed=seeds, mode=st.sampled_from(["linear", "cubic"]), transform=st.sampled_from(TRANSFORMS))
def test_resize_antialias(data, seed, mode, transform):
    """Opset 18's antialias (a wider kernel when downsampling), by sizes: the reference evaluator's
    own Resize, which agrees with onnxruntime here (the override above leaves antialias out); the
    float32 check only, as for cubic.
    (onnxruntime's antialias is not torch's: F.interpolate(antialias=True) differs by ~0.15 on
    N(0, 1) inputs, in the forward pass already. Output extent 1 is left out: with pytorch_half_pixel the
    reference evaluator and onnxruntime disagree there.)"""
    rng = np.random.default_rng(seed)
    nodes, inits = _resize_by_sizes([data.draw(st.integers(2, 9)) for _ in range(2)], mode=mode,
                                    coordinate_transformation_mode=transform, antialias=1)
    check_float32(Case(nodes, rng.standard_normal((2, 1, 7, 8)), inits), rng)


#: ONNX Resize attributes that torch's exporters write for F.interpolate
TORCH_RESIZE = [
    (dict(mode="nearest"), dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
    (dict(mode="nearest-exact"),
     dict(mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil")),
    (dict(mode="bilinear", align_corners=False), dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")),
    (dict(mode="bilinear", align_corners=True), dict(mode="linear", coordinate_transformation_mode="align_corners")),
    (dict(mode="bicubic", align_corners=False),
     dict(mode="cubic", coordinate_transformation_mode="pytorch_half_pixel", cubic_coeff_a=-0.75)),
]


@pytest.mark.parametrize("torch_args,onnx_attrs", TORCH_RESIZE, ids=[a["mode"] + str(a.get("align_corners", ""))
                                                                  for a, _ in TORCH_RESIZE])
@pytest.mark.parametrize("size", [(7, 5), (3, 2), (8, 12)])
def test_resize_matches_torch_interpolate(torch_args, onnx_attrs, size):
    """The gradient of the Resize that torch exports for F.interpolate(size=...) is torch's autograd
    gradient (upsampling, downsampling, non-square)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 6))
    nodes, inits = _resize_by_sizes(size, **onnx_attrs)
    case = Case(nodes, x, inits)
    g = rng.standard_normal((2, 3, *size))
    want = torch_gradient(lambda t: F.interpolate(t, size=size, **torch_args), x, g)
    np.testing.assert_allclose(run_gradient(case, g), want, rtol=0, atol=1e-5)


def test_resize_of_a_dynamic_spatial_axis_is_refused():
    nodes, _ = _resize_by_scales([1, 1, 2, 2], mode="linear")
    case = Case(nodes, np.ones((1, 1, 2, 2)), symbolic_axes=(2,))
    with pytest.raises(ExportError, match=r"'Resize_Y' \(Resize\): resizes axis 2.*--input-size"):
        gradient_model(case, np.float32)


def test_resize_crop_and_resize_is_refused():
    nodes, _ = _resize_by_scales([1, 1, 2, 2], mode="linear", coordinate_transformation_mode="tf_crop_and_resize")
    nodes[-1].input[1] = "roi"
    case = Case(nodes, np.ones((1, 1, 2, 2)), {"roi": np.array([0, 0, 0, 0, 1, 1, 1, 1.0])})
    with pytest.raises(ExportError, match=r"'Resize_Y' \(Resize\): coordinate_transformation_mode 'tf_crop_and_resize'"):
        gradient_model(case, np.float32)


# --------------------------------------------------------------------------------------------
# Slice with steps; Concat, Slice and Pad on dynamic axes
# --------------------------------------------------------------------------------------------

BIG = np.iinfo(np.int64).max


@SOME
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, max_side=6, max_size=120), seed=seeds)
def test_slice_with_steps(data, x_shape, seed):
    """Steps 2, 3, -1, -2 (and 1) on non-batch axes, with negative, out-of-range (clamped) and
    open-ended starts and ends (non-empty slices, by construction)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, unique=True))
    starts, ends, steps = [], [], []
    for a in axes:
        dim = x_shape[a]
        step = data.draw(st.sampled_from([1, 2, 3, -1, -2]))
        first = data.draw(st.integers(0, dim - 1))  # the first position taken
        if step > 0:  # stop in (first, dim]
            stop = data.draw(st.integers(first + 1, dim))
            start = data.draw(st.sampled_from([first, first - dim] + ([-BIG, -dim - 2] if first == 0 else [])))
            end = data.draw(st.sampled_from([stop] + ([stop - dim] if stop < dim else [BIG, dim + 2])))
        else:  # stop in [-1, first): -1 runs to the beginning, written as an end below -dim
            stop = data.draw(st.integers(-1, first - 1))
            start = data.draw(st.sampled_from([first, first - dim] + ([BIG, dim + 2] if first == dim - 1 else [])))
            end = data.draw(st.sampled_from([stop, stop - dim] if stop >= 0 else [-BIG, -dim - 2]))
        assert len(range(dim)[start:end:step]) > 0
        starts.append(start), ends.append(end), steps.append(step)
    inits = {name: np.array(v, dtype=np.int64) for name, v in
             dict(starts=starts, ends=ends, axes=axes, steps=steps).items()}
    check(Case([node("Slice", ["X", "starts", "ends", "axes", "steps"])], rng.standard_normal(x_shape), inits), rng)


def test_slice_step_along_a_dynamic_axis_is_refused():
    inits = {name: np.array(v, dtype=np.int64) for name, v in dict(starts=[0], ends=[BIG], axes=[0], steps=[2]).items()}
    with pytest.raises(ExportError, match=r"'Slice_Y' \(Slice\): step 2 along axis 0.*--input-size"):
        gradient_model(Case([node("Slice", ["X", "starts", "ends", "axes", "steps"])], np.ones((2, 4)), inits),
                       np.float32)


@FEW
@given(data=st.data(), seed=seeds, x_shape=st.tuples(st.integers(1, 4), st.integers(1, 4)), axis=st.integers(0, 1))
def test_slice_of_a_dynamic_axis(data, seed, x_shape, axis):
    """A part of the dynamic batch or of a symbolic axis (x[1:], x[:, -1:], x[:2], ...; starts and ends
    from either side, or beyond it): the pads come from the run-time extent."""
    rng = np.random.default_rng(seed)
    extent = x_shape[axis]
    first = data.draw(st.integers(0, extent - 1))
    stop = data.draw(st.integers(first + 1, extent))
    start = data.draw(st.sampled_from([first, first - extent] + ([-BIG] if first == 0 else [])))
    end = data.draw(st.sampled_from([stop, stop + 2] + ([stop - extent] if stop < extent else [BIG])))
    inits = {name: np.array(v, dtype=np.int64) for name, v in dict(starts=[start], ends=[end], axes=[axis]).items()}
    check(Case([node("Slice", ["X", "starts", "ends", "axes"])], rng.standard_normal(x_shape), inits,
               batch_independent=axis != 0, symbolic_axes=(1,)), rng)


@FEW
@given(seed=seeds, x_shape=st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 2)), symbolic=st.booleans(),
       how=st.sampled_from(["chunk0", "chunk1", "chunk2", "last_half"]))
def test_slice_with_bounds_computed_at_run_time(seed, x_shape, symbolic, how):
    """Starts and ends computed from Shape(X), as torch's legacy exporter writes chunk/split of a
    dynamic axis (MaxViT's q, k, v): chunk k of 3 is [k * ceil(n/3), (k + 1) * ceil(n/3)); and a
    negative run-time start, x[:, -(n // 2):] with the end a constant."""
    rng = np.random.default_rng(seed)
    nodes = [node("Shape", ["X"], ["extent"], start=1, end=2)]
    if how.startswith("chunk"):
        k = int(how[-1])
        nodes += [node("Add", ["extent", "two"], ["rounded_up"]), node("Div", ["rounded_up", "three"], ["size"]),
                  node("Mul", ["size", "k"], ["starts"]), node("Mul", ["size", "k1"], ["ends"])]
        inits = {"two": np.array([2]), "three": np.array([3]), "k": np.array([k]), "k1": np.array([k + 1])}
        assume(k * -(-x_shape[1] // 3) < x_shape[1])  # a non-empty chunk
    else:
        nodes += [node("Div", ["extent", "two"], ["half"]), node("Neg", ["half"], ["starts"])]
        inits = {"two": np.array([2]), "ends": np.array([BIG])}
        assume(x_shape[1] >= 2)
    inits = {name: np.asarray(v, dtype=np.int64) for name, v in {**inits, "axes": np.array([1])}.items()}
    nodes.append(node("Slice", ["X", "starts", "ends", "axes"]))
    check(Case(nodes, rng.standard_normal(x_shape), inits, symbolic_axes=(1,) if symbolic else ()), rng)


@FEW
@given(seed=seeds, pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), x_shape=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_pad_of_dynamic_axes(seed, pads, x_shape):
    """Pad of the dynamic batch axis and a symbolic one: the crop needs no static extent."""
    rng = np.random.default_rng(seed)
    inits = {"pads": np.array(pads, dtype=np.int64)}
    check(Case([node("Pad", ["X", "pads"], mode="constant")], rng.standard_normal(x_shape), inits,
               batch_independent=pads[0] == pads[2] == 0, symbolic_axes=(1,)), rng)


@FEW
@given(data=st.data(), seed=seeds, tokens=st.integers(1, 4), batch=st.integers(1, 3))
def test_concat_with_a_dynamic_extent_along_the_axis(data, seed, tokens, batch):
    """ViT's class token: Concat([cls expanded to the batch, X]) along the token axis, where X's token
    count is symbolic (as shape inference leaves it in torch's legacy exports with a dynamic batch)."""
    rng = np.random.default_rng(seed)
    width = 3
    x_first = data.draw(st.booleans())
    nodes = [
        node("Shape", ["X"], ["batch"], start=0, end=1),
        node("Concat", ["batch", "one_width"], ["cls_shape"], axis=0),
        node("Expand", ["cls", "cls_shape"], ["cls_b"]),
        node("Concat", ["X", "cls_b"] if x_first else ["cls_b", "X"], ["C"], axis=1),
        node("Mul", ["C", "C"]),
    ]
    inits = {"cls": rng.standard_normal((1, 1, width)), "one_width": np.array([1, width], dtype=np.int64)}
    case = Case(nodes, rng.standard_normal((batch, tokens, width)), inits, symbolic_axes=(1,))
    assert not isinstance(GraphIndex(forward_model(case, np.float32)).shape("C")[1], int)
    check(case, rng)


@SOME
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, max_side=4), seed=seeds, index_rank=st.integers(0, 2),
       runtime_indices=st.booleans())
def test_gather_along_a_symbolic_axis(data, x_shape, seed, index_rank, runtime_indices):
    """Gather along a non-batch axis whose extent shape inference lost (CaiT/XCiT/PiT/CoaT's x[:, 0] in
    legacy exports), with constant indices (negative, repeated) or indices computed at run time
    (here from Shape(X): the last position, x[:, -1] written as x[:, n - 1])."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    dim = x_shape[axis]
    if runtime_indices:
        nodes = [node("Shape", ["X"], ["extent"], start=axis, end=axis + 1),
                 node("Sub", ["extent", "one"], ["last"]),
                 node("Reshape", ["last", "index_shape"], ["I"])]
        inits = {"one": np.array([1], dtype=np.int64), "index_shape": np.array([1] * index_rank, dtype=np.int64)}
    else:
        nodes = []
        inits = {"I": rng.integers(-dim, dim, size=tuple(data.draw(st.integers(1, 3)) for _ in range(index_rank)))}
    symbolic = tuple(range(1, rank)) if data.draw(st.booleans()) else (axis,)
    nodes.append(node("Gather", ["X", "I"], axis=axis - rank if data.draw(st.booleans()) else axis))
    check(Case(nodes, rng.standard_normal(x_shape), inits, symbolic_axes=symbolic), rng)


# --------------------------------------------------------------------------------------------
# Tile, DepthToSpace, SpaceToDepth
# --------------------------------------------------------------------------------------------


@FEW
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, max_side=3, max_size=24), seed=seeds,
       tile_batch=st.booleans())
def test_tile(data, x_shape, seed, tile_batch):
    """Repeats 1-3 along every axis; the batch is tiled only when static."""
    rng = np.random.default_rng(seed)
    repeats = [2 if tile_batch else 1] + [data.draw(st.integers(1, 3)) for _ in x_shape[1:]]
    check(Case([node("Tile", ["X", "repeats"])], rng.standard_normal(x_shape),
               {"repeats": np.array(repeats, dtype=np.int64)}, batch_independent=not tile_batch,
               dynamic_batch=not tile_batch), rng)


@FEW
@given(seed=seeds, block=st.integers(1, 3), channels=st.integers(1, 2), h=st.integers(1, 3), w=st.integers(1, 3),
       mode=st.sampled_from(["DCR", "CRD"]))
def test_depth_to_space(seed, block, channels, h, w, mode):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, channels * block**2, h, w))
    check(Case([node("DepthToSpace", ["X"], blocksize=block, mode=mode)], x), rng)


@FEW
@given(seed=seeds, block=st.integers(1, 3), channels=st.integers(1, 2), h=st.integers(1, 2), w=st.integers(1, 3))
def test_space_to_depth(seed, block, channels, h, w):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, channels, h * block, w * block))
    check(Case([node("SpaceToDepth", ["X"], blocksize=block)], x), rng)


# --------------------------------------------------------------------------------------------
# ConvTranspose
# --------------------------------------------------------------------------------------------


@st.composite
def conv_transpose_cases(draw):
    """(x shape, W shape, attributes) of a 1-D or 2-D ConvTranspose: groups, strides, dilations,
    pads or auto_pad, and output_padding (smaller than the stride, as torch requires)."""
    n = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    c_in, c_out = group * draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    strides = [draw(st.integers(1, 3)) for _ in range(n)]
    dilations = [draw(st.integers(1, 2)) for _ in range(n)]
    pads = [draw(st.integers(0, (k - 1) * d)) for k, d in zip(kernel * 2, dilations * 2)]
    output_padding = [draw(st.integers(0, s - 1)) for s in strides]
    spatial = [draw(st.integers(1, 4)) for _ in range(n)]
    full = [(i - 1) * s + op + (k - 1) * d + 1 for i, s, op, k, d in zip(spatial, strides, output_padding, kernel, dilations)]
    attrs = dict(group=group, strides=strides, dilations=dilations, output_padding=output_padding, kernel_shape=kernel)
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
        assume(min(f - pb - pe for f, pb, pe in zip(full, pads[:n], pads[n:])) >= 1)
    else:
        attrs["auto_pad"] = auto_pad
        assume(auto_pad == "VALID" or all(f >= i * s for f, i, s in zip(full, spatial, strides)))
    return (draw(st.integers(1, 2)), c_in, *spatial), (c_in, c_out, *kernel), attrs


@SOME
@given(case=conv_transpose_cases(), seed=seeds, bias=st.booleans())
def test_conv_transpose(case, seed, bias):
    x_shape, w_shape, attrs = case
    rng = np.random.default_rng(seed)
    inits = {"W": rng.standard_normal(w_shape)}
    if bias:
        inits["B"] = rng.standard_normal(w_shape[1] * attrs["group"])
    inputs = ["X", "W", "B"] if bias else ["X", "W"]
    check(Case([node("ConvTranspose", inputs, **attrs)], rng.standard_normal(x_shape), inits), rng)


@pytest.mark.parametrize("stride,padding,output_padding,dilation,groups", [
    (2, 1, 1, 1, 1), (2, 0, 0, 1, 2), (3, 1, 2, 1, 1), (1, 1, 0, 2, 2), (2, 2, 1, 2, 1),
])
def test_conv_transpose_matches_torch(stride, padding, output_padding, dilation, groups):
    """The gradient of torch's nn.ConvTranspose2d as exported (explicit pads, output_padding)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 3))
    w = rng.standard_normal((4, 3, 3, 3))
    attrs = dict(strides=[stride] * 2, pads=[padding] * 4, output_padding=[output_padding] * 2,
                 dilations=[dilation] * 2, group=groups, kernel_shape=[3, 3])
    case = Case([node("ConvTranspose", ["X", "W"], **attrs)], x, {"W": w})

    def forward(t):
        return F.conv_transpose2d(t, torch.tensor(w), stride=stride, padding=padding, output_padding=output_padding,
                                  groups=groups, dilation=dilation)

    g = rng.standard_normal(forward(torch.tensor(x)).shape)
    np.testing.assert_allclose(run_gradient(case, g), torch_gradient(forward, x, g), rtol=0, atol=1e-4)


@pytest.mark.parametrize("attrs,refused", [
    (dict(auto_pad="SAME_UPPER"), "auto_pad 'SAME_UPPER' with a kernel smaller than the stride"),
    (dict(output_shape=[4, 4]), "the output_shape attribute"),
])
def test_conv_transpose_unsupported_attributes_are_refused(attrs, refused):
    case = Case([node("ConvTranspose", ["X", "W"], strides=[2, 2], **attrs)], np.ones((1, 1, 2, 2)),
                {"W": np.ones((1, 1, 1, 1))})
    with pytest.raises(ExportError, match=rf"'ConvTranspose_Y' \(ConvTranspose\): {refused}"):
        gradient_model(case, np.float32)


def test_conv_transpose_weight_gradient_is_refused():
    nodes = [node("Tanh", ["X"], ["W"]), node("ConvTranspose", ["X", "W"])]
    with pytest.raises(ExportError, match=r"ConvTranspose weights or bias are not supported"):
        gradient_model(Case(nodes, np.ones((1, 1, 2, 2))), np.float32)


# --------------------------------------------------------------------------------------------
# Einsum
# --------------------------------------------------------------------------------------------

#: (equation, operand shapes); operand "X" is the tested input, "T" is Tanh(X) (so a gradient flows
#: through both), the others are constants. A batch letter in a constant needs a static batch.
EINSUMS = [
    ("bhwc,cd->bhwd", [("X", (2, 2, 3, 3)), ("W", (3, 2))]),  # a channels-last linear layer
    ("bij,bjk->bik", [("X", (2, 3, 3)), ("T", (2, 3, 3))]),  # batched matmul, both operands on the path
    ("bchw,bkc->bkhw", [("X", (2, 3, 2, 2)), ("W", (2, 2, 3))]),
    ("bkc,bchw->bkhw", [("X", (2, 2, 3)), ("W", (2, 3, 2, 2))]),
    ("ij,jk", [("X", (2, 3)), ("W", (3, 4))]),  # implicit output 'ik'
    ("bij,jk->bk", [("X", (2, 3, 2)), ("W", (2, 2))]),  # i summed in X alone: its gradient broadcasts
    ("bi,ij,jk->bk", [("X", (2, 3)), ("W", (3, 2)), ("V", (2, 4))]),
    ("bhwc,bhwc->bhw", [("X", (2, 2, 2, 3)), ("X", (2, 2, 2, 3))]),  # X twice: both contributions add
    ("bi,j->bij", [("X", (2, 3)), ("W", (2,))]),  # outer product
    ("b i , i j -> b j", [("X", (2, 3)), ("W", (3, 2))]),  # spaces are allowed
    ("...ij,jk->...ik", [("X", (2, 3, 2, 3)), ("W", (3, 2))]),  # an ellipsis, spelled out in spare letters
    ("b...c,cd->b...d", [("X", (2, 2, 2, 3)), ("W", (3, 2))]),
    ("...ij,...jk->...ik", [("X", (2, 3, 3)), ("T", (2, 3, 3))]),
    ("...ij,jk->...ik", [("X", (2, 3, 2)), ("W", (2, 2))]),
    ("...ij,ij->...", [("X", (2, 2, 3)), ("W", (2, 3))]),
    ("...i,i", [("X", (2, 2, 3)), ("W", (3,))]),  # implicit output '...'
]


@pytest.mark.parametrize("equation,operands", EINSUMS, ids=[e for e, _ in EINSUMS])
@pytest.mark.parametrize("seed", [0, 1])
def test_einsum(equation, operands, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dict(operands)["X"])
    inits = {name: rng.standard_normal(shape) for name, shape in operands if name not in ("X", "T")}
    static_batch = any(name in inits and term.strip()[0] == "b"
                       for (name, _), term in zip(operands, equation.split("->")[0].split(",")))
    nodes = [node("Tanh", ["X"], ["T"]), node("Einsum", [name for name, _ in operands], equation=equation)]
    check(Case(nodes, x, inits, batch_independent=not static_batch, dynamic_batch=not static_batch), rng)


@pytest.mark.parametrize("equation,x_shape,w_shape,refused", [
    ("bii->bi", (1, 2, 2), None, "repeats an index"),
    ("...ij,...jk->...ik", (1, 2, 2, 2), (2, 1, 2, 2), "broadcasts a size-1 dimension of its ellipsis"),
])
def test_einsum_unsupported_equations_are_refused(equation, x_shape, w_shape, refused):
    case = Case([node("Einsum", ["X", "W"] if w_shape else ["X"], equation=equation)], np.ones(x_shape),
                {"W": np.ones(w_shape)} if w_shape else {}, dynamic_batch=False)
    with pytest.raises(ExportError, match=rf"'Einsum_Y' \(Einsum\): .*{refused}"):
        gradient_model(case, np.float32)


# --------------------------------------------------------------------------------------------
# Upsample (opset 7-9), which the front end converts to Resize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_converted_by_the_front_end(mode):
    """An opset-9 Upsample, lifted to opset 17 by `prepare`, then differentiated by the Resize rule: the
    gradient is the original file's, A^T g with A (Upsample is linear) read off onnxruntime's run of
    the opset-9 file on the identity basis (the reference evaluator has no linear Upsample)."""
    rng = np.random.default_rng(0)
    scales = node("Constant", [], ["scales"], value=numpy_helper.from_array(np.array([1, 1, 2, 3], dtype=np.float32)))
    case = Case([scales, node("Upsample", ["X", "scales"], mode=mode)], rng.standard_normal((2, 2, 3, 2)), opset=9)
    original = ort.InferenceSession(forward_model(case, np.float32).SerializeToString(), providers=["CPUExecutionProvider"])
    per_sample = case.x[0].size
    basis = np.eye(per_sample, dtype=np.float32).reshape(per_sample, *case.x.shape[1:])
    jacobian = original.run(None, {"X": basis})[0].reshape(per_sample, -1)  # [input position, output position]
    g = rng.standard_normal((2, 2, 6, 6))
    want = (g.reshape(2, -1) @ jacobian.T).reshape(case.x.shape)
    converted = prepare(forward_model(case, np.float32))
    converted_case = Case(list(converted.graph.node), case.x,
                          {init.name: numpy_helper.to_array(init) for init in converted.graph.initializer}, opset=17)
    np.testing.assert_allclose(run_gradient(converted_case, g), want, rtol=0, atol=1e-5 * np.abs(want).max())
