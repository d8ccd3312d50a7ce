"""The LRP rules of Chefer, Gur & Wolf's transformer attribution, written on ONNX nodes (rule set `lrp-chefer`).

Chefer, Gur, Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021 (arXiv 2012.09838),
sec. 3.1: relevance propagation with the alpha-beta rule (eq. 3, alpha 1, beta 0) on layers whose inputs are
positive or negative, the z-rule on non-parametric layers that add or multiply two tensors (eq. 4), and the
normalisation that keeps a sum's two relevances conserving (eq. 5); the equation numbers as recalled from arXiv
v2 (the paper could not be read offline). The rules are given as the authors' code applies them (hila-chefer/Transformer-Explainability: baselines/ViT/ViT_LRP.py, modules/
layers_ours.py), which is what "the authors' relevance" means below; the oracle restates that code in torch
(tests/chefer_oracle.py). With x+ = max(x, 0), x- = min(x, 0) and their safe division

    a // b = a / (b + 1e-9), 0 where b = 0        (layers_ours.safe_divide)

a node y = f(x_1, ..., x_n) with relevance R at y gives:

  alpha 1, beta 0   Linear (MatMul by a constant weight, Gemm; the bias left out of z, so its Add passes R):
                    z = x+ W+ + x- W-,  s = R // z,  R_x = x+ (s W+^T) + x- (s W-^T)
  z^B (first Conv)  Conv of 3 channels (the patch embedding), with the per-sample bounds l = min x, h = max x
                    over channels and pixels:  z = f_W(x) - f_{W+}(l) - f_{W-}(h) + 1e-9,  s = R / z,
                    R_x = x f_W^T(s) - l f_{W+}^T(s) - h f_{W-}^T(s)
  z-rule, halved    MatMul of two activations (Q K^T, A V; their einsum): R_i = 1/2 x_i J_i^T(R // y),
                    the halving of ViT_LRP.Attention.relprop; R^A, the relevance of the attention map A that
                    the transformer-attribution method reads, is this rule's share for A in A V
  sum (eq. 5)       Add of two activations (the residual connections) or of an activation and a constant that
                    is not a Linear's bias (the position embedding): the z-rule shares r_i = x_i (R // y), then
                    each rescaled so that the two totals split sum R as |sum r_a| : |sum r_b|:
                    R_a = r_a * ((|sum r_a| // (|sum r_a| + |sum r_b|)) sum R) // sum r_a
  pass              LayerNormalization, Softmax, Gelu, Relu (their RelProp default), and a Mul by a constant
                    (the attention scale, a Python float in their code): R_x = R
  index ops         Reshape, Transpose, Slice, Squeeze, Concat, ...: the relevance moves with the elements
                    (their rearrange and slicing)

  clone             a tensor read by several nodes (the residual stream, read by a LayerNorm and an Add; slices
                    and Shape do not count): each copy's relevance R_i becomes x * (R_i // x) (layers_ours.Clone),
                    summed over the copies; Gather (their IndexSelect of the class token): x * grad(R // y)

One departure, stated in docs/transformer-methods.md: the authors sum over the whole batch where eq. 5 sums
(`a.sum()`, `R.sum()`, and the position embedding's gradient); here the sums are per sample, so a batch gives
what each image gives alone (their code explains one image at a time). Every op not named here is refused,
naming the node.
"""

from __future__ import annotations

import onnx

from camrt_exporters import VANILLA, ExportError, RuleContext

from .rules import apply, folded_batchnorm, negative, positive, read_layer, transpose
from .transformer_rules import INDEX_OPS, Rule

#: layers_ours.safe_divide's shift of the denominator, and the z^B Conv's.
SAFE_DIVIDE_EPSILON = 1e-9
#: Ops that cut a tensor into parts: several of them reading one tensor are no Clone.
SPLITTING_OPS = ("Slice", "Split", "Gather")
#: Ops whose relevance passes unchanged (layers_ours.RelProp.relprop: GELU, ReLU, Softmax, LayerNorm, Dropout).
PASSING_OPS = ("LayerNormalization", "Softmax", "Gelu", "Relu")


def safe_divide(ctx: RuleContext, a: str, b: str) -> str:
    """a // b = a / (b + 1e-9), 0 where b = 0 (a denominator that the shift makes 0 is 1e-9)."""
    epsilon, zero = ctx.const(SAFE_DIVIDE_EPSILON, like=b), ctx.const(0.0, like=b)
    shifted = ctx.emit("Add", [b, epsilon])
    denominator = ctx.emit("Where", [ctx.emit("Equal", [shifted, zero]), epsilon, shifted])
    return ctx.emit("Where", [ctx.emit("Equal", [b, zero]), zero, ctx.emit("Div", [a, denominator])])


def reduce(ctx: RuleContext, op_type: str, x: str, axes: list[int]) -> str:
    """ReduceSum/ReduceMin/ReduceMax over `axes`, kept as size-1 axes (axes an input from opset 18; 13 for Sum)."""
    axes_as_input = ctx.opset >= (13 if op_type == "ReduceSum" else 18)
    if axes_as_input:
        return ctx.emit(op_type, [x, ctx.ints(axes)], keepdims=1)
    return ctx.emit(op_type, [x], axes=axes, keepdims=1)


def per_sample_sum(ctx: RuleContext, x: str, rank: int) -> str:
    """The sum over every axis but the batch's of `x`, of rank `rank`."""
    return reduce(ctx, "ReduceSum", x, list(range(1, rank)))


def passing_rule(ctx: RuleContext, node, grads):
    """R_x = R (the first input; LayerNormalization's scale and bias get nothing)."""
    return [grads[0]] + [None] * (len(node.input) - 1)


def alpha1_beta0(ctx: RuleContext, x: str, weight: str, relevance: str) -> str:
    """layers_ours.Linear.relprop with alpha 1: x [..., in] times `weight` [in, out], bias left out."""
    xp, xn, wp, wn = positive(ctx, x), negative(ctx, x), positive(ctx, weight), negative(ctx, weight)
    z = ctx.emit("Add", [ctx.emit("MatMul", [xp, wp]), ctx.emit("MatMul", [xn, wn])])
    s = safe_divide(ctx, relevance, z)

    def back(w: str) -> str:
        return ctx.emit("MatMul", [s, ctx.emit("Transpose", [w], perm=[1, 0])])

    return ctx.emit("Add", [ctx.mul(xp, back(wp)), ctx.mul(xn, back(wn))])


def is_weight_matmul(ctx: RuleContext, node: onnx.NodeProto) -> bool:
    """A MatMul of an activation by a constant 2-D weight: a torch Linear's product."""
    weight = ctx.value(node.input[1])
    return weight is not None and weight.ndim == 2 and ctx.value(node.input[0]) is None


def gemm_rule(ctx: RuleContext, node, grads):
    """The classifier (torch Linear on [batch, features]): alpha 1, beta 0; its bias C gets nothing."""
    layer = read_layer(ctx, node)
    return [alpha1_beta0(ctx, layer.x, layer.w, grads[0])] + [None] * (len(node.input) - 1)


def matmul_rule(ctx: RuleContext, node, grads):
    """A Linear's product (alpha 1, beta 0), or a product of two activations (the halved z-rule)."""
    if is_weight_matmul(ctx, node):
        return [alpha1_beta0(ctx, node.input[0], node.input[1], grads[0]), None]
    if not (ctx.needs(0) and ctx.needs(1)):
        raise ExportError(f"node {node.name!r} (MatMul): lrp-chefer has rules for an activation times a constant "
                          "2-D weight and for a product of two activations only")
    s = safe_divide(ctx, grads[0], node.output[0])
    gradients = VANILLA.lookup("MatMul")(ctx, node, [s])
    half = ctx.const(0.5, like=node.output[0])
    return [ctx.mul(half, ctx.mul(x, g)) for x, g in zip(node.input, gradients)]


def constant_scaling_rule(ctx: RuleContext, node, grads):
    """Mul by a constant (the attention scale): R passes to the activation; a product of two activations is
    refused (the authors' ViT has none outside Q K^T and A V, which are MatMuls)."""
    active = [i for i in range(2) if ctx.needs(i)]
    if len(active) != 1 or ctx.value(node.input[1 - active[0]]) is None:
        raise ExportError(f"node {node.name!r} (Mul): lrp-chefer has a rule for a product by a constant only; "
                          "export this model with the vanilla rule set")
    if ctx.index.shape(node.input[active[0]]) != ctx.index.shape(node.output[0]):
        raise ExportError(f"node {node.name!r} (Mul): the activation is broadcast by the constant; lrp-chefer "
                          "has no rule for it")
    return [grads[0] if i == active[0] else None for i in range(2)]


def is_linear_bias(ctx: RuleContext, node: onnx.NodeProto, active: int) -> bool:
    """The Add of a constant to a Linear's product (torch Linear on [..., features] exports MatMul + Add)."""
    producer = ctx.index.producer.get(node.input[active])
    return (ctx.value(node.input[1 - active]) is not None and producer is not None
            and producer.op_type == "MatMul" and is_weight_matmul(ctx, producer))


def sum_rule(ctx: RuleContext, node, grads):
    """layers_ours.Add.relprop (eq. 5), per sample; a Linear's bias lets R pass to the product."""
    relevance, y = grads[0], node.output[0]
    active = [i for i in range(2) if ctx.needs(i)]
    if len(active) == 1 and is_linear_bias(ctx, node, active[0]):
        return [relevance if i == active[0] else None for i in range(2)]
    for i in active:
        if ctx.index.shape(node.input[i]) != ctx.index.shape(y):
            raise ExportError(f"node {node.name!r} (Add): operand {node.input[i]!r} is broadcast; lrp-chefer's sum "
                              "rule needs activations of the sum's shape")
    s = safe_divide(ctx, relevance, y)
    shares = [ctx.mul(x, s) for x in node.input]  # a constant's share broadcast per sample
    rank = ctx.index.rank(y)
    totals = [per_sample_sum(ctx, share, rank) for share in shares]
    magnitudes = [ctx.emit("Abs", [total]) for total in totals]
    both = ctx.emit("Add", magnitudes)
    total_relevance = per_sample_sum(ctx, relevance, rank)
    result = []
    for i in range(2):
        if i not in active:
            result.append(None)
            continue
        target = ctx.mul(safe_divide(ctx, magnitudes[i], both), total_relevance)
        result.append(ctx.mul(shares[i], safe_divide(ctx, target, totals[i])))
    return result


def first_conv_rule(ctx: RuleContext, node, grads):
    """layers_ours.Conv2d.relprop on 3 input channels: z^B with the sample's lowest and highest input."""
    layer = read_layer(ctx, node)
    if layer.weight_shape[1] != 3 or folded_batchnorm(ctx, node) is not None or ctx.index.rank(layer.x) != 4:
        raise ExportError(f"node {node.name!r} (Conv): lrp-chefer has the authors' rule for a 2-D Conv of 3 input "
                          "channels (a patch embedding) only")
    x = layer.x
    bound = {op: ctx.emit("Expand", [reduce(ctx, op, x, [1, 2, 3]), ctx.shape_of(x)]) for op in ("ReduceMin",
                                                                                                  "ReduceMax")}
    low, high = bound["ReduceMin"], bound["ReduceMax"]
    wp, wn = positive(ctx, layer.w), negative(ctx, layer.w)
    z = ctx.emit("Sub", [ctx.emit("Sub", [apply(ctx, layer, x, layer.w, None), apply(ctx, layer, low, wp, None)]),
                         apply(ctx, layer, high, wn, None)])
    s = ctx.emit("Div", [grads[0], ctx.emit("Add", [z, ctx.const(SAFE_DIVIDE_EPSILON, like=z)])])
    relevance = ctx.emit("Sub", [ctx.emit("Sub", [ctx.mul(x, transpose(ctx, layer, None, s)),
                                                  ctx.mul(low, transpose(ctx, layer, wp, s))]),
                                 ctx.mul(high, transpose(ctx, layer, wn, s))])
    return [relevance] + [None] * (len(node.input) - 1)


def selection_rule(ctx: RuleContext, node, grads):
    """Gather (their IndexSelect, the class token): x * grad(R // y), the relevance moved to the selected elements."""
    gradient = VANILLA.lookup("Gather")(ctx, node, [safe_divide(ctx, grads[0], node.output[0])])[0]
    return [ctx.mul(node.input[0], gradient), None]


def is_cloned(ctx: RuleContext, tensor: str) -> bool:
    """Whether `tensor` is copied to several consumers on the path to the score (their Clone: the residual stream
    read by a LayerNorm and an Add); reading its shape, or slicing it into parts (q, k, v), is no copy."""
    readers = [node for node in ctx.index.consumers.get(tensor, []) if node.op_type not in ("Shape", *SPLITTING_OPS)
               and any(ctx.is_active(output) for output in node.output)]
    return len(readers) > 1


def through_clone(rule: Rule) -> Rule:
    """`rule`, with layers_ours.Clone.relprop on every input that is cloned: R_x = x * (R // x) for each copy's R
    (linear in R, so the copies' contributions may be summed afterwards)."""
    def with_clone(ctx: RuleContext, node, grads):
        relevances = rule(ctx, node, grads)
        return [ctx.mul(x, safe_divide(ctx, r, x)) if r is not None and is_cloned(ctx, x) else r
                for x, r in zip(node.input, relevances)]

    return with_clone


def chefer_rules() -> dict[str, Rule]:
    """Every op type the rule set covers (no base: the others are refused)."""
    rules = {
        **{op: VANILLA.lookup(op) for op in INDEX_OPS},
        "Gather": selection_rule,
        **{op: passing_rule for op in PASSING_OPS},
        "MatMul": matmul_rule,
        "Gemm": gemm_rule,
        "Add": sum_rule,
        "Mul": constant_scaling_rule,
        "Conv": first_conv_rule,
    }
    return {op: through_clone(rule) for op, rule in rules.items()}
