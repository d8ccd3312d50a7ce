"""Eigen-CAM.

Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN 2020
(arXiv:2008.00299).

The paper's definition: with the layer's activations reshaped to O (h*w x K) and O = U S V^T, the map is the
projection on the first right-singular vector, L = O v_1, reshaped to [h, w]. No gradients and no
class: the map is not class-discriminative (the target only selects what the file computes).

camrt computes it as pytorch-grad-cam's EigenCAM does (`camrt.methods.projection`): columns
centred before the SVD (the paper does not say so), the sign of v_1 as LAPACK returns it with no
correction, then ReLU. The ReLU, upsampling and normalisation are applied by `camrt.postprocess`.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..hookspecs import hookimpl
from .base import GraphOutputs, Method, Requirements
from .projection import ProjectionOptions, first_principal_component


class EigenCAM(Method):
    """Eigen-CAM: the first principal component of the activations (Muhammad & Yeasin 2020); class-agnostic."""

    name = "eigencam"
    aliases = ("eigen-cam",)
    Options = ProjectionOptions
    requires = Requirements(activations=True)

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        if layer is None:
            raise UsageError(f"method {self.name!r} needs a layer")
        return first_principal_component(outputs.activation(layer))


@hookimpl
def register_methods(register):
    register(EigenCAM)
