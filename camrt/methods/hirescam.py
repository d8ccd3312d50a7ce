"""HiResCAM.

Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional
neural networks", arXiv:2011.08891 (2020).

The paper's definition: L^c_ij = sum_k (dS^c / dA^k_ij) * A^k_ij -- the gradient is multiplied
element-wise with the activations instead of being averaged over space first, then summed over
the channels. On a GAP + linear head the gradient is constant over space, so HiResCAM equals CAM
and Grad-CAM. The ReLU (as in pytorch-grad-cam's HiResCAM), upsampling and normalisation are
applied by `camrt.postprocess`.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..hookspecs import hookimpl
from .base import GraphOutputs, Method, Requirements


class HiResCAM(Method):
    """HiResCAM: element-wise gradient x activation, summed over channels (Draelos & Carin 2020)."""

    name = "hirescam"
    aliases = ("hires-cam",)
    requires = Requirements(activations=True, gradients=True)

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        if layer is None:
            raise UsageError(f"method {self.name!r} needs a layer")
        product = outputs.gradient(layer) * outputs.activation(layer)
        return product.sum(axis=1, dtype=np.float32)


@hookimpl
def register_methods(register):
    register(HiResCAM)
