"""Finite-difference checks of the InstanceNormalization and GroupNormalization backward rules
(the harness: tests/exporters/rule_harness.py): the gradient flows through the statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from onnx import TensorProto

from camrt_exporters.errors import ExportError

from .rule_harness import SOME, Case, check, gradient_model, node, seeds, shapes


@SOME
@given(x_shape=shapes(min_rank=3, max_rank=4), seed=seeds, epsilon=st.sampled_from([1e-5, 0.1]),
       symbolic=st.booleans(), opset=st.sampled_from([13, 18]))
def test_instance_normalization(x_shape, seed, epsilon, symbolic, opset):
    """Per-channel scale and bias; spatial dims static or symbolic; opset 13 (ReduceMean's axes an
    attribute, as in torch's legacy exports) and 18."""
    rng = np.random.default_rng(seed)
    # over 2 elements xhat = +-1 and the gradient is ~0 by cancellation (as LayerNormalization)
    assume(int(np.prod(x_shape[2:])) >= 3)
    channels = x_shape[1]
    inits = {"scale": rng.standard_normal(channels), "bias": rng.standard_normal(channels)}
    case = Case([node("InstanceNormalization", ["X", "scale", "bias"], epsilon=epsilon)],
                rng.standard_normal(x_shape) * 2, inits,
                symbolic_axes=tuple(range(2, len(x_shape))) if symbolic else (), opset=opset)
    check(case, rng)


@SOME
@given(data=st.data(), seed=seeds, rank=st.integers(3, 4), epsilon=st.sampled_from([1e-5, 0.1]))
def test_group_normalization(data, seed, rank, epsilon):
    """Opset 21: scale and bias per channel. ONNX shape inference (1.23)
    gives GroupNormalization's output no shape (nor type): the harness declares Y's. Statistics in
    float64 (stash_type): the default float32 ones would spoil the float64 finite differences."""
    rng = np.random.default_rng(seed)
    groups = data.draw(st.integers(1, 3))
    per_group = data.draw(st.integers(1, 2))
    spatial = [data.draw(st.integers(1, 3)) for _ in range(rank - 2)]
    x_shape = (data.draw(st.integers(1, 2)), groups * per_group, *spatial)
    assume(per_group * int(np.prod(spatial)) >= 3)
    inits = {"scale": rng.standard_normal(x_shape[1]), "bias": rng.standard_normal(x_shape[1])}
    case = Case([node("GroupNormalization", ["X", "scale", "bias"], num_groups=groups, epsilon=epsilon,
                      stash_type=TensorProto.DOUBLE)],
                rng.standard_normal(x_shape) * 2, inits, opset=21, y_shaped_like_x=True)
    check(case, rng)



def test_group_normalization_opset_18_is_refused():
    """Opset 18's per-group scale (deprecated; onnx's checker rejects it): a clear error."""
    case = Case([node("GroupNormalization", ["X", "scale", "bias"], num_groups=1)], np.ones((1, 2, 3)),
                {"scale": np.ones(1), "bias": np.zeros(1)}, y_shaped_like_x=True)
    with pytest.raises(ExportError, match="GroupNormalization.*opset 18.*opset 21"):
        gradient_model(case, np.float32)


TESTED_OPS = {"InstanceNormalization", "GroupNormalization"}
