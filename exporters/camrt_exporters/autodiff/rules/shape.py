"""Backward rules of ops that only move data: reshapes, transposes, concatenation, slicing, padding."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import ExportError
from ..graph import attribute
from ..reverse import RuleContext, RuleTable, registering

RULES: RuleTable = {}
rule = registering(RULES)


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: RuleContext, node, grads):
    """The same elements in another shape: dX = g reshaped to X's (run-time) shape."""
    x = node.input[0]
    return [ctx.emit("Reshape", [grads[0], ctx.shape_of(x)])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose(ctx: RuleContext, node, grads):
    """dX = g transposed by the inverse permutation."""
    rank = ctx.index.rank(node.input[0])
    perm = attribute(node, "perm", None) or list(reversed(range(rank)))
    return [ctx.emit("Transpose", [grads[0]], perm=[int(i) for i in np.argsort(perm)])]


@rule("Expand")
def expand(ctx: RuleContext, node, grads):
    """Y broadcasts X: dX = g summed over the broadcast axes."""
    return [ctx.unbroadcast(grads[0], node.input[0], node.output[0]), None]


@rule("Gather")
def gather(ctx: RuleContext, node, grads):
    """dX is g put back at the gathered positions, repeated indices adding up. Constant indices along
    a non-batch axis, with static extents: g contracted with one_hot(indices). Otherwise (axis 0,
    e.g. the run-time indices torch's as_strided becomes on a flattened batch; run-time indices;
    extents shape inference lost): a scatter-add of g into zeros."""
    x, indices = node.input
    rank = ctx.index.rank(x)
    axis = attribute(node, "axis", 0) % rank
    shape = ctx.shape(x) or (None,) * rank
    picked = ctx.value(indices)
    if axis == 0 or picked is None or not all(isinstance(d, int) for d in shape[1:]):
        return [_scatter_along(ctx, x, axis, indices, grads[0]), None]
    picked = picked.reshape(-1) % shape[axis]
    flat = ctx.emit("Reshape", [grads[0], ctx.ints([0] * axis + [-1, *shape[axis + 1:]])])
    return [along_axis(ctx, flat, axis, rank, np.eye(shape[axis])[picked], like=x), None]


def along_axis(ctx: RuleContext, g: str, axis: int, rank: int, matrix: np.ndarray, like: str) -> str:
    """Contract axis `axis` of `g` (length matrix.shape[0]) with `matrix`: out[..., j, ...] =
    sum_i g[..., i, ...] matrix[i, j]. A MatMul, with the axis moved last unless it is one of the
    last two."""
    if axis == rank - 1:
        return ctx.emit("MatMul", [g, ctx.const(matrix, like=like)])
    if axis == rank - 2:
        return ctx.emit("MatMul", [ctx.const(np.ascontiguousarray(matrix.T), like=like), g])
    to_last = [a for a in range(rank) if a != axis] + [axis]
    spread = ctx.emit("MatMul", [ctx.emit("Transpose", [g], perm=to_last), ctx.const(matrix, like=like)])
    return ctx.emit("Transpose", [spread], perm=[int(a) for a in np.argsort(to_last)])


def _scatter_along(ctx: RuleContext, x: str, axis: int, indices: str, g: str) -> str:
    """dX[..., i, ...] (i along `axis`) = the sum of g over the positions whose index is i: a scatter-add
    along axis 0, with X's `axis` and g's index axes moved first (and back)."""
    rank = ctx.index.rank(x)
    if axis == 0:
        return _scatter_rows(ctx, ctx.shape_of(x), x, indices, g)
    index_rank = ctx.index.rank(indices)
    if index_rank is None:
        raise ExportError(f"node {ctx.node.name!r} (Gather): the rank of the indices {indices!r} is unknown; "
                          "run ONNX shape inference on the model first")
    x_first = [axis] + [a for a in range(rank) if a != axis]
    g_first = [*range(axis, axis + index_rank), *range(axis), *range(axis + index_rank, rank + index_rank - 1)]
    moved_shape = ctx.emit("Gather", [ctx.shape_of(x), ctx.ints(x_first)], axis=0)
    scattered = _scatter_rows(ctx, moved_shape, x, indices, ctx.emit("Transpose", [g], perm=g_first))
    return ctx.emit("Transpose", [scattered], perm=[int(a) for a in np.argsort(x_first)])


def _scatter_rows(ctx: RuleContext, shape: str, like: str, indices: str, g: str) -> str:
    """out[i] = sum of g over the positions whose index is i, for out of run-time `shape` and the dtype of
    `like`: ScatterND(zeros, indices[..., None] (negative ones wrapped), g, add)."""
    rows = ctx.emit("Gather", [shape, ctx.ints(0)], axis=0)  # a scalar: the indices keep their shape
    indices = ctx.emit("Cast", [indices], to=onnx.TensorProto.INT64)
    wrapped = ctx.emit("Where", [ctx.emit("Less", [indices, ctx.ints(0)]),
                                 ctx.emit("Add", [indices, rows]), indices])
    zeros = ctx.emit("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, dtype=ctx.np_dtype(like))))
    return ctx.scatter_add("ScatterND", zeros, ctx.emit("Unsqueeze", [wrapped, ctx.ints([-1])]), g, like=like)


def _extent(ctx: RuleContext, name: str, axis: int) -> str:
    """The length of `name` along `axis` as a 1-element int64 tensor: a constant when static, else read at run time."""
    dim = (ctx.shape(name) or [None] * (axis + 1))[axis]
    if isinstance(dim, int):
        return ctx.ints([dim])
    return ctx.emit("Shape", [name], start=axis, end=axis + 1)


@rule("Concat")
def concat(ctx: RuleContext, node, grads):
    """dX_i is the i-th piece of g along the axis; the piece sizes are read at run time where shape
    inference lost them (e.g. a class token concatenated to a dynamic-batch sequence)."""
    rank = ctx.index.rank(node.output[0])
    axis = attribute(node, "axis") % rank
    sizes = [(ctx.shape(name) or [None] * rank)[axis] for name in node.input]
    if all(isinstance(size, int) for size in sizes):
        split = ctx.ints(sizes)
    else:
        split = ctx.emit("Concat", [_extent(ctx, name, axis) for name in node.input], axis=0)
    parts = ctx.emit("Split", [grads[0], split], n_outputs=len(sizes), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p if ctx.needs(i) else None for i, p in enumerate(parts)]


@rule("Split")
def split(ctx: RuleContext, node, grads):
    """dX = the pieces' gradients concatenated back (zeros for pieces no gradient reaches)."""
    rank = ctx.index.rank(node.input[0])
    axis = attribute(node, "axis", 0) % rank
    pieces = [g if g is not None else ctx.zeros_like(out) for g, out in zip(grads, node.output)]
    return [ctx.emit("Concat", pieces, axis=axis)] + [None] * (len(node.input) - 1)


#: a Slice bound: a constant, or the name of a 1-element int64 tensor computed at run time
Bound = int | str


def _slice_bounds(ctx: RuleContext, name: str, what: str, count: int | None) -> list[Bound]:
    """The starts or ends of a Slice: constants, or per-axis pieces of a run-time tensor (torch's legacy
    exporter computes them from Shape for chunk/split of a dynamic axis)."""
    value = ctx.value(name)
    if value is not None:
        return value.tolist()
    if count is None:
        raise ExportError(f"node {ctx.node.name!r} (Slice): {what} ({name!r}) are computed at run time and "
                          "their count is unknown; run ONNX shape inference on the model first")
    bounds = ctx.emit("Cast", [name], to=onnx.TensorProto.INT64)
    return [ctx.emit("Slice", [bounds, ctx.ints([i]), ctx.ints([i + 1])]) for i in range(count)]


def _slice_parameters(ctx: RuleContext, node) -> tuple[list[Bound], list[Bound], list[int], list[int]]:
    """starts, ends, axes, steps of a Slice node (attributes before opset 10, inputs after: axes and
    steps constant, starts and ends possibly computed at run time)."""
    if ctx.opset < 10:
        starts, ends = list(attribute(node, "starts")), list(attribute(node, "ends"))
        axes = list(attribute(node, "axes", list(range(len(starts)))))
        return starts, ends, axes, [1] * len(starts)
    axes = (ctx.require_value(node.input[3], "the slice axes").tolist()
            if len(node.input) > 3 and node.input[3] else None)
    count = len(axes) if axes is not None else (ctx.shape(node.input[1]) or [None])[0]
    starts = _slice_bounds(ctx, node.input[1], "the slice starts", count)
    ends = _slice_bounds(ctx, node.input[2], "the slice ends", count)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = (ctx.require_value(node.input[4], "the slice steps").tolist()
             if len(node.input) > 4 and node.input[4] else [1] * len(starts))
    return starts, ends, axes, steps


def _runtime_bounds(ctx: RuleContext, x: str, axis: int, start: Bound, end: Bound) -> tuple[str, str]:
    """(begin, tail) pads of a unit-step slice of a dynamic axis or with bounds computed at run time:
    start and end wrapped and clamped to [0, extent] at run time (ONNX Slice semantics), tail =
    extent - max(end, start)."""
    extent = _extent(ctx, x, axis)

    def clamped(bound: Bound) -> str:
        if isinstance(bound, str):
            wrapped = ctx.emit("Where", [ctx.emit("Less", [bound, ctx.ints([0])]), ctx.emit("Add", [bound, extent]), bound])
            return ctx.emit("Min", [ctx.emit("Max", [wrapped, ctx.ints([0])]), extent])
        if bound >= 0:
            return ctx.emit("Min", [ctx.ints([bound]), extent])
        return ctx.emit("Max", [ctx.emit("Add", [extent, ctx.ints([bound])]), ctx.ints([0])])

    begin = clamped(start)
    tail = ctx.emit("Sub", [extent, ctx.emit("Max", [clamped(end), begin])])
    return begin, tail


@rule("Slice")
def slice_(ctx: RuleContext, node, grads):
    """dX is g put back at the sliced positions, zeros elsewhere. Unit steps: zero-pad g (pads computed at
    run time on a dynamic axis or for run-time bounds). Other steps (negative ones too), with constant
    bounds along an axis of static extent n: g @ one_hot(picked positions), picked =
    range(n)[start:end:step] (ONNX clamps as Python does)."""
    x, g = node.input[0], grads[0]
    shape = ctx.shape(x)
    rank = len(shape)
    begins: list[str | int] = [0] * rank
    tails: list[str | int] = [0] * rank
    for start, end, axis, step in zip(*_slice_parameters(ctx, node)):
        axis %= rank
        dim = shape[axis]
        runtime = isinstance(start, str) or isinstance(end, str)
        if step != 1:
            if not isinstance(dim, int):
                raise ExportError(
                    f"node {node.name!r} (Slice): step {step} along axis {axis}, whose extent is not static; "
                    "export with a fixed input size (--input-size)")
            if runtime:
                raise ExportError(f"node {node.name!r} (Slice): step {step} with starts or ends computed at run "
                                  "time has no backward rule")
            picked = np.arange(dim)[start:end:step]
            g = along_axis(ctx, g, axis, rank, np.eye(dim)[picked], like=x)
        elif runtime:
            begins[axis], tails[axis] = _runtime_bounds(ctx, x, axis, start, end)
        elif isinstance(dim, int):
            start = min(max(start + dim if start < 0 else start, 0), dim)
            end = min(max(end + dim if end < 0 else end, 0), dim)
            begins[axis], tails[axis] = start, dim - max(end, start)
        elif not (start == 0 and end >= np.iinfo(np.int32).max):  # all of a dynamic axis needs no pads
            begins[axis], tails[axis] = _runtime_bounds(ctx, x, axis, start, end)
    pads = begins + tails
    if any(isinstance(p, str) for p in pads):
        pads_input = ctx.emit("Concat", [p if isinstance(p, str) else ctx.ints([p]) for p in pads], axis=0)
    else:
        pads_input = ctx.ints(pads)
    if any(pads):
        g = ctx.emit("Pad", [g, pads_input], mode="constant")
    return [g] + [None] * (len(node.input) - 1)


@rule("Pad")
def pad(ctx: RuleContext, node, grads):
    """Crop the gradient back to the unpadded region (constant mode, non-negative pads): a Slice from
    the begin pads to minus the end pads, so no extent needs to be static."""
    mode = attribute(node, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise ExportError(f"node {node.name!r} (Pad): only constant padding has a backward rule, got {mode!r}")
    rank = ctx.index.rank(node.input[0])
    if ctx.opset < 11:
        pads = list(attribute(node, "pads"))
    else:
        pads = ctx.require_value(node.input[1], "the pads").tolist()
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [a % rank for a in ctx.require_value(node.input[3], "the pad axes").tolist()]
    if min(pads) < 0:
        raise ExportError(f"node {node.name!r} (Pad): negative pads are not supported by the backward rule")
    n = len(axes)
    ends = [-end if end else np.iinfo(np.int64).max for end in pads[n:]]
    return [ctx.emit("Slice", [grads[0], ctx.ints(pads[:n]), ctx.ints(ends), ctx.ints(axes)])] + [None] * (len(node.input) - 1)


@rule("Tile")
def tile(ctx: RuleContext, node, grads):
    """Y = tile(X, r): Y viewed as [r0, d0, r1, d1, ...] repeats X along the r axes, so
    dX = ReduceSum of that view of g over the r axes (the extents d read at run time)."""
    x = node.input[0]
    repeats = ctx.require_value(node.input[1], "the repeats").astype(np.int64)
    rank = len(repeats)
    pairs = ctx.emit("Concat", [ctx.const(repeats[:, None], dtype=np.int64),
                                ctx.emit("Unsqueeze", [ctx.shape_of(x), ctx.ints([1])])], axis=1)
    view = ctx.emit("Reshape", [grads[0], ctx.emit("Reshape", [pairs, ctx.ints([-1])])])
    return [ctx.emit("ReduceSum", [view, ctx.ints(list(range(0, 2 * rank, 2)))], keepdims=0), None]


def _depth_to_space_mode(node) -> str:
    mode = attribute(node, "mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("DCR", "CRD"):
        raise ExportError(f"node {node.name!r} (DepthToSpace): unknown mode {mode!r}")
    return mode


@rule("DepthToSpace")
def depth_to_space(ctx: RuleContext, node, grads):
    """A permutation of X, so dX is g permuted back: SpaceToDepth(g) for mode DCR (its exact
    inverse); for CRD, g viewed as [N, C/b², H, b, W, b], transposed to [N, C/b², b, b, H, W]."""
    block = attribute(node, "blocksize")
    if _depth_to_space_mode(node) == "DCR":
        return [ctx.emit("SpaceToDepth", [grads[0]], blocksize=block)]
    _, c, h, w = ctx.static_shape(node.input[0])
    view = ctx.emit("Reshape", [grads[0], ctx.ints([0, c // block**2, h, block, w, block])])
    moved = ctx.emit("Transpose", [view], perm=[0, 1, 3, 5, 2, 4])
    return [ctx.emit("Reshape", [moved, ctx.ints([0, c, h, w])])]


@rule("SpaceToDepth")
def space_to_depth(ctx: RuleContext, node, grads):
    """The inverse permutation of DepthToSpace in mode DCR, so dX = DepthToSpace(g, DCR)."""
    return [ctx.emit("DepthToSpace", [grads[0]], blocksize=attribute(node, "blocksize"), mode="DCR")]
