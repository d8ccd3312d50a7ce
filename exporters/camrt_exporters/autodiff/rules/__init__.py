"""Built-in backward rules and rule sets."""

from __future__ import annotations

from camrt.contract import RULE_DECONVNET, RULE_GUIDED, RULE_VANILLA

from ..reverse import RuleSet, rule_table
from . import elementwise, linear, normalization, pooling, quantize, resize, shape
from .relu_variants import DECONVNET_RULES, GUIDED_RULES

VANILLA = RuleSet(
    RULE_VANILLA,
    rule_table(elementwise.RULES, linear.RULES, normalization.RULES, pooling.RULES, quantize.RULES, resize.RULES,
               shape.RULES),
)
GUIDED = RuleSet(RULE_GUIDED, GUIDED_RULES, base=VANILLA)
DECONVNET = RuleSet(RULE_DECONVNET, DECONVNET_RULES, base=VANILLA)
BUILTIN_RULE_SETS = (VANILLA, GUIDED, DECONVNET)
