"""LRP rules for transformers: AttnLRP and CP-LRP, written on ONNX nodes as relevance propagation.

Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek, "AttnLRP: Attention-Aware Layer-Wise Relevance
Propagation for Transformers", ICML 2024 (arXiv 2402.05602); the equation and proposition numbers below are
those LXT 2.1, the authors' library, cites in its docstrings (lxt/efficient/rules.py, lxt/explicit/functional.py;
the paper itself could not be read offline). Ali, Schnake, Eberle, Montavon, Mueller, Wolf,
"XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022 (CP-LRP).

For a node y = f(x_1, ..., x_n) with relevance R at y, J_i^T the transposed Jacobian of y in x_i (the node's
built-in gradient rule) and stab(y) = y + eps (sign(y) + [y == 0]) (zennit.core.stabilize; eps: the rule set's,
composites.TRANSFORMER_EPSILON):

  epsilon   (Bach et al. 2015, eq. 58) for nodes linear in their one active input (Conv, Gemm, MatMul by a
            weight, Add/Sub/Sum, Mul or Div by a constant, ReduceMean/ReduceSum, average pools):
                R_i = x_i * J_i^T (R / stab(y))
            An added constant (a bias, the position embedding) absorbs its share z_bias / y of R.
  uniform   (AttnLRP eq. 7 and Prop. 3.3, the product rule) for a product of n active inputs (MatMul Q K^T
            and A V, Mul):
                R_i = (1/n) x_i * J_i^T (R / stab(y)),  n = 2: the relevance is halved between the operands
  identity  (AttnLRP eq. 9) element-wise activations (Gelu, ...): R_x = R
  LayerNorm (AttnLRP Prop. 3.4: the identity rule on 1/std; CP-LRP's LayerNorm rule) the standard deviation
            held constant, so that y = gamma (x - mean(x)) rstd + beta is linear in x; the epsilon rule on it:
                R_x = x * rstd (g - mean(g)),  g = gamma R / stab(y)  (mean over the normalised axes)
  softmax   AttnLRP (Prop. 3.1, the first-order Taylor decomposition of s = softmax(x) at x, whose bias
            absorbs the rest):  R_x = x * (R - s sum(R))   (sum over the softmax axis)
            CP-LRP: the attention probabilities are constants: no relevance reaches the softmax input, and
            A V passes all of R to V (the epsilon rule of a linear map of V).

These are what LXT computes through gradient x input with detached tensors (stop_gradient on the standard
deviation, divide_gradient(., 2) on matmul operands, the identity rule as y/x times the gradient), with
eps = 0 on its linear layers. Every op not named here is refused, naming the node, rather than given its
gradient: a rule set whose unknown ops fell back to the gradient would pass a gradient off as relevance.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import TensorProto, helper

from camrt_exporters import VANILLA, ExportError, RuleContext, attribute

from .rules import ACTIVATIONS, pass_rule, ratio

#: Ops linear in their active input, whose epsilon rule is gradient x input at R / stab(y).
LINEAR_NODES = ("Conv", "Gemm", "Add", "Sub", "Sum", "ReduceMean", "ReduceSum", "AveragePool",
                "GlobalAveragePool")
#: Linear ops that may add several activations (the others take one activation and constants).
SUMS = ("Add", "Sub", "Sum")
#: Ops that only move, select or copy elements: their gradient moves the relevance with the elements.
INDEX_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Gather",
             "Identity", "Expand")

Rule = Callable[[RuleContext, onnx.NodeProto, list], list]


def active_inputs(ctx: RuleContext, node: onnx.NodeProto) -> list[int]:
    return [i for i in range(len(node.input)) if ctx.needs(i)]


def gradient_times_input(ctx: RuleContext, node: onnx.NodeProto, relevance: str, epsilon: float,
                         share: float = 1.0, inputs: list[int] | None = None) -> list[str | None]:
    """R_i = share * x_i * J_i^T (R / stab(y)) for the active inputs i (or `inputs`), None for the others."""
    wanted = active_inputs(ctx, node) if inputs is None else inputs
    scaled = ratio(ctx, relevance, node.output[0], epsilon)
    if share != 1.0:
        scaled = ctx.mul(scaled, ctx.const(share, like=node.output[0]))
    grads = VANILLA.lookup(node.op_type)(ctx, node, [scaled])
    return [ctx.mul(node.input[i], grads[i]) if i in wanted and grads[i] is not None else None
            for i in range(len(node.input))]


def epsilon_rule(epsilon: float) -> Rule:
    """The epsilon rule of a node linear in its active input; a second active input is refused, except in a sum."""
    def lrp_epsilon(ctx: RuleContext, node, grads):
        active = active_inputs(ctx, node)
        if node.op_type not in SUMS and len(active) > 1:
            raise ExportError(f"node {node.name!r} ({node.op_type}): no LRP rule for {node.op_type} of "
                              f"{len(active)} activations; export this model with the vanilla rule set")
        return gradient_times_input(ctx, node, grads[0], epsilon)

    return lrp_epsilon


def product_rule(epsilon: float) -> Rule:
    """AttnLRP's uniform rule on MatMul and Mul: with n active operands each gets 1/n; with one, epsilon."""
    def lrp_product(ctx: RuleContext, node, grads):
        return gradient_times_input(ctx, node, grads[0], epsilon, share=1.0 / len(active_inputs(ctx, node)))

    return lrp_product


def attention_value_rule(epsilon: float) -> Rule:
    """CP-LRP on MatMul and Mul: a product of two activations is only accepted as attention times values
    (one operand a Softmax output, held constant: all relevance to the other operand). Q K^T needs no rule:
    its output only feeds the Softmax, which passes nothing back."""
    def lrp_cp_product(ctx: RuleContext, node, grads):
        active = active_inputs(ctx, node)
        if len(active) == 1:
            return gradient_times_input(ctx, node, grads[0], epsilon)
        values = [i for i in active if ctx.index.producer.get(node.input[i]) is None
                  or ctx.index.producer[node.input[i]].op_type != "Softmax"]
        if len(values) != 1:
            raise ExportError(f"node {node.name!r} ({node.op_type}): CP-LRP has a rule for a product of two "
                              "activations only where one is a Softmax output (attention times values); "
                              "export this model with lrp-attn or the vanilla rule set")
        return gradient_times_input(ctx, node, grads[0], epsilon, inputs=values)

    return lrp_cp_product


def layer_norm_rule(epsilon: float) -> Rule:
    """LayerNormalization with its standard deviation held constant, the epsilon rule on the linear map left."""
    def lrp_layer_norm(ctx: RuleContext, node, grads):
        if any(ctx.needs(i) for i in range(1, len(node.input))):
            raise ExportError(f"node {node.name!r} (LayerNormalization): scale or bias computed at run time has "
                              "no LRP rule")
        x, scale = node.input[:2]
        rank = ctx.index.rank(x)
        axes = list(range(attribute(node, "axis", -1) % rank, rank))
        rstd = ctx.forward_output(2, "inv_std_dev")
        to = helper.np_dtype_to_tensor_dtype(ctx.np_dtype(x))
        if attribute(node, "stash_type", TensorProto.FLOAT) != to:  # InvStdDev has the stash type
            rstd = ctx.emit("Cast", [rstd], to=to)
        g = ctx.mul(ratio(ctx, grads[0], node.output[0], epsilon), scale)
        mean = (ctx.emit("ReduceMean", [g, ctx.ints(axes)], keepdims=1) if ctx.opset >= 18  # axes an input
                else ctx.emit("ReduceMean", [g], axes=axes, keepdims=1))
        centred = ctx.emit("Sub", [g, mean])
        return [ctx.mul(x, ctx.mul(centred, rstd))] + [None] * (len(node.input) - 1)

    return lrp_layer_norm


def softmax_axis(ctx: RuleContext, node) -> int:
    if ctx.opset < 13:
        raise ExportError(f"node {node.name!r} (Softmax): opset {ctx.opset} (coerced 2-D softmax) has no LRP rule; "
                          "export with opset 13 or later")
    return attribute(node, "axis", -1)


def softmax_rule(ctx: RuleContext, node, grads):
    """AttnLRP's softmax rule: R_x = x * (R - s sum(R))."""
    s, relevance = node.output[0], grads[0]
    total = ctx.emit("ReduceSum", [relevance, ctx.ints([softmax_axis(ctx, node)])], keepdims=1)
    return [ctx.mul(node.input[0], ctx.emit("Sub", [relevance, ctx.mul(s, total)]))]


def detached_softmax_rule(ctx: RuleContext, node, grads):
    """CP-LRP: the attention probabilities are constants; nothing passes to the scores."""
    softmax_axis(ctx, node)
    return [None]


def divide_rule(epsilon: float) -> Rule:
    """x / c for a divisor not computed from the image: linear in x (epsilon); an active divisor is refused."""
    def lrp_divide(ctx: RuleContext, node, grads):
        if ctx.needs(1):
            raise ExportError(f"node {node.name!r} (Div): a divisor computed from the image has no LRP rule "
                              "(a normalisation written out: export it as LayerNormalization, opset 17 or later)")
        return gradient_times_input(ctx, node, grads[0], epsilon)

    return lrp_divide


def transformer_rules(epsilon: float, conservative: bool) -> dict[str, Rule]:
    """AttnLRP's rules, or CP-LRP's (`conservative`), on every op type they cover (no base rule set)."""
    linear = epsilon_rule(epsilon)
    product = attention_value_rule(epsilon) if conservative else product_rule(epsilon)
    return {
        **{op: VANILLA.lookup(op) for op in INDEX_OPS},
        **{op: pass_rule for op in ACTIVATIONS},
        **{op: linear for op in LINEAR_NODES},
        "MatMul": product,
        "Mul": product,
        "Div": divide_rule(epsilon),
        "LayerNormalization": layer_norm_rule(epsilon),
        "Softmax": detached_softmax_rule if conservative else softmax_rule,
    }
