"""FullGrad.

Srinivas, Fleuret, "Full-Gradient Representation for Neural Network Visualization", NeurIPS 2019
(arXiv:1905.00780). The full-gradient decomposition f(x) = grad_x f(x)^T x + sum_b grad_b f(x)^T b
(sec. 3, for piecewise-linear networks) and the FullGrad saliency map built from it (sec. 4):

    S_f(x) = psi(grad_x f(x) ⊙ x) + sum_{l in L} sum_{c in c_l} psi(grad_b f(x) ⊙ b)_c

with psi = absolute value, min-max rescaling of each map, then bilinear upsampling to the input size,
as pytorch-grad-cam 1.5.7's ``FullGrad`` computes it (camrt matches it):
- the bias terms are those of every Conv (with a bias) and BatchNormalization node, as
  pytorch-grad-cam takes every ``Conv2d`` with a bias and every ``BatchNorm2d``; a BatchNorm's
  bias is its effective bias beta - mean * gamma / sqrt(var + eps). The exporter's ``--fullgrad``
  keeps BatchNormalization nodes unfused and puts d f / d (node output) * b in
  ``camrt/bias_grad/<node>`` (an all-zero bias, which torch exports for a Conv2d without one, adds
  psi(0) = 0 and is left out);
- grad_x f ⊙ x is one map per colour channel, each |.| and rescaled; each bias term is |.| and
  rescaled per channel, upsampled, and summed over its channels; all maps are summed, and the sum
  is rescaled once (by `camrt.postprocess`, which applies no ReLU: the sum is >= 0).
Upsampling is linear, so each resolution's rescaled channel maps are summed first and upsampled
once (the same sum up to float32 rounding, without holding every upsampled channel).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .. import contract, postprocess
from ..hookspecs import hookimpl
from .base import GraphOutputs, Method, Requirements


class FullGrad(Method):
    """FullGrad: rescaled |input-gradient x input| plus rescaled |bias-gradient x bias| of every Conv/BatchNorm (Srinivas & Fleuret 2019)."""

    name = "fullgrad"
    aliases = ("full-grad",)
    requires = Requirements(input_gradient=contract.RULE_VANILLA, bias_gradients=True)
    relu: ClassVar[bool] = False

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        x = outputs.inputs
        size = x.shape[2:]
        input_term = np.abs(outputs.input_gradient(contract.RULE_VANILLA) * x)
        total = postprocess.normalize(input_term).sum(axis=1, dtype=np.float32)
        by_resolution: dict[tuple[int, int], np.ndarray] = {}
        for term in outputs.bias_gradients():
            channel_sum = postprocess.normalize(np.abs(term)).sum(axis=1, dtype=np.float32)
            key = channel_sum.shape[1:]
            by_resolution[key] = channel_sum if key not in by_resolution else by_resolution[key] + channel_sum
        for maps in by_resolution.values():
            total += postprocess.upsample(maps, size)
        return total


@hookimpl
def register_methods(register):
    register(FullGrad)
