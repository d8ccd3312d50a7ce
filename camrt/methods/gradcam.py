"""Grad-CAM.

Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from Deep
Networks via Gradient-based Localization", ICCV 2017 (arXiv:1610.02391).

Eq. 1: alpha_k^c = 1/Z sum_i sum_j d y^c / d A^k_ij  (the spatial mean of the gradients);
eq. 2: L^c = ReLU(sum_k alpha_k^c A^k).
The ReLU of eq. 2, upsampling and normalisation are applied by `camrt.postprocess`.
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import ActivationWeightingMethod


class GradCAM(ActivationWeightingMethod):
    """Grad-CAM: channels weighted by the spatial mean of their gradients (Selvaraju et al. 2017)."""

    name = "gradcam"
    aliases = ("grad-cam",)

    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return gradients.mean(axis=(2, 3), dtype=np.float32)

    def weights_graph(self, builder, activation: str, gradient: str) -> str:
        """Eq. 1 as an ONNX node (camrt.execution.heatmap_graph): ReduceMean over the spatial axes, [B, K, 1, 1]."""
        return builder.reduce("ReduceMean", gradient, [2, 3])


@hookimpl
def register_methods(register):
    register(GradCAM)
