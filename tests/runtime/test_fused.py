"""Heatmaps made inside the onnxruntime session (`camrt.execution.heatmap_graph`) equal the numpy path's.

Oracle: the default host path (the method's numpy code + `camrt.postprocess`, itself checked
against pytorch-grad-cam in tests/exporters). Images of several sizes exercise the ONNX Resize
(linear, half_pixel) against cv2.INTER_LINEAR, upsampling by non-integer factors and downsampling.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import Explainer, UsageError
from tests.helpers import random_image

TOLERANCE = 1e-5


@pytest.mark.parametrize("layers", [("feat",), ("feat", "conv")])
def test_fused_heatmaps_equal_the_numpy_path(tiny, rng, layers):
    images = [random_image(rng, 12, 16), random_image(rng, 200, 150), random_image(rng, 37, 91),
              random_image(rng, 200, 150), random_image(rng, 4, 5)]
    targets = [None, 3, 0, None, 2]
    host = Explainer(tiny.path, method="gradcam", layer=list(layers), device="cpu").explain(images, targets)
    fused = Explainer(tiny.path, method="gradcam", layer=list(layers), device="cpu",
                      device_postprocess=True).explain(images, targets)
    for i, (a, b) in enumerate(zip(host, fused)):
        assert b.heatmap.shape == a.heatmap.shape == images[i].shape[:2]
        assert b.heatmap.dtype == np.float32
        assert (b.target, b.score, b.probability, b.label) == (a.target, a.score, a.probability, a.label)
        diff = float(np.abs(a.heatmap - b.heatmap).max())
        assert diff <= TOLERANCE, (i, images[i].shape, diff)
    assert sum(np.ptp(a.heatmap) > 0.5 for a in host) >= 3  # real maps (an all-negative map is all 0)


def test_fused_nchw_batch_at_model_resolution(tiny, rng):
    x = rng.standard_normal((3, 3, 12, 16)).astype(np.float32)
    host = Explainer(tiny.path, device="cpu").explain(x)
    fused = Explainer(tiny.path, device="cpu", device_postprocess=True).explain(x)
    assert max(float(np.abs(a.heatmap - b.heatmap).max()) for a, b in zip(host, fused)) <= TOLERANCE


@pytest.mark.parametrize("method, options", [("gradcam++", {}), ("gradcam", {"eigen_smooth": True}), ("saliency", {})])
def test_fused_refused_for_methods_without_an_onnx_weights_graph(tiny, method, options):
    with pytest.raises(UsageError, match="inside the session"):
        Explainer(tiny.path, method=method, device="cpu", device_postprocess=True, **options)


def test_fused_refused_for_a_fusion_other_than_the_mean(tiny):
    """The session's graph fuses layers by the mean only: a weights-graph method that fuses
    otherwise (here Grad-CAM with Layer-CAM's tanh-max fusion) is refused with several layers."""
    from camrt.methods.gradcam import GradCAM

    class TanhMaxGradCAM(GradCAM):
        name = "tanh-max-gradcam"

        def layer_fusion(self) -> str:
            return "tanh-max"

    Explainer(tiny.path, method=TanhMaxGradCAM(), layer="feat", device="cpu", device_postprocess=True)
    with pytest.raises(UsageError, match="other than by the mean"):
        Explainer(tiny.path, method=TanhMaxGradCAM(), layer=["feat", "conv"], device="cpu", device_postprocess=True)
