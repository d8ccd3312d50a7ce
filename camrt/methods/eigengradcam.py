"""Eigen-Grad-CAM.

pytorch-grad-cam's EigenGradCAM (``eigen_grad_cam.py``): Eigen-CAM (Muhammad & Yeasin,
"Eigen-CAM: Class Activation Map using Principal Components", IJCNN 2020, arXiv:2008.00299) applied to the element-wise product of gradients and activations instead of the
activations, which makes it class-discriminative:

    O = reshape(dS^c/dA * A, h*w x K),  O = U S V^T,  L^c = O v_1.

Centring, SVD and sign convention as pytorch-grad-cam computes them (`camrt.methods.projection`).
The ReLU, upsampling and normalisation are applied by `camrt.postprocess`.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..hookspecs import hookimpl
from .base import GraphOutputs, Method, Requirements
from .projection import ProjectionOptions, first_principal_component


class EigenGradCAM(Method):
    """Eigen-Grad-CAM: the first principal component of gradient x activation (pytorch-grad-cam)."""

    name = "eigengradcam"
    aliases = ("eigen-grad-cam",)
    Options = ProjectionOptions
    requires = Requirements(activations=True, gradients=True)

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        if layer is None:
            raise UsageError(f"method {self.name!r} needs a layer")
        return first_principal_component(outputs.gradient(layer) * outputs.activation(layer))


@hookimpl
def register_methods(register):
    register(EigenGradCAM)
