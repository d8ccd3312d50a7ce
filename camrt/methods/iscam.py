"""IS-CAM (Integrated Score-CAM).

Naidu, Ghosh, Maurya, Nayak K, Kundu, "IS-CAM: Integrated Score-CAM for axiomatic-based
explanations", arXiv:2010.03023 (2020), Algorithm 1: Score-CAM's confidence of each channel is
integrated along a path of scaled masks, as integrated gradients integrates along scaled inputs:

    H^k = s(Up(A^k))                                   (Score-CAM's mask, camrt.methods.scorecam)
    M_i = M_{i-1} + (i/N) H^k,  M_0 = 0               (i = 1..N: M_i = c_i H^k, c_i = i(i+1)/(2N))
    C(A^k) = 1/N sum_{i=1..N} f^c(X o M_i) - f^c(X_b)
    alpha_k^c = softmax_k(C(A^k)),   L^c = ReLU(sum_k alpha_k^c A^k)

The mask accumulates (M_i = M_{i-1} + (i/N) H^k), so the coefficients c_i grow past 1 (up to
(N+1)/2): not the straight path t H^k, t in [0, 1], that "integration" suggests. camrt keeps the
algorithm's schedule, which torchcam 0.5's ISCAM implements too (coefficients 1/N, 3/N, 6/N, ...).
The baseline term cancels in the channel softmax, as in Score-CAM.

Difference from torchcam's ISCAM (default n_samples=10, as here): torchcam min-max normalises A^k
before upsampling (camrt: s(Up(A^k)), as Score-CAM's paper) and keeps constant channels (camrt
skips them). With the masks made the same way the maps agree within 1e-4
(tests/exporters/test_perturbation_methods.py). Deterministic: no seed.

Cost: N forward passes per non-constant channel and sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hookspecs import hookimpl
from .base import BatchedCAMOptions, check_sampling
from .scorecam import ScoreWeightedMethod


def path_coefficients(steps: int) -> np.ndarray:
    """c_i = sum_{j=1..i} j/N for i = 1..N (float64)."""
    return np.cumsum(np.arange(1, steps + 1, dtype=np.float64) / steps)


class ISCAM(ScoreWeightedMethod):
    """IS-CAM: Score-CAM weights integrated over scaled copies of each mask (Naidu et al. 2020)."""

    name = "iscam"
    aliases = ("is-cam",)

    @dataclass(frozen=True)
    class Options(BatchedCAMOptions):
        """n_samples integration steps; batch_size masked inputs per pass; eigen_smooth as Score-CAM."""

        n_samples: int = 10

        def __post_init__(self):
            super().__post_init__()
            check_sampling(self.n_samples)

    def samples(self) -> int:
        return self.options.n_samples

    def perturb(self, masks: np.ndarray, index: int, rng: np.random.Generator | None) -> np.ndarray:
        return masks * np.float32(path_coefficients(self.options.n_samples)[index])


@hookimpl
def register_methods(register):
    register(ISCAM)
