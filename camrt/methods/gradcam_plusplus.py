"""Grad-CAM++.

Chattopadhyay, Sarkar, Howlader, Balasubramanian, "Grad-CAM++: Generalized Gradient-Based Visual
Explanations for Deep Convolutional Networks", WACV 2018 (arXiv:1710.11063).

Eq. 19 (the closed form for Y^c = exp(S^c), with g = dS^c/dA^k_ij the gradient of the pre-softmax
score, so that the 2nd and 3rd derivatives become g^2 and g^3):

    alpha^kc_ij = g^2 / (2 g^2 + sum_ab A^k_ab * g^3)
    w^c_k = sum_ij alpha^kc_ij * ReLU(g)          (eq. 7; the global exp(S^c) factor drops out)

As in pytorch-grad-cam's GradCAMPlusPlus (which camrt matches): eps = 1e-6 in the denominator,
and alpha := 0 where g == 0. The powers of g stand in for the true higher derivatives only under
the exp-output assumption (for a ReLU network the Hessian of the logit is zero); see
pytorch-grad-cam issues #369/#541/#557. The ReLU of L^c, upsampling and normalisation are applied
by `camrt.postprocess`. `plusplus_weights` takes the three derivative terms separately, so that
Smooth Grad-CAM++ (camrt.methods.smooth_gradcam_plusplus) can pass their averages over noisy inputs.
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import ActivationWeightingMethod

EPS = 1e-6


def plusplus_weights(activations: np.ndarray, first: np.ndarray, second: np.ndarray, third: np.ndarray) -> np.ndarray:
    """Eq. 19 and 7: w_k = sum_ij alpha_ij ReLU(first), alpha = second / (2 second + sum_ab A_ab third + eps),
    alpha := 0 where second == 0 (where the gradient is 0). All [B, K, h, w]; returns [B, K] float32."""
    second = second.astype(np.float32, copy=False)
    sum_activations = activations.sum(axis=(2, 3), dtype=np.float32, keepdims=True)
    alpha = second / (2 * second + sum_activations * third.astype(np.float32, copy=False) + np.float32(EPS))
    alpha = np.where(second != 0, alpha, np.float32(0))
    return (np.maximum(first.astype(np.float32, copy=False), 0) * alpha).sum(axis=(2, 3), dtype=np.float32)


class GradCAMPlusPlus(ActivationWeightingMethod):
    """Grad-CAM++: channels weighted by alpha-weighted positive gradients (Chattopadhyay et al. 2018, eq. 19)."""

    name = "gradcam++"
    aliases = ("gradcampp", "grad-cam++")

    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        grads = gradients.astype(np.float32, copy=False)
        grads2 = grads * grads
        return plusplus_weights(activations, grads, grads2, grads2 * grads)


@hookimpl
def register_methods(register):
    register(GradCAMPlusPlus)
