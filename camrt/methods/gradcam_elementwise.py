"""Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise).

Not in a paper under this name: pytorch-grad-cam's implementation (Gildenblat et al.,
https://github.com/jacobgil/pytorch-grad-cam, ``grad_cam_elementwise.py``); its pull request cites
Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021.

L^c_ij = sum_k ReLU(dS^c / dA^k_ij * A^k_ij) -- like HiResCAM (Draelos & Carin 2020), but each
element-wise product is rectified before the channel sum, so negative evidence in one channel
cannot cancel positive evidence in another. The final ReLU, upsampling and normalisation are
applied by `camrt.postprocess`.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..hookspecs import hookimpl
from .base import GraphOutputs, Method, Requirements


class GradCAMElementWise(Method):
    """Grad-CAM element-wise: rectified gradient x activation, summed over channels (pytorch-grad-cam)."""

    name = "gradcam-elementwise"
    aliases = ("gradcamelementwise", "grad-cam-elementwise")
    requires = Requirements(activations=True, gradients=True)

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        if layer is None:
            raise UsageError(f"method {self.name!r} needs a layer")
        product = outputs.gradient(layer) * outputs.activation(layer)
        return np.maximum(product, 0).sum(axis=1, dtype=np.float32)


@hookimpl
def register_methods(register):
    register(GradCAMElementWise)
