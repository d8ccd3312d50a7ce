"""Backward rules of pooling, reductions and normalisation."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ...errors import ExportError
from ..graph import attribute
from ..reverse import RuleContext, RuleTable, registering
from .elementwise import _mask
from .linear import explicit_pads

RULES: RuleTable = {}
rule = registering(RULES)


def _broadcast_back(ctx: RuleContext, g: str, x: str, scale: float) -> str:
    scaled = ctx.mul(g, ctx.const(scale, like=x)) if scale != 1.0 else g
    return ctx.emit("Expand", [scaled, ctx.shape_of(x)])


def _inverse_count(ctx: RuleContext, x: str, y: str) -> str:
    """1 / (elements of x per element of the reduction y), at run time: Size(y) / Size(x), for
    reductions over dynamic axes."""
    to = helper.np_dtype_to_tensor_dtype(ctx.np_dtype(x))
    return ctx.emit("Div", [ctx.emit("Cast", [ctx.emit("Size", [y])], to=to),
                            ctx.emit("Cast", [ctx.emit("Size", [x])], to=to)])


def _mean_back(ctx: RuleContext, g: str, x: str, y: str, axes: list[int]) -> str:
    """Broadcast the gradient of a mean of x over `axes` back to x: g / count."""
    shape = ctx.shape(x)
    if all(isinstance(shape[a], int) for a in axes):
        return _broadcast_back(ctx, g, x, 1.0 / float(np.prod([shape[a] for a in axes])))
    return ctx.emit("Expand", [ctx.mul(g, _inverse_count(ctx, x, y)), ctx.shape_of(x)])


@rule("GlobalAveragePool")
def global_average_pool(ctx, node, grads):
    """dx = g / (number of spatial cells), counted at run time where a spatial dim is dynamic."""
    x = node.input[0]
    return [_mean_back(ctx, grads[0], x, node.output[0], list(range(2, ctx.index.rank(x))))]


@rule("GlobalMaxPool")
def global_max_pool(ctx, node, grads):
    """dx = g * 1[x == max] / (number of maxima): tied maxima share the gradient (as torch's amax)."""
    x, y = node.input[0], node.output[0]
    hit = _mask(ctx, "Equal", x, y, x)
    count = ctx.emit("ReduceSum", [hit, ctx.ints(list(range(2, ctx.index.rank(x))))], keepdims=1)
    return [ctx.mul(ctx.emit("Div", [grads[0], count]), hit)]


def _reduce_axes(ctx: RuleContext, node) -> list[int] | None:
    """Axes of a Reduce* node (attribute before opset 18 for ReduceMean, input from 13 for ReduceSum)."""
    axes = attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.require_value(node.input[1], "the reduction axes").tolist()
    return None if axes is None else list(axes)


def _reduction_axes(ctx: RuleContext, node) -> list[int] | None:
    """The sorted non-negative axes a Reduce* node reduces, or None for noop_with_empty_axes."""
    rank = ctx.index.rank(node.input[0])
    axes = _reduce_axes(ctx, node)
    if not axes:
        return None if attribute(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


def _keep(ctx: RuleContext, node, t: str, axes: list[int]) -> str:
    """`t` (shaped like the reduction's output) with the reduced axes kept as size 1."""
    return t if attribute(node, "keepdims", 1) else ctx.emit("Unsqueeze", [t, ctx.ints(axes)])


def _reduction_rule(back):
    """A Reduce* rule from back(ctx, node, g, axes) -> dx, where g has the reduced axes kept."""
    def reduce(ctx: RuleContext, node, grads):
        axes = _reduction_axes(ctx, node)
        rest = [None] * (len(node.input) - 1)
        if axes is None:
            return [grads[0]] + rest
        return [back(ctx, node, _keep(ctx, node, grads[0], axes), axes)] + rest

    return reduce


def _sum_back(ctx, node, g, axes):
    """y = sum x: dx = g broadcast back."""
    return _broadcast_back(ctx, g, node.input[0], 1.0)


def _mean_reduction_back(ctx, node, g, axes):
    """y = mean x: dx = g / count (a run-time count over dynamic axes)."""
    return _mean_back(ctx, g, node.input[0], node.output[0], axes)


def _extremum_back(ctx, node, g, axes):
    """y = max (min) x: dx = g * 1[x == y] / (number of ties): tied extrema share the gradient,
    as torch's amax/amin."""
    x = node.input[0]
    hit = _mask(ctx, "Equal", x, _keep(ctx, node, node.output[0], axes), x)
    count = ctx.emit("ReduceSum", [hit, ctx.ints(axes)], keepdims=1)
    return ctx.mul(ctx.emit("Div", [g, count]), hit)


def _l2_back(ctx, node, g, axes):
    """y = sqrt(sum x^2): dx = g * x / y (undefined at y = 0, where this gives NaN as torch's norm)."""
    x = node.input[0]
    return ctx.mul(x, ctx.emit("Div", [g, _keep(ctx, node, node.output[0], axes)]))


def _sum_square_back(ctx, node, g, axes):
    """y = sum x^2: dx = 2 * x * g."""
    x = node.input[0]
    return ctx.mul(ctx.mul(x, ctx.const(2.0, like=x)), g)


RULES["ReduceMean"] = _reduction_rule(_mean_reduction_back)
RULES["ReduceSum"] = _reduction_rule(_sum_back)
RULES["ReduceMax"] = RULES["ReduceMin"] = _reduction_rule(_extremum_back)
RULES["ReduceL2"] = _reduction_rule(_l2_back)
RULES["ReduceSumSquare"] = _reduction_rule(_sum_square_back)


def _pool_output_size(size, k, s, d, begin, end, ceil_mode) -> int:
    """Output length of a pool along one axis. With ceil_mode a last window that would start in
    the right padding is dropped (ONNX spec, onnxruntime, torch); ONNX shape inference keeps it,
    so the inferred output shape cannot be trusted here."""
    span = size + begin + end - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + begin:
        out -= 1
    return out


def _pool_geometry(ctx: RuleContext, node):
    x = node.input[0]
    spatial = list(ctx.static_shape(x)[2:])
    n = len(spatial)
    kernel = list(attribute(node, "kernel_shape"))
    strides = list(attribute(node, "strides", [1] * n))
    dilations = list(attribute(node, "dilations", [1] * n))
    pads = explicit_pads(ctx, node, spatial, kernel, strides, dilations)
    explicit = attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"", "")
    ceil_mode = attribute(node, "ceil_mode", 0) if explicit else 0
    out_spatial = [_pool_output_size(spatial[i], kernel[i], strides[i], dilations[i], pads[i], pads[n + i],
                                     ceil_mode) for i in range(n)]
    return spatial, kernel, strides, dilations, pads, out_spatial


def _window_counts(size, out, k, s, pb, pe, include_pad) -> np.ndarray:
    """Divisor of each average-pool window along one axis (torch/onnxruntime semantics)."""
    counts = []
    for o in range(out):
        start = o * s - pb
        end = min(start + k, size + pe)
        full = end - start
        start, end = max(start, 0), min(end, size)
        counts.append(full if include_pad else end - start)
    return np.asarray(counts, dtype=np.float64)


@rule("AveragePool")
def average_pool(ctx: RuleContext, node, grads):
    """Spread each window's gradient over its cells: a depthwise ConvTranspose of ones."""
    x = node.input[0]
    channels = ctx.static_shape(x)[1]
    spatial, kernel, strides, dilations, pads, out_spatial = _pool_geometry(ctx, node)
    if any(d != 1 for d in dilations):
        raise ExportError(f"node {node.name!r} (AveragePool): dilated average pooling is not supported")
    n = len(spatial)
    include_pad = attribute(node, "count_include_pad", 0)
    divisor = np.ones(out_spatial)
    for axis in range(n):
        counts = _window_counts(spatial[axis], out_spatial[axis], kernel[axis], strides[axis],
                                pads[axis], pads[n + axis], include_pad)
        divisor = divisor * counts.reshape([-1 if a == axis else 1 for a in range(n)])
    g = ctx.mul(grads[0], ctx.const(1.0 / divisor, like=x))
    ends, output_padding = [], []
    for axis in range(n):
        full = (out_spatial[axis] - 1) * strides[axis] + kernel[axis] - pads[axis] - pads[n + axis]
        ends.append(pads[n + axis] + max(0, full - spatial[axis]))
        output_padding.append(max(0, spatial[axis] - full))
    ones = ctx.const(np.ones([channels, 1, *kernel]), like=x)
    return [ctx.emit("ConvTranspose", [g, ones], strides=strides, pads=pads[:n] + ends, group=channels,
                     kernel_shape=kernel, output_padding=output_padding)]


@rule("MaxPool")
def max_pool(ctx: RuleContext, node, grads):
    """Scatter-add each window's gradient to its argmax, taken from MaxPool's Indices output."""
    x = node.input[0]
    if attribute(node, "storage_order", 0) != 0:
        raise ExportError(f"node {node.name!r} (MaxPool): storage_order=1 is not supported")
    indices = ctx.forward_output(1, "indices")
    flat = ctx.ints([-1])
    size = ctx.emit("Reshape", [ctx.emit("Size", [x]), flat])
    zero = numpy_helper.from_array(np.zeros(1, dtype=ctx.np_dtype(x)))
    zeros = ctx.emit("ConstantOfShape", [size], value=zero)
    scattered = ctx.scatter_add("ScatterElements", zeros, ctx.emit("Reshape", [indices, flat]),
                                ctx.emit("Reshape", [grads[0], flat]), like=x, axis=0)
    return [ctx.emit("Reshape", [scattered, ctx.shape_of(x)])]


def _channel_shape(ctx: RuleContext, x: str) -> list[int]:
    rank = ctx.index.rank(x)
    return [-1] + [1] * (rank - 2)


@rule("BatchNormalization")
def batch_normalization(ctx: RuleContext, node, grads):
    """Inference mode: y = scale * (x - mean) / sqrt(var + eps) + bias, so dx = g * scale / sqrt(var + eps)."""
    if attribute(node, "training_mode", 0):
        raise ExportError(f"node {node.name!r} (BatchNormalization): training mode is not supported")
    if any(ctx.needs(i) for i in range(1, 5)):
        raise ExportError(f"node {node.name!r} (BatchNormalization): gradients w.r.t. its parameters are not supported")
    x, scale, _, _, var = node.input[:5]
    eps = attribute(node, "epsilon", 1e-5)
    factor = ctx.require_value(scale, "the scale") / np.sqrt(ctx.require_value(var, "the variance") + eps)
    return [ctx.mul(grads[0], ctx.const(factor.reshape(_channel_shape(ctx, x)), like=x))] + [None] * 4


@rule("LayerNormalization")
def layer_normalization(ctx: RuleContext, node, grads):
    """dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)) with gh = g * scale over the normalised axes."""
    if any(ctx.needs(i) for i in range(1, len(node.input))):
        raise ExportError(f"node {node.name!r} (LayerNormalization): gradients w.r.t. scale/bias are not supported")
    x, scale = node.input[:2]
    shape = ctx.shape(x)
    rank = len(shape)
    axis = attribute(node, "axis", -1) % rank
    axes = list(range(axis, rank))
    mean = ctx.forward_output(1, "mean")
    rstd = ctx.forward_output(2, "inv_std_dev")
    to = helper.np_dtype_to_tensor_dtype(ctx.np_dtype(x))
    if attribute(node, "stash_type", TensorProto.FLOAT) != to:  # Mean and InvStdDev have the stash type
        mean, rstd = (ctx.emit("Cast", [t], to=to) for t in (mean, rstd))
    if all(isinstance(d, int) for d in shape[axis:]):
        inv_count = ctx.const(1.0 / float(np.prod(shape[axis:])), like=x)
    else:  # normalised axes with symbolic dims (a dynamic sequence length)
        inv_count = _inverse_count(ctx, x, mean)
    xhat = ctx.mul(ctx.emit("Sub", [x, mean]), rstd)
    gh = ctx.mul(grads[0], scale)
    axes_const = ctx.ints(axes)

    def mean_over(t: str) -> str:
        return ctx.mul(ctx.emit("ReduceSum", [t, axes_const], keepdims=1), inv_count)

    centred = ctx.emit("Sub", [ctx.emit("Sub", [gh, mean_over(gh)]), ctx.mul(xhat, mean_over(ctx.mul(gh, xhat)))])
    return [ctx.mul(centred, rstd)] + [None] * (len(node.input) - 1)


@rule("Softmax")
def softmax(ctx: RuleContext, node, grads):
    y, g = node.output[0], grads[0]
    axis = attribute(node, "axis", -1 if ctx.opset >= 13 else 1)
    if ctx.opset < 13 and axis % ctx.index.rank(y) != ctx.index.rank(y) - 1:
        raise ExportError(f"node {node.name!r} (Softmax): opset<13 coerced 2-D softmax is not supported")
    dot = ctx.emit("ReduceSum", [ctx.mul(g, y), ctx.ints([axis])], keepdims=1)
    return [ctx.mul(y, ctx.emit("Sub", [g, dot]))]


@rule("LogSoftmax")
def log_softmax(ctx: RuleContext, node, grads):
    y, g = node.output[0], grads[0]
    axis = attribute(node, "axis", -1 if ctx.opset >= 13 else 1)
    total = ctx.emit("ReduceSum", [g, ctx.ints([axis])], keepdims=1)
    return [ctx.emit("Sub", [g, ctx.mul(ctx.emit("Exp", [y]), total)])]
