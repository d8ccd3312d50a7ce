"""LRP rules as backward rules on ONNX ops: each rule propagates relevance R instead of a gradient.

Every rule is zennit 0.5.1's (zennit/rules.py, core.BasicHook) written on the layer's ONNX node. For a
linear layer z = f(x) = W x + b (Conv, Gemm, MatMul with constant weights), with f_V the layer with
weights V and f_V^T its transpose (the gradient of x -> f_V(x), bias-free), x+ = max(x, 0),
x- = min(x, 0), W+/- and b+/- the clamped parameters and stab(z) = z + eps * (sign(z) + [z == 0])
(zennit.core.stabilize: a zero is shifted up):

  epsilon      (Bach et al. 2015, eq. 58; Montavon et al. 2019, eq. 4.2)
               R_x = x * f_W^T(R / stab(z))
  alpha-beta   (Bach et al. 2015, eq. 60; z+ = alpha 1, beta 0: Montavon et al. 2019, eq. 4.4 with gamma -> inf)
               z_p = f_{W+,b+}(x+) + f_{W-}(x-),  z_n = f_{W-,b-}(x+) + f_{W+}(x-)
               R_x = alpha (x+ f_{W+}^T(R/stab z_p) + x- f_{W-}^T(R/stab z_p))
                   - beta  (x+ f_{W-}^T(R/stab z_n) + x- f_{W+}^T(R/stab z_n))
  gamma        (Montavon et al. 2019, eq. 4.3; generalised to negative inputs as zennit's Gamma)
               P = W + gamma W+, N = W + gamma W-; z_pos = f_{P,b+gamma b+}(x+) + f_N(x-),
               z_neg = f_{N,b+gamma b-}(x+) + f_P(x-); g_p = [z > 0] R / stab(z_pos), g_n = [z < 0] R / stab(z_neg)
               R_x = x+ (f_P^T g_p + f_N^T g_n) + x- (f_N^T g_p + f_P^T g_n)
  z^B (box)    (Montavon et al. 2017, "Explaining nonlinear classification decisions with deep Taylor
               decomposition", sec. 4.3; Montavon et al. 2019, table 3.1), pixel bounds l <= x <= h:
               z' = f_{W,b}(x) - f_{W+,b+}(l) - f_{W-,b-}(h)
               R_x = x f_W^T(s) - l f_{W+}^T(s) - h f_{W-}^T(s),  s = R / stab(z')
  flat         (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors", methods): all weights 1, no bias
               R_x = f_1^T(R / stab(f_1(1)))
  norm         (zennit's Norm, for sums and average pools, whose "weights" are the inputs' shares)
               R_i = x_i * (d y / d x_i)^T (R / stab(y)); for y = a + b: R_a = a R / stab(a + b)
  pass         R_x = R (activations, and BatchNormalization not folded into a Conv)

BatchNormalization right after a Conv (the Conv's only consumer) is folded into it, as zennit's
SequentialMergeBatchNorm canonizer does: W' = W s, b' = (b - mean) s + beta with s = gamma / sqrt(var + eps).
The relevance then passes through the BatchNormalization node unchanged and the Conv's rule uses W', b'
and the BatchNormalization's output as z.

Every tensor derived from the weights (W', W+, W + gamma W+, ...) is computed in the graph from the file's
own weight initializers (onnxruntime folds it once, when the session is made), never stored as a copy: a
tool that changes the weights (`camrt eval`'s randomization check) changes the relevance with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from camrt_exporters import VANILLA, ExportError, RuleContext, attribute

#: Ops zennit counts as activations (zennit.types.Activation; ReLU6 is Clip in ONNX): relevance passes.
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "Tanh", "HardSigmoid",
               "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Shrink")
#: The layers LRP's linear rules apply to ("Linear" in zennit: convolutions and fully connected layers).
LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """A linear layer z = f(x) read off its node: `w` the graph tensor of its weights in the node's layout
    (Conv [M, C/g, k...]; dense [in, out]) and `b` of its bias ([M] or [out]; None: no bias), both computed
    in the graph from the file's initializers; `weight_shape`; `z` the tensor holding f(x) (a folded
    BatchNormalization's output); `own_weights`: f is the node's own linear map (no BatchNormalization
    folded in), so its transpose is the built-in backward rule of the node, reading the file's weights."""

    node: onnx.NodeProto
    x: str
    w: str
    b: str | None
    weight_shape: tuple[int, ...]
    z: str
    own_weights: bool = True

    @property
    def is_conv(self) -> bool:
        return self.node.op_type == "Conv"


# --- reading a layer ------------------------------------------------------------------------------

def folded_batchnorm(ctx: RuleContext, conv: onnx.NodeProto) -> onnx.NodeProto | None:
    """The inference BatchNormalization that is the only consumer of `conv`'s output, if any."""
    consumers = ctx.index.consumers.get(conv.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type != "BatchNormalization":
        return None
    bn = consumers[0]
    if attribute(bn, "training_mode", 0) or any(ctx.value(name) is None for name in bn.input[1:5]):
        return None
    return bn


def read_layer(ctx: RuleContext, node: onnx.NodeProto) -> Layer:
    if node.op_type == "Conv":
        weight = ctx.require_value(node.input[1], "the Conv weights")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            ctx.require_value(bias, "the Conv bias")
        bn = folded_batchnorm(ctx, node)
        if bn is None:
            return Layer(node, node.input[0], node.input[1], bias, weight.shape, node.output[0])
        gamma, beta, mean, var = (ctx.value(name) for name in bn.input[1:5])
        scale = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
        w = ctx.mul(node.input[1], ctx.const(scale.reshape(-1, *[1] * (weight.ndim - 1)), like=node.input[0]))
        shift = ctx.const(beta - mean * scale, like=node.input[0])  # b' = b s + (beta - mean s)
        b = shift if bias is None else ctx.emit("Add", [ctx.mul(bias, ctx.const(scale, like=node.input[0])), shift])
        return Layer(node, node.input[0], w, b, weight.shape, bn.output[0], own_weights=False)
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            raise ExportError(f"node {node.name!r} (Gemm): transA=1 has no LRP rule; the activations must be A")
        b = ctx.require_value(node.input[1], "the Gemm weights")
        w = ctx.emit("Transpose", [node.input[1]], perm=[1, 0]) if attribute(node, "transB", 0) else node.input[1]
        shape = b.shape[::-1] if attribute(node, "transB", 0) else b.shape
        if attribute(node, "alpha", 1.0) != 1.0:
            w = ctx.mul(w, ctx.const(attribute(node, "alpha", 1.0), like=node.input[0]))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = ctx.require_value(node.input[2], "the Gemm bias")
            if c.size not in (1, shape[1]):
                raise ExportError(f"node {node.name!r} (Gemm): a bias C of shape {c.shape} (not one per output) "
                                  "has no LRP rule")
            bias = ctx.emit("Expand", [ctx.emit("Reshape", [node.input[2], ctx.ints([-1])]), ctx.ints([shape[1]])])
            if attribute(node, "beta", 1.0) != 1.0:
                bias = ctx.mul(bias, ctx.const(attribute(node, "beta", 1.0), like=node.input[0]))
        return Layer(node, node.input[0], w, bias, tuple(shape), node.output[0])
    x, w = node.input
    weight = ctx.value(w)
    if weight is None or weight.ndim != 2 or ctx.index.rank(x) != 2:
        raise ExportError(f"node {node.name!r} (MatMul): LRP rules need [batch, features] activations times a "
                          "constant 2-D weight; this MatMul is neither (use a rule set without LRP rules)")
    return Layer(node, x, w, None, weight.shape, node.output[0])


# --- building blocks ------------------------------------------------------------------------------

def apply(ctx: RuleContext, layer: Layer, x: str, weight: str, bias: str | None) -> str:
    """f_V(x) + b' for constant names `weight` (and `bias`): the layer's node with other operands."""
    if not layer.is_conv:
        return ctx.emit("Gemm", [x, weight] + ([bias] if bias else []))
    out = ctx.fresh("Conv")
    node = onnx.NodeProto()
    node.CopyFrom(layer.node)
    del node.input[:], node.output[:]
    node.input.extend([x, weight] + ([bias] if bias else []))
    node.output.append(out)
    node.name = ctx.fresh("Conv_node")
    ctx.nodes.append(node)
    return out


def transpose(ctx: RuleContext, layer: Layer, weight: str | None, g: str) -> str:
    """f_V^T(g): the gradient of x -> f_V(x) against g, for the constant named `weight`, or for the layer's own
    weights when None (the node's built-in rule; the Conv rule with other weights for a Conv)."""
    if weight is None:
        if not layer.own_weights:
            return transpose(ctx, layer, layer.w, g)
        return VANILLA.lookup(layer.node.op_type)(ctx, layer.node, [g])[0]
    if not layer.is_conv:
        return ctx.emit("Gemm", [g, weight], transB=1)
    node = onnx.NodeProto()
    node.CopyFrom(layer.node)
    # Through an Identity the weights are no constant to the Conv rule, which then uses a ConvTranspose of
    # the same initializer instead of adding a flipped copy of it (the file would hold every modified
    # weight twice).
    node.input[1] = ctx.emit("Identity", [weight])
    if attribute(node, "kernel_shape", None) is None:
        node.attribute.append(helper.make_attribute("kernel_shape", list(layer.weight_shape[2:])))
    return VANILLA.lookup("Conv")(ctx, node, [g])[0]


def stabilize(ctx: RuleContext, z: str, epsilon: float) -> str:
    """z + epsilon * (sign(z) + [z == 0]), zennit.core.stabilize: zeros are shifted up."""
    shift = ctx.emit("Where", [ctx.emit("GreaterOrEqual", [z, ctx.const(0.0, like=z)]),
                               ctx.const(epsilon, like=z), ctx.const(-epsilon, like=z)])
    return ctx.emit("Add", [z, shift])


def ratio(ctx: RuleContext, relevance: str, z: str, epsilon: float) -> str:
    return ctx.emit("Div", [relevance, stabilize(ctx, z, epsilon)])


def positive(ctx: RuleContext, x: str) -> str:
    return ctx.emit("Relu", [x])


def negative(ctx: RuleContext, x: str) -> str:
    return ctx.emit("Min", [x, ctx.const(0.0, like=x)])


def part(ctx: RuleContext, layer: Layer, tensor: str | None, sign: str) -> str | None:
    """The positive (sign "+") or negative ("-") part of the layer's weight or bias tensor, in the graph."""
    if tensor is None:
        return None
    if sign == "+":
        return positive(ctx, tensor)
    return ctx.emit("Min", [tensor, ctx.const(0.0, like=layer.x)])


def gamma_modified(ctx: RuleContext, layer: Layer, tensor: str | None, gamma: float, sign: str) -> str | None:
    """V + gamma V+ (sign "+") or V + gamma V- ("-") of the layer's weight or bias tensor, in the graph."""
    if tensor is None:
        return None
    return ctx.emit("Add", [tensor, ctx.mul(part(ctx, layer, tensor, sign), ctx.const(gamma, like=layer.x))])


def pixel_bounds(ctx: RuleContext, layer: Layer) -> tuple[str, str]:
    """The lowest and highest model inputs per channel, broadcast to the input's shape: 8-bit pixels 0 and
    255, scaled and normalised as the runtime does, (0 - mean) / std and (255 scale - mean) / std (with the
    usual scale 1/255: (1 - mean) / std, zennit's examples' bounds)."""
    pre = ctx.preprocessing
    if pre is None:
        raise ExportError(f"node {layer.node.name!r} (Conv): the z^B rule needs the file's preprocessing (the pixel "
                          "bounds); differentiate through the contract exporter, which passes it")
    mean, std = np.asarray(pre.mean, np.float64), np.asarray(pre.std, np.float64)
    shape = (1, -1) + (1,) * (len(layer.weight_shape) - 2)
    shape_of_x = ctx.shape_of(layer.x)
    return tuple(ctx.emit("Expand", [ctx.const(((edge - mean) / std).reshape(shape), like=layer.x), shape_of_x])
                 for edge in (0.0, 255.0 * pre.scale))


# --- the rules on a layer: (ctx, layer, R) -> R_x --------------------------------------------------

LayerRule = Callable[[RuleContext, Layer, str], str]


def epsilon_rule(epsilon: float) -> LayerRule:
    def epsilon_(ctx: RuleContext, layer: Layer, relevance: str) -> str:
        s = ratio(ctx, relevance, layer.z, epsilon)
        return ctx.mul(layer.x, transpose(ctx, layer, None, s))

    return epsilon_


def alpha_beta_rule(alpha: float, beta: float, stabilizer: float) -> LayerRule:
    def alpha_beta(ctx: RuleContext, layer: Layer, relevance: str) -> str:
        xp, xn = positive(ctx, layer.x), negative(ctx, layer.x)
        wp, wn = part(ctx, layer, layer.w, "+"), part(ctx, layer, layer.w, "-")
        bp, bn = part(ctx, layer, layer.b, "+"), part(ctx, layer, layer.b, "-")

        def share(w_of_xp: str, b: str | None, w_of_xn: str) -> str:
            z = ctx.add_n([apply(ctx, layer, xp, w_of_xp, b), apply(ctx, layer, xn, w_of_xn, None)])
            s = ratio(ctx, relevance, z, stabilizer)
            return ctx.add_n([ctx.mul(xp, transpose(ctx, layer, w_of_xp, s)), ctx.mul(xn, transpose(ctx, layer, w_of_xn, s))])

        relevance_x = share(wp, bp, wn)
        if alpha != 1.0:
            relevance_x = ctx.mul(relevance_x, ctx.const(alpha, like=layer.x))
        if beta == 0.0:
            return relevance_x
        return ctx.emit("Sub", [relevance_x, ctx.mul(share(wn, bn, wp), ctx.const(beta, like=layer.x))])

    return alpha_beta


def gamma_rule(gamma: float, stabilizer: float) -> LayerRule:
    def gamma_(ctx: RuleContext, layer: Layer, relevance: str) -> str:
        xp, xn = positive(ctx, layer.x), negative(ctx, layer.x)
        wp, wn = gamma_modified(ctx, layer, layer.w, gamma, "+"), gamma_modified(ctx, layer, layer.w, gamma, "-")
        bp, bn = gamma_modified(ctx, layer, layer.b, gamma, "+"), gamma_modified(ctx, layer, layer.b, gamma, "-")
        zero = ctx.const(0.0, like=layer.z)
        dtype = helper.np_dtype_to_tensor_dtype(ctx.np_dtype(layer.z))

        def share(sign: str, w_of_xp: str, b_of_xp: str | None, w_of_xn: str) -> tuple[str, str]:
            z = ctx.add_n([apply(ctx, layer, xp, w_of_xp, b_of_xp), apply(ctx, layer, xn, w_of_xn, None)])
            mask = ctx.emit("Cast", [ctx.emit(sign, [layer.z, zero])], to=dtype)
            s = ctx.mul(mask, ratio(ctx, relevance, z, stabilizer))
            return ctx.mul(xp, transpose(ctx, layer, w_of_xp, s)), ctx.mul(xn, transpose(ctx, layer, w_of_xn, s))

        return ctx.add_n([*share("Greater", wp, bp, wn), *share("Less", wn, bn, wp)])

    return gamma_


def box_rule(stabilizer: float) -> LayerRule:
    def box(ctx: RuleContext, layer: Layer, relevance: str) -> str:
        low, high = pixel_bounds(ctx, layer)
        wp, wn = part(ctx, layer, layer.w, "+"), part(ctx, layer, layer.w, "-")
        bp, bn = part(ctx, layer, layer.b, "+"), part(ctx, layer, layer.b, "-")
        z = ctx.emit("Sub", [ctx.emit("Sub", [layer.z, apply(ctx, layer, low, wp, bp)]), apply(ctx, layer, high, wn, bn)])
        s = ratio(ctx, relevance, z, stabilizer)
        return ctx.emit("Sub", [ctx.emit("Sub", [ctx.mul(layer.x, transpose(ctx, layer, None, s)),
                                                 ctx.mul(low, transpose(ctx, layer, wp, s))]),
                                ctx.mul(high, transpose(ctx, layer, wn, s))])

    return box


def flat_rule(stabilizer: float) -> LayerRule:
    def flat(ctx: RuleContext, layer: Layer, relevance: str) -> str:
        ones = ctx.emit("Expand", [ctx.const(1.0, like=layer.x), ctx.shape_of(layer.w)])
        ones_x = ctx.emit("Expand", [ctx.const(1.0, like=layer.x), ctx.shape_of(layer.x)])
        s = ratio(ctx, relevance, apply(ctx, layer, ones_x, ones, None), stabilizer)
        return transpose(ctx, layer, ones, s)

    return flat


# --- backward rules on nodes ----------------------------------------------------------------------

def first_layer(ctx: RuleContext, ops: tuple[str, ...]) -> str | None:
    """The first node (in topological order) of type `ops` that reads a tensor computed from the image input:
    zennit's "first layer" of a model whose modules are registered in the order they run."""
    if ctx.image_input is None:
        raise ExportError("the LRP rules need to know the image input (for the first layer's rule); differentiate "
                          "through the contract exporter, which passes it")
    reached = {ctx.image_input}
    for node in ctx.index.nodes:
        if any(name in reached for name in node.input):
            if node.op_type in ops:
                return node.name
            reached.update(node.output)
    return None


def linear_layer_rule(rule: LayerRule, first: LayerRule | None = None,
                      first_ops: tuple[str, ...] = LINEAR_OPS):
    """The backward rule of Conv/Gemm/MatMul: `first` for the first layer of a type in `first_ops`, else `rule`."""
    def lrp_linear(ctx: RuleContext, node, grads):
        layer = read_layer(ctx, node)
        chosen = first if first is not None and node.name == first_layer(ctx, first_ops) else rule
        return [chosen(ctx, layer, grads[0])] + [None] * (len(node.input) - 1)

    return lrp_linear


def pass_rule(ctx: RuleContext, node, grads):
    """zennit's Pass: the relevance of the output is the relevance of the (first) input."""
    return [grads[0]] + [None] * (len(node.input) - 1)


def norm_rule(stabilizer: float):
    """zennit's Norm: R_i = x_i * (dy/dx_i)^T (R / stab(y)), the built-in rule giving (dy/dx_i)^T. An Add
    with a constant operand (a bias) is not a sum of two activations: there the relevance passes, as
    zennit's gradient does through an addition outside a Sum module."""
    def norm(ctx: RuleContext, node, grads):
        vanilla = VANILLA.lookup(node.op_type)
        if node.op_type == "Add" and not all(ctx.needs(i) for i in range(len(node.input))):
            return vanilla(ctx, node, grads)
        s = ratio(ctx, grads[0], node.output[0], stabilizer)
        return [ctx.mul(x, g) if g is not None else None for x, g in zip(node.input, vanilla(ctx, node, [s]))]

    return norm


def refuse_rule(ctx: RuleContext, node, grads):
    raise ExportError(f"node {node.name!r} ({node.op_type}): no LRP rule for {node.op_type} (its gradient would "
                      "not be relevance); export this model with the vanilla rule set")
