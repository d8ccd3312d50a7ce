"""XGrad-CAM (Axiom-based Grad-CAM).

Fu, Hu, Dong, Guo, Gao, Li, "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation
of CNNs", BMVC 2020 (arXiv:2008.02312).

The paper's XGrad-CAM weights (the closed form that satisfies its sensitivity and conservation
axioms as far as a linear combination of feature maps can):

    alpha^c_k = sum_ij (A^k_ij / sum_ab A^k_ab) * dS^c / dA^k_ij,   L^c = ReLU(sum_k alpha^c_k A^k)

As in pytorch-grad-cam's XGradCAM, eps = 1e-7 is added to the channel sum. The ReLU, upsampling
and normalisation are applied by `camrt.postprocess`.
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import ActivationWeightingMethod

EPS = 1e-7


class XGradCAM(ActivationWeightingMethod):
    """XGrad-CAM: gradients weighted by each channel's normalised activations (Fu et al. 2020)."""

    name = "xgradcam"
    aliases = ("xgrad-cam",)

    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        sum_activations = activations.sum(axis=(2, 3), dtype=np.float32, keepdims=True)
        weighted = gradients * activations / (sum_activations + np.float32(EPS))
        return weighted.sum(axis=(2, 3), dtype=np.float32)


@hookimpl
def register_methods(register):
    register(XGradCAM)
