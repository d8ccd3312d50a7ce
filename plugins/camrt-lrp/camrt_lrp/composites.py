"""zennit 0.5.1's composites (zennit/composites.py) as camrt rule sets over the vanilla rules.

Every composite starts from zennit's `layer_map_base`: activations Pass, sums (its canonizers' Sum
modules: residual additions) and average pools Norm, BatchNorm Pass (after a Conv it is folded first,
as zennit's SequentialMergeBatchNorm canonizer does). The ops not named here keep their gradient
(MaxPool, reshapes, ...), as modules without a rule do in zennit. Stabilizer and epsilon are zennit's
defaults, 1e-6.

  EpsilonPlusFlat     first linear layer (Conv or dense) flat, other Convs z+, dense layers epsilon
  EpsilonGammaBox     first Conv z^B (bounds from the file's preprocessing), other Convs gamma = 0.25,
                      dense layers epsilon
  EpsilonAlpha2Beta1  Convs alpha 2 beta 1, dense layers epsilon

and the transformer rule sets of transformer_rules.py (no base: the ops they do not name are refused):

  lrp-attn  AttnLRP (Achtibat et al. 2024): epsilon on linear layers, LayerNorm's std constant, the uniform
            rule on products (Q K^T, A V), softmax's Taylor rule, activations identity
  lrp-cp    CP-LRP (Ali et al. 2022): the same, but the attention probabilities constant (relevance through
            the values only)

Their epsilon is TRANSFORMER_EPSILON = 1e-12, not zennit's 1e-6: LXT, the authors' library, computes these
rules as gradient x input, which is the epsilon rule with epsilon 0. 1e-12 is below float32's resolution of
any activation that carries relevance, so it only keeps an exact zero from being divided by. With 1e-6 the
maps of a random-weight vit_tiny moved by 0.5-1.4% (max-relative) from LXT's, through the many small
pre-activations of random weights.
"""

from __future__ import annotations

from camrt_exporters import VANILLA, RuleSet

from .chefer_rules import chefer_rules
from .names import ATTN_LRP, CHEFER_LRP, CP_LRP, EPSILON_ALPHA2_BETA1, EPSILON_GAMMA_BOX, EPSILON_PLUS_FLAT
from .rules import (
    ACTIVATIONS,
    alpha_beta_rule,
    box_rule,
    epsilon_rule,
    flat_rule,
    gamma_rule,
    linear_layer_rule,
    norm_rule,
    pass_rule,
    refuse_rule,
)
from .transformer_rules import transformer_rules

EPSILON = 1e-6
STABILIZER = 1e-6
GAMMA = 0.25
TRANSFORMER_EPSILON = 1e-12


def _base_rules() -> dict:
    """zennit's layer_map_base on ONNX ops; ConvTranspose is refused (no LRP rule here, and its gradient
    would be passed off as relevance)."""
    norm = norm_rule(STABILIZER)
    return {
        **{op: pass_rule for op in ACTIVATIONS},
        "BatchNormalization": pass_rule,
        "Add": norm,
        "AveragePool": norm,
        "GlobalAveragePool": norm,
        "ReduceMean": norm,
        "ConvTranspose": refuse_rule,
    }


def composite(name: str, conv_rule, dense_rule, first_rule=None, first_ops=("Conv", "Gemm", "MatMul")) -> RuleSet:
    """A rule set: `conv_rule` for Conv, `dense_rule` for Gemm/MatMul, `first_rule` for the first layer among
    `first_ops` (zennit's SpecialFirstLayerMapComposite)."""
    conv = linear_layer_rule(conv_rule, first_rule, first_ops)
    dense = linear_layer_rule(dense_rule, first_rule, first_ops)
    return RuleSet(name, {**_base_rules(), "Conv": conv, "Gemm": dense, "MatMul": dense}, base=VANILLA)


RULE_SETS = (
    composite(EPSILON_PLUS_FLAT, alpha_beta_rule(1.0, 0.0, STABILIZER), epsilon_rule(EPSILON),
              first_rule=flat_rule(STABILIZER)),
    composite(EPSILON_GAMMA_BOX, gamma_rule(GAMMA, STABILIZER), epsilon_rule(EPSILON),
              first_rule=box_rule(STABILIZER), first_ops=("Conv",)),
    composite(EPSILON_ALPHA2_BETA1, alpha_beta_rule(2.0, 1.0, STABILIZER), epsilon_rule(EPSILON)),
    RuleSet(ATTN_LRP, transformer_rules(TRANSFORMER_EPSILON, conservative=False)),
    RuleSet(CP_LRP, transformer_rules(TRANSFORMER_EPSILON, conservative=True)),
    RuleSet(CHEFER_LRP, chefer_rules()),
)
