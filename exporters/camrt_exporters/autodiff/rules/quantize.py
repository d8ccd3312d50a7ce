"""Straight-through backward rules of QuantizeLinear and DequantizeLinear (QDQ quantized graphs).

onnxruntime's QDQ format (`onnxruntime.quantization.quantize_static(quant_format=QuantFormat.QDQ)`)
carries each quantized activation as x -> QuantizeLinear -> q -> DequantizeLinear -> x_hat:
q = saturate(round(x / s_q) + z_q) and x_hat = (q - z_dq) * s_dq, the simulated quantization of
Jacob et al. 2018 ("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", sec. 3, eq. 12). Rounding has a zero derivative almost everywhere, so the gradient is the
straight-through estimator (Bengio et al. 2013, "Estimating or Propagating Gradients Through Stochastic
Neurons for Conditional Computation", sec. 4), as torch's fake-quantize autograd computes it:
d x_hat / d x = 1 where qmin <= round(x / s) + z <= qmax, 0 where the value clipped.

The pair is differentiated as two rules that compose to that: DequantizeLinear is linear in q
(d x_hat / dq = s_dq) and QuantizeLinear passes the gradient where x did not clip, times 1 / s_q.
The gradient of the integer tensor q is a float32 tensor: the backward runs in float32 while the
forward runs the integer graph as deployed. Weights (DequantizeLinear of constants) need no gradient.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...errors import ExportError
from ..graph import attribute, quantized_range
from ..reverse import RuleContext, RuleTable, registering

RULES: RuleTable = {}
rule = registering(RULES)


def _per_axis(ctx: RuleContext, node, value: np.ndarray, data: str, dtype) -> str:
    """A constant scale or zero point broadcast along the node's `axis` of tensor `data`."""
    if attribute(node, "block_size", 0):
        raise ExportError(f"node {node.name!r} ({node.op_type}): blocked quantization (block_size) has no backward "
                          "rule; quantize per tensor or per channel")
    value = np.asarray(value, dtype=dtype)
    if value.ndim == 0 or value.size == 1:
        return ctx.const(value.reshape(()), dtype=dtype)
    rank = ctx.index.rank(data)
    axis = attribute(node, "axis", 1) % rank
    return ctx.const(value.reshape([-1 if a == axis else 1 for a in range(rank)]), dtype=dtype)


def _gradient_dtype(ctx: RuleContext, node) -> np.dtype:
    """The float type of the node's float side (the gradient of its integer side has it too)."""
    float_side = node.input[0] if node.op_type == "QuantizeLinear" else node.output[0]
    return ctx.np_dtype(float_side)


@rule("DequantizeLinear")
def dequantize_linear(ctx: RuleContext, node, grads):
    """x_hat = (q - z) * s: dq = g * s (the scale and zero point are constants, no gradient)."""
    scale = ctx.require_value(node.input[1], "the scale")
    dtype = _gradient_dtype(ctx, node)
    return [ctx.mul(grads[0], _per_axis(ctx, node, scale, node.input[0], dtype))] + [None] * (len(node.input) - 1)


@rule("QuantizeLinear")
def quantize_linear(ctx: RuleContext, node, grads):
    """q = saturate(round(x / s) + z): dx = g / s where qmin <= round(x / s) + z <= qmax, else 0
    (the straight-through estimator; the bounds compare the unsaturated value, as torch does)."""
    x = node.input[0]
    dtype = _gradient_dtype(ctx, node)
    scale = _per_axis(ctx, node, ctx.require_value(node.input[1], "the scale"), x, dtype)
    zero_point = ctx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    qmin, qmax = quantized_range(ctx.index.dtypes[node.output[0]], node)
    shift = _per_axis(ctx, node, 0 if zero_point is None else zero_point, x, dtype)
    if len(node.input) > 2 and node.input[2] and zero_point is None:
        raise ExportError(f"node {node.name!r} (QuantizeLinear): the zero point {node.input[2]!r} is computed at run "
                          "time; the backward rule needs it constant (quantize with calibrated, static parameters)")
    unsaturated = ctx.emit("Add", [ctx.emit("Round", [ctx.emit("Div", [x, scale])]), shift])
    inside = ctx.emit("And", [ctx.emit("GreaterOrEqual", [unsaturated, ctx.const(qmin, dtype=dtype)]),
                              ctx.emit("LessOrEqual", [unsaturated, ctx.const(qmax, dtype=dtype)])])
    to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    passed = ctx.mul(ctx.emit("Div", [grads[0], scale]), ctx.emit("Cast", [inside], to=to))
    return [passed] + [None] * (len(node.input) - 1)
