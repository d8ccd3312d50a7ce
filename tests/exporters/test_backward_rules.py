"""Every backward rule has a finite-difference check (DESIGN.md, "Testing oracles"), one file per
rule family: test_backward_rules_{elementwise,activations,linear,pooling,normalization,spatial,
data_movement}.py; the rule sets and the graph walk in test_backward_rules_rule_sets.py, torch
exports in test_backward_rules_torch_exports.py. The harness: tests/exporters/rule_harness.py.
The quantizers are step functions: their straight-through convention is checked in closed form and
against torch's fake-quantize autograd instead (test_quantized.py).
"""

from __future__ import annotations

from camrt_exporters.autodiff.rules import VANILLA

from .test_backward_rules_activations import TESTED_OPS as ACTIVATION_AND_REDUCTION_OPS
from .test_backward_rules_data_movement import TESTED_OPS as DATA_MOVEMENT_OPS
from .test_backward_rules_elementwise import TESTED_OPS as ELEMENTWISE_OPS
from .test_backward_rules_linear import TESTED_OPS as LINEAR_OPS
from .test_backward_rules_normalization import TESTED_OPS as NORMALIZATION_OPS
from .test_backward_rules_pooling import TESTED_OPS as POOLING_OPS
from .test_backward_rules_spatial import TESTED_OPS as SPATIAL_OPS
from .test_quantized import TESTED_OPS as QUANTIZER_OPS

TESTED_OPS = {
    *ELEMENTWISE_OPS, *LINEAR_OPS, *POOLING_OPS, *DATA_MOVEMENT_OPS,
    *ACTIVATION_AND_REDUCTION_OPS, *NORMALIZATION_OPS, *SPATIAL_OPS, *QUANTIZER_OPS,
}


def test_every_vanilla_rule_has_a_finite_difference_test():
    """A rule added to VANILLA needs a test in its family's file (and an entry in that file's TESTED_OPS)."""
    assert VANILLA.op_types() == TESTED_OPS
