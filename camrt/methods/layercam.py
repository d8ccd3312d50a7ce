"""Layer-CAM.

Jiang, Zhang, Hou, Cheng, Wei, "LayerCAM: Exploring Hierarchical Class Activation Maps for
Localization", IEEE Transactions on Image Processing 30, 2021 (IEEE Xplore document 9462463).

The paper's definition: w^kc_ij = ReLU(dS^c / dA^k_ij)  (a weight per location, no spatial pooling),
M^c = ReLU(sum_k w^kc * A^k)  (element-wise product, summed over channels).

The outer ReLU, upsampling, normalisation and fusion are applied by `camrt.postprocess`.
Several layers are fused as the paper does (option fusion="tanh-max", the default): each layer's
normalised map is scaled by tanh(2 M) (eq. 9, gamma = 2) and the layers are combined by their
element-wise maximum at the largest layer's resolution, exactly as torchcam's ``LayerCAM.fuse_cams``
(tested against it). pytorch-grad-cam instead averages the layers' maps like every other method;
fusion="mean" gives its result (tested against it). With one layer both are the same map.
Option eigen_smooth (pytorch-grad-cam's): the first principal component of the weighted
activations instead of their sum (camrt.methods.base.ElementwiseWeightingMethod).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hookspecs import hookimpl
from ..postprocess import check_fusion
from .base import EigenSmoothOptions, ElementwiseWeightingMethod


class LayerCAM(ElementwiseWeightingMethod):
    """Layer-CAM: activations weighted element-wise by their positive gradients (Jiang et al. 2021)."""

    name = "layercam"
    aliases = ("layer-cam",)

    @dataclass(frozen=True)
    class Options(EigenSmoothOptions):
        """eigen_smooth: first principal component of the weighted activations instead of their sum;
        fusion: how several layers' maps are fused, "tanh-max" (the paper's eq. 9, torchcam) or
        "mean" (pytorch-grad-cam)."""

        fusion: str = "tanh-max"

        def __post_init__(self):
            check_fusion(self.fusion)

    def weighted_activations(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return np.maximum(gradients, 0) * activations

    def layer_fusion(self) -> str:
        return self.options.fusion


@hookimpl
def register_methods(register):
    register(LayerCAM)
