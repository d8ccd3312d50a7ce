"""The example plugin's own tests, written as a plugin author writes them: camrt.testing's tiny
contract file, torch autograd's numbers for it as the oracle, and assert_heatmaps_close."""

from __future__ import annotations

import numpy as np

import camrt_example
from camrt import contract, postprocess
from camrt.plugins import create_plugin_manager
from camrt.plugins.registry import build_method_registry
from camrt.testing import assert_heatmaps_close, graph_outputs, run_method, tiny_reference


def max_gradcam_closed_form(layer: str) -> np.ndarray:
    """sum_k max_ij(d y^c / d A^k_ij) A^k from torch's activations and gradients of `layer`."""
    reference = tiny_reference()
    act, grad = reference[contract.activation_output(layer)], reference[contract.gradient_output(layer)]
    return np.einsum("bk,bkhw->bhw", grad.max(axis=(2, 3)), act)


def test_raw_maps_equal_the_closed_form_on_torchs_numbers():
    """On `conv` (before the ReLU) the gradient is masked by conv > 0, so the spatial max differs
    from Grad-CAM's mean: the toy really is another method there."""
    outputs = graph_outputs(camrt_example.MaxGradCAM(), layer="conv")
    maps = camrt_example.MaxGradCAM().explain(outputs, layer="conv")
    assert_heatmaps_close(maps, max_gradcam_closed_form("conv"), rtol=1e-4, atol=1e-6)
    gradients = outputs.gradient("conv")
    assert not np.allclose(gradients.max(axis=(2, 3)), gradients.mean(axis=(2, 3)))


def test_heatmaps_are_the_closed_form_after_camrts_postprocessing():
    raw = max_gradcam_closed_form("conv").astype(np.float32)
    size = tiny_reference()["inputs"].shape[2:]
    results = run_method(camrt_example.MaxGradCAM(), layer="conv")
    assert_heatmaps_close(results, [postprocess.finalize([m], size) for m in raw], atol=1e-5)
    assert [r.target for r in results] == tiny_reference()[contract.TARGET_INDEX_OUTPUT].tolist()


def test_the_hook_registers_max_gradcam_under_the_plugin_name():
    pm = create_plugin_manager(load_entrypoints=False)
    pm.register(camrt_example, name="example")
    registry = build_method_registry(pm)
    assert registry.get("maxgradcam") is camrt_example.MaxGradCAM
    assert registry.plugin_of("max-gradcam") == "example"
