"""camrt-lrp: layer-wise relevance propagation for camrt, as a plugin.

Two hooks: `register_gradient_rules` adds zennit's composites as exporter rule sets (`camrt export
--rules lrp-epsilon-plus-flat`), `register_methods` adds one heatmap method per composite (`camrt explain
-m lrp-epsilon-plus-flat`). The rule sets import the exporter, the methods only camrt and numpy, so the
run time (no exporter installed) loads the methods alone.
"""

from __future__ import annotations

import camrt


@camrt.hookimpl
def register_gradient_rules(register):
    from .composites import RULE_SETS

    for rule_set in RULE_SETS:
        register(rule_set)


@camrt.hookimpl
def register_methods(register):
    from .method import METHODS

    for method in METHODS:
        register(method)
