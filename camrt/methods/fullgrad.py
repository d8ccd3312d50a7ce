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
  is rescaled once (by `camrt.postprocess`, which applies no ReLU: the sum is >= 0). Bilinear
  resizing is linear, so a term's rescaled channel maps are summed before it is upsampled (the same
  sum up to float32 rounding, without holding every upsampled channel).
Option eigen_smooth (pytorch-grad-cam's): the 3 + L maps are rescaled again, resized to 1/8 of the
input size, projected on their first principal component (`camrt.methods.projection`), and that
one map is rescaled and resized back.
The explainer's aug_smooth applies as to the CAM family (pytorch-grad-cam's FullGrad takes it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import contract, postprocess
from ..hookspecs import hookimpl
from .base import GraphOutputs, Method, Requirements
from .projection import first_principal_component

#: pytorch-grad-cam's eigen_smooth works at 1/8 of the input size ("this method typically has a very
#: large number of channels").
EIGEN_SMOOTH_DOWNSCALE = 8


def _rescale_and_resize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """psi's rescaling and resizing of each map of [B, M, h, w] (pytorch-grad-cam's
    ``scale_accross_batch_and_channels``) -> [B, M, H, W]."""
    batch, count = maps.shape[:2]
    flat = postprocess.normalize(maps.reshape(batch * count, *maps.shape[2:]))
    return postprocess.upsample(flat, size).reshape(batch, count, *size)


class FullGrad(Method):
    """FullGrad: rescaled |input-gradient x input| plus rescaled |bias-gradient x bias| of every Conv/BatchNorm (Srinivas & Fleuret 2019)."""

    name = "fullgrad"
    aliases = ("full-grad",)
    requires = Requirements(input_gradient=contract.RULE_VANILLA, bias_gradients=True)
    relu: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        """eigen_smooth: the first principal component of the 3 + L maps instead of their sum."""

        eigen_smooth: bool = False

    @classmethod
    def takes_aug_smooth(cls) -> bool:
        return True  # pytorch-grad-cam's FullGrad is one of its CAMs and takes aug_smooth

    def layer_maps(self, outputs: GraphOutputs) -> np.ndarray:
        """[B, 3 + L, H, W]: psi of grad_x ⊙ x per colour channel, then of each bias term summed over its channels."""
        x = outputs.inputs
        size = x.shape[2:]
        maps = [_rescale_and_resize(np.abs(outputs.input_gradient(contract.RULE_VANILLA) * x), size)]
        for term in outputs.bias_gradients():
            channel_sum = postprocess.normalize(np.abs(term)).sum(axis=1, dtype=np.float32)
            maps.append(postprocess.upsample(channel_sum, size)[:, None])
        return np.concatenate(maps, axis=1)

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        maps = self.layer_maps(outputs)
        if not self.options.eigen_smooth:
            return maps.sum(axis=1, dtype=np.float32)
        size = maps.shape[2:]
        small = (size[0] // EIGEN_SMOOTH_DOWNSCALE, size[1] // EIGEN_SMOOTH_DOWNSCALE)
        projected = first_principal_component(_rescale_and_resize(maps, small))
        return _rescale_and_resize(projected[:, None], size)[:, 0]


@hookimpl
def register_methods(register):
    register(FullGrad)
