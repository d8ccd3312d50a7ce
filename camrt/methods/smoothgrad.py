"""SmoothGrad.

Smilkov, Thorat, Kim, Viegas, Wattenberg, "SmoothGrad: removing noise by adding noise",
arXiv:1706.03825 (2017), sec. 3, eq. for M_hat:

    M_hat_c(x) = 1/n sum_{i=1..n} M_c(x + N(0, sigma^2)),    M_c(x) = d S_c / d x

with sigma = stdev_spread * (x_max - x_min) (the paper's noise level, 10-20% recommended), the
range taken over each sample's model input. The target class c is the one explained for the clean
input (the noisy copies do not pick their own top-1). A seeded target (camrt.seeds.targets) is
differentiated likewise: S is its L, its parameters (a segmentation region) resolved on the clean
input, its seed made from each noisy copy's own score (the cosine's gradient at the noisy
embedding, the box matched again; a fixed region's seed is the same for every copy), as Captum's
NoiseTunnel differentiates a forward function returning that L (`ExplainContext.target_gradients`).
The attribution is the signed mean gradient
(Captum's ``NoiseTunnel(Saliency)`` with ``nt_type="smoothgrad"``, ``abs=False``); its map is
max_channel |M_hat| like the other input-space methods (`channel_max_abs`).

The noise is ``numpy.random.default_rng(seed).standard_normal`` (float32), drawn sample by sample,
copy by copy, in order, times that sample's sigma: a fixed seed gives the same maps every run.
Gradient passes run `batch_size` noisy copies at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import contract
from ..hookspecs import hookimpl
from .base import GraphOutputs, InputGradientMethod, Requirements, check_sampling


def noise_sigma(x: np.ndarray, stdev_spread: float) -> np.ndarray:
    """sigma per sample [B]: stdev_spread * (max - min) of each sample's input."""
    flat = x.reshape(x.shape[0], -1)
    return (stdev_spread * (flat.max(axis=1) - flat.min(axis=1))).astype(np.float32)


class SmoothGrad(InputGradientMethod):
    """SmoothGrad: the input gradient averaged over noisy copies of the input (Smilkov et al. 2017)."""

    name = "smoothgrad"
    aliases = ("smooth-grad",)
    requires = Requirements(input_gradient=contract.RULE_VANILLA, extra_passes=True)
    scores_seeded_targets = True

    @dataclass(frozen=True)
    class Options:
        """n_samples noisy copies, noise std = stdev_spread * (max - min) of the input, numpy seed."""

        n_samples: int = 50
        stdev_spread: float = 0.15
        seed: int = 0
        batch_size: int = 16

        def __post_init__(self):
            check_sampling(self.n_samples, stdev_spread=self.stdev_spread)
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def attribution(self, outputs: GraphOutputs, *, layer: str | None = None) -> np.ndarray:
        context = outputs.require_context(self.name)
        x = outputs.inputs
        opts = self.options
        sigma = noise_sigma(x, opts.stdev_spread)
        rng = np.random.default_rng(opts.seed)
        name = contract.input_gradient_output(contract.RULE_VANILLA)
        total = np.zeros(x.shape, dtype=np.float64)
        for b in range(x.shape[0]):
            for start in range(0, opts.n_samples, opts.batch_size):
                count = min(opts.batch_size, opts.n_samples - start)
                noise = rng.standard_normal((count, *x.shape[1:]), dtype=np.float32) * sigma[b]
                grads = context.target_gradients(x[b][None] + noise, b, [name])[name]
                total[b] += grads.sum(axis=0, dtype=np.float64)
        return (total / opts.n_samples).astype(np.float32)


@hookimpl
def register_methods(register):
    register(SmoothGrad)
