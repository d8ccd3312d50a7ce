"""SS-CAM (Smoothed Score-CAM).

Wang, Naidu, Michael, Kundu, "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
arXiv:2006.14255 (2020), Algorithm 1 (smoothing the feature maps, "SS-CAM(1)"):

    H^k = s(Up(A^k))                                   (Score-CAM's mask, camrt.methods.scorecam)
    C(A^k) = 1/N sum_{i=1..N} f^c(X o (H^k + delta_i)) - f^c(X_b),   delta_i ~ N(0, sigma^2)
    alpha_k^c = softmax_k(C(A^k)),   L^c = ReLU(sum_k alpha_k^c A^k)

A SmoothGrad-style average over noisy copies of each mask, on top of Score-CAM. The baseline term
cancels in the channel softmax, as in Score-CAM. Option noise="mask" (the default) is this
feature-map smoothing, the variant torchcam implements. noise="input" is the paper's second
variant ("SS-CAM(2)"), smoothing the input: the noise is added to the masked input instead,

    C(A^k) = 1/N sum_{i=1..N} f^c(X o H^k + delta_i) - f^c(X_b),   delta_i ~ N(0, sigma^2) of X's shape

as the SSCAM2 class of public SS-CAM code built on the Score-CAM authors' code base computes its
scores (that code also rescales sigma by the masked input's range, draws with standard deviation
sigma^2 and weights by class probability without the channel softmax, as that Score-CAM code
does; camrt keeps `std` as given and Score-CAM's Algorithm 1 weighting). Checked against the
formula above written in torch.

Randomness: ``numpy.random.default_rng(seed).standard_normal`` (float32) times `std`, drawn sample
by sample, noise copy by copy (i = 1..N), non-constant channel by channel, each a [H, W] map at the
input resolution (noise="input": a [C, H, W] array), in chunks of `batch_size` channels that
continue one stream: a fixed seed gives the same maps whatever `batch_size`.

Differences from torchcam 0.5's SSCAM (whose defaults, n_samples=35 and std=2.0, camrt takes):
torchcam min-max normalises A^k before upsampling (camrt: the paper's s(Up(A^k))), and gives
constant channels the mask 0 + noise (camrt skips them, as its Score-CAM does). With the masks made
the paper's way and the same noise, the maps agree within 1e-4 (tests/exporters/test_perturbation_methods.py).

Cost: N forward passes per non-constant channel and sample (35 x 512 for a ResNet layer4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hookspecs import hookimpl
from .base import BatchedCAMOptions, check_sampling
from .scorecam import ScoreWeightedMethod


class SSCAM(ScoreWeightedMethod):
    """SS-CAM: Score-CAM weights averaged over noisy copies of each mask (Wang, Naidu et al. 2020)."""

    name = "sscam"
    aliases = ("ss-cam",)

    @dataclass(frozen=True)
    class Options(BatchedCAMOptions):
        """n_samples noisy copies of each mask, noise std, numpy seed; noise "mask" (on the masks, in
        [0, 1]) or "input" (on the masked input, at the model input's scale); batch_size masked inputs
        per pass; eigen_smooth as Score-CAM."""

        n_samples: int = 35
        std: float = 2.0
        seed: int = 0
        noise: str = "mask"

        def __post_init__(self):
            super().__post_init__()
            check_sampling(self.n_samples, std=self.std)
            if self.noise not in ("mask", "input"):
                raise ValueError(f"noise must be 'mask' or 'input', got {self.noise!r}")

    def samples(self) -> int:
        return self.options.n_samples

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.options.seed)

    def perturb(self, masks: np.ndarray, index: int, rng: np.random.Generator | None) -> np.ndarray:
        return masks + rng.standard_normal(masks.shape, dtype=np.float32) * np.float32(self.options.std)

    def masked_inputs(self, image: np.ndarray, masks: np.ndarray, index: int,
                      rng: np.random.Generator | None) -> np.ndarray:
        if self.options.noise == "mask":
            return super().masked_inputs(image, masks, index, rng)
        masked = image[None] * masks[:, None]
        return masked + rng.standard_normal(masked.shape, dtype=np.float32) * np.float32(self.options.std)


@hookimpl
def register_methods(register):
    register(SSCAM)
