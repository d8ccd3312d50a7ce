"""Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise).

Not in a paper under this name: pytorch-grad-cam's implementation (Gildenblat et al.,
https://github.com/jacobgil/pytorch-grad-cam, ``grad_cam_elementwise.py``); its pull request cites
Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021.

L^c_ij = sum_k ReLU(dS^c / dA^k_ij * A^k_ij) -- like HiResCAM (Draelos & Carin 2020), but each
element-wise product is rectified before the channel sum, so negative evidence in one channel
cannot cancel positive evidence in another. The final ReLU, upsampling and normalisation are
applied by `camrt.postprocess`.
Option eigen_smooth (pytorch-grad-cam's): the first principal component of the weighted
activations instead of their sum (camrt.methods.base.ElementwiseWeightingMethod).
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import ElementwiseWeightingMethod


class GradCAMElementWise(ElementwiseWeightingMethod):
    """Grad-CAM element-wise: rectified gradient x activation, summed over channels (pytorch-grad-cam)."""

    name = "gradcam-elementwise"
    aliases = ("gradcamelementwise", "grad-cam-elementwise")

    def weighted_activations(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return np.maximum(gradients * activations, 0)


@hookimpl
def register_methods(register):
    register(GradCAMElementWise)
