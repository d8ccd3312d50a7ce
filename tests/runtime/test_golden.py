"""The checked-in golden camrt files compute what torch autograd computed for them (their .npz,
written by tests/fixtures/make_golden.py): logits, activations, layer gradients, CAM weights,
input gradients of every rule set and FullGrad's bias terms, without torch at test time."""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract
from camrt.execution.session import ExplainSession
from tests.helpers import GOLDEN_VARIANTS, GoldenVariant


@pytest.mark.parametrize("variant", [v for v in GOLDEN_VARIANTS if v.references], ids=lambda v: v.name)
def test_golden_file_outputs_equal_torch_autograd(variant: GoldenVariant):
    with np.load(variant.reference_path) as stored:
        references = dict(stored)
    x, targets = references.pop("inputs"), references.pop("targets")
    session = ExplainSession(str(variant.path), device="cpu")
    got = session.run(x, targets, list(references))
    assert set(got) == set(references)
    for name, want in references.items():
        if name == contract.TARGET_INDEX_OUTPUT:
            np.testing.assert_array_equal(got[name], want)
        else:
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-6, err_msg=name)
