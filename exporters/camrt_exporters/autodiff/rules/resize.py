"""Backward rule of Resize (Upsample, of opsets below camrt's minimum, is converted to Resize by the front end).

Resize in modes nearest, linear and cubic is linear in X and separable: along every resized axis a,
output position o is a fixed weighted sum of input positions, Y = X x_a R_a (R_a[o, i] the weight of
input i in output o). So dX = g x_a R_a^T, one MatMul with a constant per resized axis. The matrices
are onnxruntime's own: at export time its Resize runs on an identity basis along each axis with the
node's attributes and that axis's scale or size, so the rounding of nearest modes and the
coordinate transforms agree with the runtime exactly.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from camrt.modelfile.shapes import cpu_session

from ...errors import ExportError
from ..graph import attribute
from ..reverse import RuleContext, RuleTable, registering
from .shape import along_axis

RULES: RuleTable = {}
rule = registering(RULES)

#: attributes that only choose the output size or the resized axes; the 1-axis probe gets its own
_SIZE_ATTRIBUTES = {"axes", "keep_aspect_ratio_policy"}


def _text(node, name: str, default: str) -> str:
    value = attribute(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


#: one entry of a Resize's sizes: an int; f"axis{a}", X's own extent along axis a (run-time sizes
#: copy it from Shape(X), as torch writes them); None when not known at export time
SizeEntry = int | str | None


def _shape_piece(ctx: RuleContext, name: str, x: str) -> list[SizeEntry] | None:
    """The entries of `name` when it is a constant or a piece of Shape(X) (Shape with start/end, a
    constant Slice or Gather of Shape(X)); None when it is anything else."""
    value = ctx.value(name)
    if value is not None:
        return value.reshape(-1).astype(np.int64).tolist()
    producer = ctx.index.producer.get(name)
    rank = ctx.index.rank(x)
    if producer is None:
        return None
    if producer.op_type == "Shape" and producer.input[0] == x:
        start, end = attribute(producer, "start", 0), attribute(producer, "end", rank)
        return [f"axis{a}" for a in range(rank)[start:end]]
    if producer.op_type in ("Slice", "Gather", "Cast") and producer.input[0]:
        whole = _shape_piece(ctx, producer.input[0], x)
        if whole is None or producer.op_type == "Cast":
            return whole
        if producer.op_type == "Gather":
            indices = ctx.value(producer.input[1])
            return None if indices is None else [whole[i] for i in indices.reshape(-1).tolist()]
        starts, ends, axes, steps = (ctx.value(i) if i else None for i in [*producer.input[1:], "", ""][:4])
        if starts is None or ends is None or (axes is not None and axes.tolist() not in ([0], [-1])):
            return None
        step = 1 if steps is None else int(steps.reshape(-1)[0])
        return whole[int(starts.reshape(-1)[0]):int(ends.reshape(-1)[0]):step]
    if producer.op_type == "Concat":
        pieces = [_shape_piece(ctx, piece, x) for piece in producer.input]
        return None if any(p is None for p in pieces) else [e for p in pieces for e in p]
    return None


def _scales_and_sizes(ctx: RuleContext, node, rank: int) -> tuple[list[float] | None, list[SizeEntry] | None]:
    """Per axis of X: the node's scales or its sizes (one of them), `axes` (opset 18) expanded. Sizes
    computed at run time are traced to constants and pieces of Shape(X) where possible."""
    scales = sizes = None
    if len(node.input) > 2 and node.input[2]:
        given = ctx.require_value(node.input[2], "the scales").astype(float).tolist()
        scales = given if given else None  # opset 11-12 pass an empty scales tensor with sizes
    if len(node.input) > 3 and node.input[3]:
        sizes = _shape_piece(ctx, node.input[3], node.input[0]) or [None] * rank
    axes = [a % rank for a in attribute(node, "axes", list(range(rank)))]
    if scales is not None:
        full = [1.0] * rank
        for a, s in zip(axes, scales):
            full[a] = s
        return full, None
    if sizes is None:
        raise ExportError(f"node {node.name!r} (Resize): neither scales nor sizes is given")
    full_sizes: list[SizeEntry] = [f"axis{a}" for a in range(rank)]
    for a, s in zip(axes, sizes):
        full_sizes[a] = s
    return None, full_sizes


def _probe(ctx: RuleContext, node, extent: int, scale: float | None, size: int | None) -> np.ndarray:
    """R [out, extent]: onnxruntime's Resize, with this node's attributes, of the identity basis laid
    out as [extent, 1, extent, 1] and resized along axis 2 only."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in _SIZE_ATTRIBUTES}
    inputs = ["X", "", "scales"] if scale is not None else ["X", "", "", "sizes"]
    inits = ([numpy_helper.from_array(np.array([1, 1, scale, 1], dtype=np.float32), "scales")] if scale is not None
             else [numpy_helper.from_array(np.array([extent, 1, size, 1], dtype=np.int64), "sizes")])
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["Y"], **attrs)], "resize_probe",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [extent, 1, extent, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ctx.opset)])
    basis = np.eye(extent, dtype=np.float32).reshape(extent, 1, extent, 1)
    try:
        (resized,) = cpu_session(model).run(None, {"X": basis})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"node {node.name!r} (Resize): onnxruntime cannot run its attributes on one axis ({exc})") from exc
    return resized[:, 0, :, 0].T


@rule("Resize")
def resize(ctx: RuleContext, node, grads):
    """dX = g x_a R_a^T over the resized axes a (module docstring). Opset 11+ (X, roi, scales, sizes); the
    scales must be constants, sizes computed at run time are traced (or read from the inferred output shape)."""
    x, y = node.input[0], node.output[0]
    if _text(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        raise ExportError(f"node {node.name!r} (Resize): coordinate_transformation_mode 'tf_crop_and_resize' "
                          "has no backward rule")
    mode = _text(node, "mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise ExportError(f"node {node.name!r} (Resize): mode {mode!r} has no backward rule")
    if _text(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ExportError(f"node {node.name!r} (Resize): keep_aspect_ratio_policy other than 'stretch' has no "
                          "backward rule; give the output sizes of every axis")
    x_shape = ctx.shape(x)
    rank = len(x_shape)
    scales, sizes = _scales_and_sizes(ctx, node, rank)
    g = grads[0]
    out_shape = ctx.shape(y) or [None] * rank
    for axis in range(rank):
        scale = scales[axis] if scales is not None else None
        size = sizes[axis] if sizes is not None else None
        extent = x_shape[axis]
        if scales is None and size is None:  # computed at run time in a way not traced: the inferred extent
            size = out_shape[axis] if isinstance(out_shape[axis], int) else None
        if (scale == 1.0) if scales is not None else (size == f"axis{axis}" or size == extent):
            continue
        if not isinstance(extent, int) or (scales is None and not isinstance(size, int)):
            raise ExportError(f"node {node.name!r} (Resize): resizes axis {axis}, whose input or output extent is not static; "
                              "export with a fixed input size (--input-size)")
        g = along_axis(ctx, g, axis, rank, _probe(ctx, node, extent, scale, size), like=x)
    return [g] + [None] * (len(node.input) - 1)

