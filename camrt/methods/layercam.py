"""Layer-CAM.

Jiang, Zhang, Hou, Cheng, Wei, "LayerCAM: Exploring Hierarchical Class Activation Maps for
Localization", IEEE Transactions on Image Processing 30, 2021 (IEEE Xplore document 9462463).

The paper's definition: w^kc_ij = ReLU(dS^c / dA^k_ij)  (a weight per location, no spatial pooling),
M^c = ReLU(sum_k w^kc * A^k)  (element-wise product, summed over channels).

The outer ReLU, upsampling and normalisation are applied by `camrt.postprocess`. Multi-layer
maps are fused by `camrt.postprocess` like every other method (the mean, as pytorch-grad-cam
does), not by the paper's tanh rescaling (eq. 9) and element-wise max (as torchcam does).
Option eigen_smooth (pytorch-grad-cam's): the first principal component of the weighted
activations instead of their sum (camrt.methods.base.ElementwiseWeightingMethod).
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import ElementwiseWeightingMethod


class LayerCAM(ElementwiseWeightingMethod):
    """Layer-CAM: activations weighted element-wise by their positive gradients (Jiang et al. 2021)."""

    name = "layercam"
    aliases = ("layer-cam",)

    def weighted_activations(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return np.maximum(gradients, 0) * activations


@hookimpl
def register_methods(register):
    register(LayerCAM)
