"""camrt.testing, the plugin authors' helpers: the shipped tiny file's outputs and a built-in method's
heatmaps against torch autograd's stored numbers, and what assert_heatmaps_close accepts and refuses."""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract, postprocess
from camrt.methods.gradcam import GradCAM
from camrt.testing import TINY_MODEL, assert_heatmaps_close, graph_outputs, run_method, tiny_reference


def test_graph_outputs_are_what_the_method_declares_and_equal_torch():
    reference = tiny_reference()
    outputs = graph_outputs(GradCAM(), layer="conv")
    assert set(outputs.values) == {contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT,
                                   contract.activation_output("conv"), contract.gradient_output("conv")}
    np.testing.assert_array_equal(outputs.target_index, reference[contract.TARGET_INDEX_OUTPUT])
    for name in (contract.activation_output("conv"), contract.gradient_output("conv"), contract.LOGITS_OUTPUT):
        np.testing.assert_allclose(outputs.values[name], reference[name], rtol=1e-4, atol=1e-6)


def test_run_method_gives_the_closed_form_gradcam_of_the_reference():
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): ReLU(sum_k mean_ij(dy/dA^k) A^k), from torch's numbers."""
    reference = tiny_reference()
    act, grad = reference[contract.activation_output("feat")], reference[contract.gradient_output("feat")]
    raw = np.einsum("bk,bkhw->bhw", grad.mean(axis=(2, 3)), act)
    size = reference["inputs"].shape[2:]
    want = [postprocess.finalize([raw[i].astype(np.float32)], size) for i in range(len(raw))]
    results = run_method("gradcam", layer="feat")
    assert [r.target for r in results] == reference[contract.TARGET_INDEX_OUTPUT].tolist()
    assert_heatmaps_close(results, want, atol=1e-5)


def test_every_built_in_method_can_open_the_tiny_model():
    """Every CNN method opens the tiny file; the attention methods are refused naming --attention."""
    from camrt.explainer import Explainer
    from camrt.modelfile.metadata import read_contract
    from camrt.plan import PlanRefused
    from camrt.plugins.registry import build_method_registry

    info = read_contract(TINY_MODEL)
    assert set(info.rule_sets) == {"vanilla", "guided", "deconvnet"} and info.layers == ["feat", "conv"]
    for cls in build_method_registry():
        if not cls.requires.uses_attention:
            Explainer(TINY_MODEL, method=cls.name, device="cpu")
            continue
        with pytest.raises(PlanRefused, match="--attention"):
            Explainer(TINY_MODEL, method=cls.name, device="cpu")


def test_assert_heatmaps_close_refusals():
    want = np.zeros((2, 3, 4))
    assert_heatmaps_close(want + 5e-7, want)
    with pytest.raises(AssertionError, match=r"shape \(3, 4\) != expected \(2, 3, 4\)"):
        assert_heatmaps_close(want[0], want)
    with pytest.raises(AssertionError, match="1 non-finite"):
        assert_heatmaps_close(np.where(np.arange(24).reshape(2, 3, 4) == 5, np.nan, 0.0), want)
    got = want.copy()
    got[1, 2, 3] = 0.5
    with pytest.raises(AssertionError, match=r"1 of 24 values differ .* worst at \(1, 2, 3\): got 0.5, want 0"):
        assert_heatmaps_close(got, want)
