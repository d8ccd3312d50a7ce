"""Backward rules of the normalisations whose statistics are taken per sample: InstanceNormalization
and GroupNormalization (BatchNormalization and LayerNormalization are in pooling.py)."""

from __future__ import annotations

from ...errors import ExportError
from ..graph import attribute
from ..reverse import RuleContext, RuleTable, registering

RULES: RuleTable = {}
rule = registering(RULES)


def _standardisation_back(ctx: RuleContext, x: str, gh: str, axes: list[int], eps: float, like: str) -> str:
    """For xhat = (x - mean) * rstd with mean, rstd = 1/sqrt(var + eps) over `axes`, and gh the
    gradient w.r.t. xhat: dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)). The statistics
    are recomputed with ReduceMean, so the element count is right for symbolic dims too. `like`:
    a forward tensor of x's type."""
    axes_const = ctx.ints(axes) if ctx.opset >= 18 else None

    def mean_over(t: str) -> str:  # ReduceMean takes its axes as an input from opset 18
        if axes_const is not None:
            return ctx.emit("ReduceMean", [t, axes_const], keepdims=1)
        return ctx.emit("ReduceMean", [t], axes=axes, keepdims=1)

    centred_x = ctx.emit("Sub", [x, mean_over(x)])
    variance = mean_over(ctx.mul(centred_x, centred_x))
    rstd = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [variance, ctx.const(eps, like=like)])])])
    xhat = ctx.mul(centred_x, rstd)
    centred = ctx.emit("Sub", [ctx.emit("Sub", [gh, mean_over(gh)]), ctx.mul(xhat, mean_over(ctx.mul(gh, xhat)))])
    return ctx.mul(centred, rstd)


def _refuse_parameter_gradients(ctx: RuleContext, node) -> None:
    if any(ctx.needs(i) for i in range(1, len(node.input))):
        raise ExportError(f"node {node.name!r} ({node.op_type}): gradients w.r.t. scale/bias are not supported")


@rule("InstanceNormalization")
def instance_normalization(ctx: RuleContext, node, grads):
    """y = scale_c * xhat + bias_c, statistics per sample and channel over the spatial axes:
    dx = the standardisation backward of gh = g * scale_c."""
    _refuse_parameter_gradients(ctx, node)
    x, scale = node.input[:2]
    rank = ctx.index.rank(x)
    per_channel = ctx.emit("Reshape", [scale, ctx.ints([-1] + [1] * (rank - 2))])
    gh = ctx.mul(grads[0], per_channel)
    eps = attribute(node, "epsilon", 1e-5)
    return [_standardisation_back(ctx, x, gh, list(range(2, rank)), eps, like=x), None, None]


@rule("GroupNormalization")
def group_normalization(ctx: RuleContext, node, grads):
    """Statistics per sample and group of channels: X seen as [N, groups, -1], then the
    standardisation backward of gh = g * scale_c (scale per channel, opset 21). Opsets 18-20 had
    a per-group scale; onnx's checker rejects that deprecated version, so it is refused here."""
    _refuse_parameter_gradients(ctx, node)
    if ctx.opset < 21:
        raise ExportError(f"node {node.name!r} (GroupNormalization): opset {ctx.opset} (per-group scale, "
                          "deprecated) is not supported; convert the model to opset 21 or later")
    x, scale = node.input[:2]
    rank = ctx.index.rank(x)
    grouped = ctx.ints([0, attribute(node, "num_groups"), -1])
    gh = ctx.mul(grads[0], ctx.emit("Reshape", [scale, ctx.ints([-1] + [1] * (rank - 2))]))
    eps = attribute(node, "epsilon", 1e-5)
    dx = _standardisation_back(ctx, ctx.emit("Reshape", [x, grouped]), ctx.emit("Reshape", [gh, grouped]), [2],
                               eps, like=x)
    return [ctx.emit("Reshape", [dx, ctx.shape_of(x)]), None, None]
