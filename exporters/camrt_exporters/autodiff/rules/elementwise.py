"""Backward rules of element-wise ops: arithmetic with broadcasting and activations."""

from __future__ import annotations

import math

import onnx

from ...errors import ExportError
from ..graph import attribute
from ..reverse import RuleContext, RuleTable, registering

RULES: RuleTable = {}
rule = registering(RULES)


def _mask(ctx: RuleContext, op: str, a: str, b: str, like: str) -> str:
    """Float 0/1 tensor of the comparison `a op b`; Mul by a mask is faster than Where in ORT."""
    to = onnx.helper.np_dtype_to_tensor_dtype(ctx.np_dtype(like))
    return ctx.emit("Cast", [ctx.emit(op, [a, b])], to=to)


@rule("Identity", "Dropout")
def identity(ctx: RuleContext, node, grads):
    return [grads[0]] + [None] * (len(node.input) - 1)


@rule("Neg")
def neg(ctx, node, grads):
    return [ctx.emit("Neg", [grads[0]])]


@rule("Cast", "CastLike")
def cast(ctx, node, grads):
    """Cast the gradient back to the input's type; CastLike's target-type input gets none."""
    to = onnx.helper.np_dtype_to_tensor_dtype(ctx.np_dtype(node.input[0]))
    return [ctx.emit("Cast", [grads[0]], to=to)] + [None] * (len(node.input) - 1)


@rule("Add", "Sum")
def add(ctx, node, grads):
    y = node.output[0]
    return [ctx.unbroadcast(grads[0], x, y) if ctx.needs(i) else None for i, x in enumerate(node.input)]


@rule("Sub")
def sub(ctx, node, grads):
    a, b = node.input
    y, g = node.output[0], grads[0]
    return [
        ctx.unbroadcast(g, a, y) if ctx.needs(0) else None,
        ctx.unbroadcast(ctx.emit("Neg", [g]), b, y) if ctx.needs(1) else None,
    ]


@rule("Mul")
def mul(ctx, node, grads):
    a, b = node.input
    y, g = node.output[0], grads[0]
    return [
        ctx.unbroadcast(ctx.mul(g, b), a, y) if ctx.needs(0) else None,
        ctx.unbroadcast(ctx.mul(g, a), b, y) if ctx.needs(1) else None,
    ]


@rule("Div")
def div(ctx, node, grads):
    a, b = node.input
    y, g = node.output[0], grads[0]
    grad_a = grad_b = None
    if ctx.needs(0):
        grad_a = ctx.unbroadcast(ctx.emit("Div", [g, b]), a, y)
    if ctx.needs(1):  # d(a/b)/db = -y/b
        grad_b = ctx.unbroadcast(ctx.emit("Neg", [ctx.emit("Div", [ctx.mul(g, y), b])]), b, y)
    return [grad_a, grad_b]


@rule("Where")
def where(ctx, node, grads):
    cond, a, b = node.input
    y, g = node.output[0], grads[0]
    zero = ctx.const(0.0, like=y)
    return [
        None,
        ctx.unbroadcast(ctx.emit("Where", [cond, g, zero]), a, y) if ctx.needs(1) else None,
        ctx.unbroadcast(ctx.emit("Where", [cond, zero, g]), b, y) if ctx.needs(2) else None,
    ]


@rule("Relu")
def relu(ctx, node, grads):
    y = node.output[0]
    return [ctx.mul(grads[0], _mask(ctx, "Greater", y, ctx.const(0.0, like=y), y))]


@rule("LeakyRelu")
def leaky_relu(ctx, node, grads):
    x = node.input[0]
    alpha = attribute(node, "alpha", 0.01)
    slope = ctx.emit(
        "Where",
        [ctx.emit("Greater", [x, ctx.const(0.0, like=x)]), ctx.const(1.0, like=x), ctx.const(alpha, like=x)],
    )
    return [ctx.mul(grads[0], slope)]


@rule("Clip")
def clip(ctx, node, grads):
    """Gradient passes where min < x < max (strict, as torch's hardtanh_backward)."""
    x = node.input[0]
    low = node.input[1] if len(node.input) > 1 and node.input[1] else None
    high = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if ctx.opset < 11:
        low = ctx.const(attribute(node, "min"), like=x) if attribute(node, "min") is not None else None
        high = ctx.const(attribute(node, "max"), like=x) if attribute(node, "max") is not None else None
    masks = []
    if low is not None:
        masks.append(_mask(ctx, "Greater", x, low, x))
    if high is not None:
        masks.append(_mask(ctx, "Less", x, high, x))
    g = grads[0]
    for m in masks:
        g = ctx.mul(g, m)
    return [g] + [None] * (len(node.input) - 1)


@rule("Sigmoid")
def sigmoid(ctx, node, grads):
    y = node.output[0]
    one_minus_y = ctx.emit("Sub", [ctx.const(1.0, like=y), y])
    return [ctx.mul(grads[0], ctx.mul(y, one_minus_y))]


@rule("Tanh")
def tanh(ctx, node, grads):
    y = node.output[0]
    return [ctx.mul(grads[0], ctx.emit("Sub", [ctx.const(1.0, like=y), ctx.mul(y, y)]))]


@rule("HardSigmoid")
def hard_sigmoid(ctx, node, grads):
    """y = clip(alpha*x + beta, 0, 1): gradient alpha where 0 < alpha*x + beta < 1."""
    x = node.input[0]
    alpha = attribute(node, "alpha", 0.2)
    beta = attribute(node, "beta", 0.5)
    lin = ctx.emit("Add", [ctx.mul(x, ctx.const(alpha, like=x)), ctx.const(beta, like=x)])
    inside = ctx.mul(_mask(ctx, "Greater", lin, ctx.const(0.0, like=x), x),
                     _mask(ctx, "Less", lin, ctx.const(1.0, like=x), x))
    return [ctx.mul(grads[0], ctx.mul(inside, ctx.const(alpha, like=x)))]


@rule("HardSwish")
def hard_swish(ctx, node, grads):
    """y = x*clip(x/6 + 1/2, 0, 1): slope 0 below -3, x/3 + 1/2 on [-3, 3], 1 above 3."""
    x = node.input[0]
    ramp = ctx.emit("Add", [ctx.mul(x, ctx.const(1.0 / 3.0, like=x)), ctx.const(0.5, like=x)])
    above = ctx.emit("Where", [ctx.emit("Greater", [x, ctx.const(3.0, like=x)]), ctx.const(1.0, like=x), ramp])
    slope = ctx.emit("Where", [ctx.emit("Less", [x, ctx.const(-3.0, like=x)]), ctx.const(0.0, like=x), above])
    return [ctx.mul(grads[0], slope)]


@rule("Exp")
def exp(ctx, node, grads):
    return [ctx.mul(grads[0], node.output[0])]


@rule("Log")
def log(ctx, node, grads):
    return [ctx.emit("Div", [grads[0], node.input[0]])]


@rule("Sqrt")
def sqrt(ctx, node, grads):
    y = node.output[0]
    return [ctx.emit("Div", [grads[0], ctx.mul(y, ctx.const(2.0, like=y))])]


@rule("Reciprocal")
def reciprocal(ctx, node, grads):
    y = node.output[0]
    return [ctx.emit("Neg", [ctx.mul(grads[0], ctx.mul(y, y))])]


@rule("Pow")
def power(ctx, node, grads):
    x, p = node.input
    if ctx.needs(1):
        raise ExportError(f"node {node.name!r} (Pow): gradients w.r.t. the exponent are not supported")
    exponent = ctx.require_value(p, "the exponent")
    lower = ctx.emit("Pow", [x, ctx.const(exponent - 1, like=x)])
    grad = ctx.mul(grads[0], ctx.mul(lower, ctx.const(exponent, like=x)))
    return [ctx.unbroadcast(grad, x, node.output[0]), None]


@rule("Abs")
def absolute(ctx, node, grads):
    return [ctx.mul(grads[0], ctx.emit("Sign", [node.input[0]]))]


@rule("Softplus")
def softplus(ctx, node, grads):
    return [ctx.mul(grads[0], ctx.emit("Sigmoid", [node.input[0]]))]


@rule("Erf")
def erf(ctx, node, grads):
    x = node.input[0]
    bell = ctx.emit("Exp", [ctx.emit("Neg", [ctx.mul(x, x)])])
    return [ctx.mul(grads[0], ctx.mul(bell, ctx.const(2.0 / math.sqrt(math.pi), like=x)))]


@rule("Gelu")
def gelu(ctx, node, grads):
    """Exact GELU x*Phi(x): derivative Phi(x) + x*phi(x)."""
    x = node.input[0]
    if attribute(node, "approximate", b"none") not in (b"none", "none"):
        return _gelu_tanh(ctx, x, grads[0])
    cdf = ctx.mul(
        ctx.emit("Add", [ctx.emit("Erf", [ctx.mul(x, ctx.const(1 / math.sqrt(2.0), like=x))]), ctx.const(1.0, like=x)]),
        ctx.const(0.5, like=x),
    )
    pdf = ctx.mul(
        ctx.emit("Exp", [ctx.mul(ctx.mul(x, x), ctx.const(-0.5, like=x))]),
        ctx.const(1 / math.sqrt(2 * math.pi), like=x),
    )
    return [ctx.mul(grads[0], ctx.emit("Add", [cdf, ctx.mul(x, pdf)]))]


def _gelu_tanh(ctx: RuleContext, x: str, g: str) -> list[str]:
    """tanh GELU 0.5x(1+tanh(u)), u = c(x + 0.044715x^3): derivative 0.5(1+t) + 0.5x(1-t^2)u'."""
    c = math.sqrt(2.0 / math.pi)
    x2 = ctx.mul(x, x)
    u = ctx.mul(ctx.mul(x, ctx.emit("Add", [ctx.mul(x2, ctx.const(0.044715, like=x)), ctx.const(1.0, like=x)])),
                ctx.const(c, like=x))
    t = ctx.emit("Tanh", [u])
    du = ctx.mul(ctx.emit("Add", [ctx.mul(x2, ctx.const(3 * 0.044715, like=x)), ctx.const(1.0, like=x)]),
                 ctx.const(c, like=x))
    one = ctx.const(1.0, like=x)
    left = ctx.emit("Add", [one, t])
    right = ctx.mul(ctx.mul(x, ctx.emit("Sub", [one, ctx.mul(t, t)])), du)
    slope = ctx.mul(ctx.emit("Add", [left, right]), ctx.const(0.5, like=x))
    return [ctx.mul(g, slope)]


@rule("Max", "Min")
def max_min(ctx, node, grads):
    """dy/dx_i = 1 where x_i is the selected operand. Ties: the tied operands split the gradient
    equally (torch's maximum/minimum give each of two g/2), so Max(x, x) has derivative 1."""
    y, g = node.output[0], grads[0]
    hits = [_mask(ctx, "Equal", x, y, y) for x in node.input]
    share = ctx.emit("Div", [g, ctx.add_n(hits)])
    return [ctx.unbroadcast(ctx.mul(share, hit), x, y) if ctx.needs(i) else None
            for i, (x, hit) in enumerate(zip(node.input, hits))]


@rule("PRelu")
def prelu(ctx, node, grads):
    """y = x if x > 0 else slope*x: dy/dx = 1 for x > 0, slope otherwise (slope at 0, as torch)."""
    if ctx.needs(1):
        raise ExportError(f"node {node.name!r} (PRelu): gradients w.r.t. the slope are not supported")
    x, slope = node.input
    y = node.output[0]
    positive = ctx.emit("Greater", [x, ctx.const(0.0, like=x)])
    factor = ctx.emit("Where", [positive, ctx.const(1.0, like=x), slope])
    return [ctx.unbroadcast(ctx.mul(grads[0], factor), x, y), None]


def _exp_linear(ctx: RuleContext, x: str, g: str, alpha: float, scale: float, width: float) -> str:
    """Shared by Elu/Selu/Celu: y = scale*x for x > 0, scale*alpha*(exp(x/width) - 1) otherwise,
    so dy/dx = scale for x > 0, scale*alpha/width*exp(x/width) for x <= 0 (left slope at 0)."""
    left = ctx.mul(ctx.emit("Exp", [ctx.mul(x, ctx.const(1.0 / width, like=x))]),
                   ctx.const(scale * alpha / width, like=x))
    slope = ctx.emit("Where", [ctx.emit("Greater", [x, ctx.const(0.0, like=x)]), ctx.const(scale, like=x), left])
    return ctx.mul(g, slope)


@rule("Elu")
def elu(ctx, node, grads):
    """dy/dx = 1 for x > 0, alpha*exp(x) otherwise."""
    return [_exp_linear(ctx, node.input[0], grads[0], attribute(node, "alpha", 1.0), 1.0, 1.0)]


@rule("Selu")
def selu(ctx, node, grads):
    """dy/dx = gamma for x > 0, gamma*alpha*exp(x) otherwise."""
    alpha = attribute(node, "alpha", 1.67326319217681884765625)
    gamma = attribute(node, "gamma", 1.05070102214813232421875)
    return [_exp_linear(ctx, node.input[0], grads[0], alpha, gamma, 1.0)]


@rule("Celu")
def celu(ctx, node, grads):
    """y = max(0, x) + min(0, alpha*(exp(x/alpha) - 1)): dy/dx = 1 for x > 0, exp(x/alpha) otherwise."""
    alpha = attribute(node, "alpha", 1.0)
    return [_exp_linear(ctx, node.input[0], grads[0], alpha, 1.0, alpha)]


@rule("ThresholdedRelu")
def thresholded_relu(ctx, node, grads):
    """y = x for x > alpha, else 0: dy/dx = 1[x > alpha] (0 at the jump)."""
    x = node.input[0]
    return [ctx.mul(grads[0], _mask(ctx, "Greater", x, ctx.const(attribute(node, "alpha", 1.0), like=x), x))]


@rule("Mish")
def mish(ctx, node, grads):
    """y = x*tanh(sp), sp = softplus(x): dy/dx = t + x*(1 - t^2)*sigmoid(x), t = tanh(sp)."""
    x = node.input[0]
    t = ctx.emit("Tanh", [ctx.emit("Softplus", [x])])
    one_minus_t2 = ctx.emit("Sub", [ctx.const(1.0, like=x), ctx.mul(t, t)])
    slope = ctx.emit("Add", [t, ctx.mul(ctx.mul(x, one_minus_t2), ctx.emit("Sigmoid", [x]))])
    return [ctx.mul(grads[0], slope)]


@rule("Softsign")
def softsign(ctx, node, grads):
    """y = x/(1 + |x|): dy/dx = 1/(1 + |x|)^2."""
    x = node.input[0]
    denominator = ctx.emit("Add", [ctx.const(1.0, like=x), ctx.emit("Abs", [x])])
    return [ctx.emit("Div", [grads[0], ctx.mul(denominator, denominator)])]


@rule("Sin")
def sin(ctx, node, grads):
    """d sin(x)/dx = cos(x)."""
    return [ctx.mul(grads[0], ctx.emit("Cos", [node.input[0]]))]


@rule("Cos")
def cos(ctx, node, grads):
    """d cos(x)/dx = -sin(x)."""
    return [ctx.emit("Neg", [ctx.mul(grads[0], ctx.emit("Sin", [node.input[0]]))])]


@rule("Sign", "Floor", "Ceil", "Round")
def piecewise_constant(ctx, node, grads):
    """Piecewise-constant: dy/dx = 0 (also at the jumps, as torch)."""
    return [ctx.zeros_like(node.input[0])]
