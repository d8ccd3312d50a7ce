"""HiResCAM.

Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional
neural networks", arXiv:2011.08891 (2020).

The paper's definition: L^c_ij = sum_k (dS^c / dA^k_ij) * A^k_ij -- the gradient is multiplied
element-wise with the activations instead of being averaged over space first, then summed over
the channels. On a GAP + linear head the gradient is constant over space, so HiResCAM equals CAM
and Grad-CAM. The ReLU (as in pytorch-grad-cam's HiResCAM), upsampling and normalisation are
applied by `camrt.postprocess`. Option eigen_smooth (pytorch-grad-cam's): the first principal
component of the element-wise products instead of their sum (the faithfulness guarantee of the
paper no longer holds then, as pytorch-grad-cam warns).
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import ElementwiseWeightingMethod


class HiResCAM(ElementwiseWeightingMethod):
    """HiResCAM: element-wise gradient x activation, summed over channels (Draelos & Carin 2020)."""

    name = "hirescam"
    aliases = ("hires-cam",)

    def weighted_activations(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return gradients * activations


@hookimpl
def register_methods(register):
    register(HiResCAM)
