"""Smooth Grad-CAM++.

Omeiza, Speakman, Cintas, Weldemariam, "Smooth Grad-CAM++: An Enhanced Inference Level
Visualization Technique for Deep Convolutional Neural Network Models", arXiv:1908.01224 (2019),
sec. 3: Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19; camrt.methods.gradcam_plusplus) with the
derivatives averaged over noisy copies of the input, as SmoothGrad averages input gradients:

    D^p_ij = 1/n sum_{m=1..n} (dS^c/dA^k_ij at X + eps_m)^p,   eps_m ~ N(0, sigma^2),  p = 1, 2, 3
    alpha^kc_ij = D^2_ij / (2 D^2_ij + sum_ab A^k_ab D^3_ij)
    w^c_k = sum_ij alpha^kc_ij ReLU(D^1_ij),   L^c = ReLU(sum_k w^c_k A^k)

A^k are the activations of the clean input; the target c is the one explained for the clean input
(a seeded target's L is differentiated at each noisy copy as in camrt.methods.smoothgrad).
eps = 1e-6 and alpha := 0 where D^2 = 0, as camrt's Grad-CAM++ (so with sigma = 0 the method is
Grad-CAM++ exactly). The paper prints the averaged first derivative in alpha's numerator; camrt,
like torchcam, uses D^2, the Grad-CAM++ closed form the paper averages (with D^1 the method would
not reduce to Grad-CAM++ without noise).

Differences from torchcam 0.5's SmoothGradCAMpp (whose defaults, n_samples=4 and std=0.3 on the
model input, camrt takes), where camrt follows the paper: torchcam's denominator term is
sum_ab A^k_ab D^3_ab (one value per channel) instead of sum_ab A^k_ab * D^3_ij; it weights
alpha by ReLU of the last noisy copy's gradient instead of ReLU(D^1); it combines the last noisy
copy's activations instead of the clean input's; and its eps is 1e-8. The test reproduces both
formulas from torchcam's own noisy passes fed camrt's noise (tests/exporters/test_perturbation_methods.py).

Randomness: ``numpy.random.default_rng(seed).standard_normal`` (float32) times `std`, drawn
sample by sample, copy by copy, each of the model input's shape [C, H, W] (as camrt's SmoothGrad).
Gradient passes run `batch_size` noisy copies at a time. Option eigen_smooth as for Grad-CAM++.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import contract
from ..hookspecs import hookimpl
from .base import BatchedCAMOptions, GraphOutputs, Requirements, check_sampling
from .gradcam_plusplus import GradCAMPlusPlus, plusplus_weights


class SmoothGradCAMPlusPlus(GradCAMPlusPlus):
    """Smooth Grad-CAM++: Grad-CAM++ weights from derivatives averaged over noisy inputs (Omeiza et al. 2019)."""

    name = "smooth-gradcam++"
    aliases = ("smoothgradcampp", "smooth-grad-cam++")
    requires = Requirements(activations=True, gradients=True, extra_passes=True)
    scores_seeded_targets = True

    @dataclass(frozen=True)
    class Options(BatchedCAMOptions):
        """n_samples noisy inputs, noise std (absolute, on the model input), numpy seed, batch_size
        noisy inputs per pass; eigen_smooth as Grad-CAM++."""

        n_samples: int = 4
        std: float = 0.3
        seed: int = 0
        batch_size: int = 16

        def __post_init__(self):
            super().__post_init__()
            check_sampling(self.n_samples, std=self.std)

    def layer_weights(self, outputs: GraphOutputs, layer: str) -> np.ndarray:
        context = outputs.require_context(self.name)
        opts = self.options
        x = outputs.inputs
        activations = outputs.activation(layer)
        name = contract.gradient_output(layer)
        rng = np.random.default_rng(opts.seed)
        moments = np.zeros((3, *activations.shape), dtype=np.float64)  # sums of g, g^2, g^3
        for b in range(x.shape[0]):
            for start in range(0, opts.n_samples, opts.batch_size):
                count = min(opts.batch_size, opts.n_samples - start)
                noise = rng.standard_normal((count, *x.shape[1:]), dtype=np.float32) * np.float32(opts.std)
                grads = context.target_gradients(x[b][None] + noise, b, [name])[name]
                grads2 = grads * grads
                for p, power in enumerate((grads, grads2, grads2 * grads)):
                    moments[p, b] += power.sum(axis=0, dtype=np.float64)
        first, second, third = (m / opts.n_samples for m in moments)
        return plusplus_weights(activations, first, second, third)


@hookimpl
def register_methods(register):
    register(SmoothGradCAMPlusPlus)
