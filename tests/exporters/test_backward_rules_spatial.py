"""Finite-difference checks of the backward rules of resampling and data-moving ops: Resize, Slice
with steps, Concat/Slice/Pad on dynamic axes, Tile, DepthToSpace/SpaceToDepth, ConvTranspose, Einsum.

The harness (tests/exporters/rule_harness.py) compares float64 (reference evaluator) and float32
(onnxruntime) gradient graphs with central differences; its forward check also confirms that the
reference evaluator and onnxruntime agree on every drawn geometry. Resize and ConvTranspose are
checked against torch autograd too (F.interpolate, conv_transpose).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from camrt.errors import ExportError
from camrt_exporters.autodiff.graph import GraphIndex

from .rule_harness import FEW, SOME, Case, check, forward_model, gradient_model, node, seeds, shapes

#: the ops whose rules this file tests (test_backward_rules.py's inventory includes them)
TESTED_OPS = {"Resize", "Tile", "DepthToSpace", "SpaceToDepth", "ConvTranspose", "Einsum"}


def run_gradient(case: Case, g: np.ndarray) -> np.ndarray:
    """dX of the float32 gradient graph in onnxruntime, for cotangent g."""
    session = ort.InferenceSession(gradient_model(case, np.float32).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["dX"], {"X": case.x.astype(np.float32), "G": g.astype(np.float32)})[0]


def torch_gradient(forward, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (forward(xt) * torch.tensor(g, dtype=torch.float64)).sum().backward()
    return xt.grad.numpy()


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------

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
        assume(all(int(n * s) >= 1 for n, s in zip(x_shape[2:], scales)))
        inits = {"scales": np.array([1.0, 1.0, *scales], dtype=np.float32)}
        inputs = ["X", "", "scales"]
    else:
        inits = {"sizes": np.array([*x_shape[:2], *(data.draw(st.integers(1, 7)) for _ in range(2))], dtype=np.int64)}
        inputs = ["X", "", "", "sizes"]
    check(Case([node("Resize", inputs, **attrs)], rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), seed=seeds, by=st.sampled_from(["scales", "sizes"]))
def test_resize_axes_attribute(data, seed, by):
    """Opset 18's `axes`: scales or sizes of the listed axes only (here W, or H and W)."""
    rng = np.random.default_rng(seed)
    axes = data.draw(st.sampled_from([[3], [2, 3], [-1, -2]]))
    if by == "scales":
        inits, inputs = {"scales": np.array([2.0, 0.5][:len(axes)], dtype=np.float32)}, ["X", "", "scales"]
    else:
        inits, inputs = {"sizes": np.array([5, 3][:len(axes)], dtype=np.int64)}, ["X", "", "", "sizes"]
    check(Case([node("Resize", inputs, mode="linear", axes=axes)], rng.standard_normal((2, 2, 4, 4)), inits), rng)


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
    inits = {"sizes": np.array([2, 3, *size], dtype=np.int64)}
    case = Case([node("Resize", ["X", "", "", "sizes"], **onnx_attrs)], x, inits)
    g = rng.standard_normal((2, 3, *size))
    want = torch_gradient(lambda t: F.interpolate(t, size=size, **torch_args), x, g)
    np.testing.assert_allclose(run_gradient(case, g), want, rtol=0, atol=1e-5)


def test_resize_of_a_dynamic_spatial_axis_is_refused():
    case = Case([node("Resize", ["X", "", "scales"], mode="linear")], np.ones((1, 1, 2, 2)),
                {"scales": np.array([1, 1, 2, 2], dtype=np.float32)}, symbolic_axes=(2,))
    with pytest.raises(ExportError, match=r"'Resize_Y' \(Resize\): resizes axis 2.*--input-size"):
        gradient_model(case, np.float32)


def test_resize_crop_and_resize_is_refused():
    case = Case([node("Resize", ["X", "roi", "scales"], mode="linear",
                      coordinate_transformation_mode="tf_crop_and_resize")], np.ones((1, 1, 2, 2)),
                {"roi": np.array([0, 0, 0, 0, 1, 1, 1, 1.0], dtype=np.float32),
                 "scales": np.array([1, 1, 2, 2], dtype=np.float32)})
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
    open-ended starts and ends; empty slices excluded."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, unique=True))
    starts, ends, steps = [], [], []
    for a in axes:
        dim = x_shape[a]
        step = data.draw(st.sampled_from([1, 2, 3, -1, -2]))
        start = data.draw(st.sampled_from([0, 1, dim - 1, -1, -dim, dim + 2, -dim - 2, BIG, -BIG]))
        end = data.draw(st.sampled_from([0, 1, dim, -1, -dim, dim + 2, -dim - 2, BIG, -BIG]))
        assume(len(range(dim)[slice(start, end, step)]) > 0)
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
@given(seed=seeds, start=st.sampled_from([0, 1, -1, -2, 5]), end=st.sampled_from([1, 2, -1, BIG, -BIG]),
       batch=st.integers(1, 3))
def test_slice_of_the_dynamic_batch_axis(seed, start, end, batch):
    """A part of the dynamic batch (x[1:], x[-1:], ...): the pads come from the run-time extent."""
    rng = np.random.default_rng(seed)
    assume(len(range(batch)[start:end]) > 0)
    inits = {name: np.array(v, dtype=np.int64) for name, v in dict(starts=[start], ends=[end], axes=[0]).items()}
    check(Case([node("Slice", ["X", "starts", "ends", "axes"])], rng.standard_normal((batch, 3)), inits,
               batch_independent=False), rng)


@FEW
@given(seed=seeds, pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), batch=st.integers(1, 3))
def test_pad_of_the_dynamic_batch_axis(seed, pads, batch):
    """Pad of the dynamic batch axis (and another): the crop needs no static extent."""
    rng = np.random.default_rng(seed)
    inits = {"pads": np.array(pads, dtype=np.int64)}
    check(Case([node("Pad", ["X", "pads"], mode="constant")], rng.standard_normal((batch, 3)), inits,
               batch_independent=False), rng)


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
