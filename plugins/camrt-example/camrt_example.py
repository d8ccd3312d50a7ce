"""camrt-example: the reference third-party plugin, one toy method.

Max-Grad-CAM is a TOY made up for this example, not a published method: it is Grad-CAM
(Selvaraju et al. 2017, eq. 1) with the spatial mean of each channel's gradient replaced by its
spatial maximum. It exists to show the plugin path end to end; use it to copy from, not to
explain models.

    alpha_k = max_ij d y^c / d A^k_ij;   map = sum_k alpha_k A^k

ReLU, upsampling and normalisation are applied by camrt after `explain`, as for every method.
"""

from __future__ import annotations

import numpy as np

import camrt


class MaxGradCAM(camrt.ActivationWeightingMethod):
    """Toy Grad-CAM variant: channels weighted by the spatial max of their gradients (example plugin)."""

    name = "max-gradcam"
    aliases = ("maxgradcam",)
    # requires = Requirements(activations=True, gradients=True), inherited from the CAM family.

    def weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return gradients.max(axis=(2, 3)).astype(np.float32, copy=False)


@camrt.hookimpl
def register_methods(register):
    register(MaxGradCAM)
