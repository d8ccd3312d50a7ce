"""Backward rules of ops that only move data: reshapes, transposes, concatenation, slicing, padding."""

from __future__ import annotations

import numpy as np
import onnx

from camrt.errors import ExportError

from ..graph import attribute
from ..reverse import RuleContext, RuleTable, registering

RULES: RuleTable = {}
rule = registering(RULES)


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: RuleContext, node, grads):
    x = node.input[0]
    return [ctx.emit("Reshape", [grads[0], ctx.shape_of(x)])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose(ctx: RuleContext, node, grads):
    rank = ctx.index.rank(node.input[0])
    perm = attribute(node, "perm", None) or list(reversed(range(rank)))
    return [ctx.emit("Transpose", [grads[0]], perm=[int(i) for i in np.argsort(perm)])]


@rule("Expand")
def expand(ctx: RuleContext, node, grads):
    return [ctx.unbroadcast(grads[0], node.input[0], node.output[0]), None]


@rule("Gather")
def gather(ctx: RuleContext, node, grads):
    """Along axis 0 (any indices, e.g. the run-time indices torch's as_strided becomes on a flattened
    batch): scatter-add g into zeros. Along another axis, with constant indices: contract g with
    one_hot(indices) (repeated indices add up), the axis moved last for a MatMul, then back."""
    x, indices = node.input
    rank = ctx.index.rank(x)
    axis = attribute(node, "axis", 0) % rank
    if axis == 0:
        return [_scatter_rows(ctx, x, indices, grads[0]), None]
    shape = ctx.static_shape(x)
    picked = ctx.require_value(indices, "the gather indices").reshape(-1) % shape[axis]
    one_hot = np.eye(shape[axis])[picked]
    flat = ctx.emit("Reshape", [grads[0], ctx.ints([0] * axis + [-1, *shape[axis + 1:]])])
    to_last = [a for a in range(rank) if a != axis] + [axis]
    spread = ctx.emit("MatMul", [ctx.emit("Transpose", [flat], perm=to_last), ctx.const(one_hot, like=x)])
    return [ctx.emit("Transpose", [spread], perm=[int(a) for a in np.argsort(to_last)]), None]


def _scatter_rows(ctx: RuleContext, x: str, indices: str, g: str) -> str:
    """dx[i] = sum of g over the positions whose index is i: ScatterND(zeros, indices[..., None], g, add)."""
    rows = ctx.emit("Gather", [ctx.shape_of(x), ctx.ints([0])], axis=0)
    indices = ctx.emit("Cast", [indices], to=onnx.TensorProto.INT64)
    wrapped = ctx.emit("Where", [ctx.emit("Less", [indices, ctx.ints(0)]),
                                 ctx.emit("Add", [indices, rows]), indices])
    return ctx.emit("ScatterND", [ctx.zeros_like(x), ctx.emit("Unsqueeze", [wrapped, ctx.ints([-1])]), g],
                    reduction="add")


def _axis_sizes(ctx: RuleContext, names, axis: int) -> list[int]:
    sizes = []
    for name in names:
        dim = (ctx.shape(name) or [None] * (axis + 1))[axis]
        if not isinstance(dim, int):
            raise ExportError(f"node {ctx.node.name!r} ({ctx.node.op_type}): needs static sizes along axis {axis}")
        sizes.append(dim)
    return sizes


@rule("Concat")
def concat(ctx: RuleContext, node, grads):
    rank = ctx.index.rank(node.output[0])
    axis = attribute(node, "axis") % rank
    sizes = _axis_sizes(ctx, node.input, axis)
    parts = ctx.emit("Split", [grads[0], ctx.ints(sizes)], n_outputs=len(sizes), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p if ctx.needs(i) else None for i, p in enumerate(parts)]


@rule("Split")
def split(ctx: RuleContext, node, grads):
    rank = ctx.index.rank(node.input[0])
    axis = attribute(node, "axis", 0) % rank
    pieces = [g if g is not None else ctx.zeros_like(out) for g, out in zip(grads, node.output)]
    return [ctx.emit("Concat", pieces, axis=axis)] + [None] * (len(node.input) - 1)


@rule("Slice")
def slice_(ctx: RuleContext, node, grads):
    """Zero-pad the gradient back to the input's extent (unit steps only)."""
    x = node.input[0]
    shape = ctx.shape(x)
    rank = len(shape)
    if ctx.opset < 10:
        starts, ends = attribute(node, "starts"), attribute(node, "ends")
        axes = attribute(node, "axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = ctx.require_value(node.input[1], "the slice starts").tolist()
        ends = ctx.require_value(node.input[2], "the slice ends").tolist()
        axes = (ctx.require_value(node.input[3], "the slice axes").tolist()
                if len(node.input) > 3 and node.input[3] else list(range(len(starts))))
        steps = (ctx.require_value(node.input[4], "the slice steps").tolist()
                 if len(node.input) > 4 and node.input[4] else [1] * len(starts))
    if any(s != 1 for s in steps):
        raise ExportError(f"node {node.name!r} (Slice): only unit steps are supported by the backward rule")
    begins, tails = [0] * rank, [0] * rank
    for start, end, axis in zip(starts, ends, axes):
        axis %= rank
        dim = shape[axis]
        if not isinstance(dim, int):
            if start == 0 and end >= np.iinfo(np.int32).max:  # all of it, e.g. a batch axis
                continue
            raise ExportError(f"node {node.name!r} (Slice): slices a dynamic axis {axis}")
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        begins[axis], tails[axis] = start, dim - max(end, start)
    return [ctx.emit("Pad", [grads[0], ctx.ints(begins + tails)], mode="constant")] + [None] * (len(node.input) - 1)


@rule("Pad")
def pad(ctx: RuleContext, node, grads):
    """Crop the gradient back to the unpadded region (constant mode, non-negative pads)."""
    x = node.input[0]
    mode = attribute(node, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise ExportError(f"node {node.name!r} (Pad): only constant padding has a backward rule, got {mode!r}")
    shape = ctx.static_shape(x)
    rank = len(shape)
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
    starts = pads[:n]
    if any(not isinstance(shape[a], int) for a in axes if pads[axes.index(a)] or pads[n + axes.index(a)]):
        raise ExportError(f"node {node.name!r} (Pad): pads a dynamic axis")
    ends = [pads[i] + shape[a] if isinstance(shape[a], int) else np.iinfo(np.int64).max for i, a in enumerate(axes)]
    return [ctx.emit("Slice", [grads[0], ctx.ints(starts), ctx.ints(ends), ctx.ints(axes)])] + [None] * (len(node.input) - 1)
