"""Score-CAM, and the score-weighting machinery SS-CAM and IS-CAM share (`ScoreWeightedMethod`).

Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, "Score-CAM: Score-Weighted Visual Explanations for
Convolutional Neural Networks", CVPR Workshops 2020 (arXiv:1910.01279), sec. 3 and Algorithm 1:

    H^k = s(Up(A^k))                       (Up: bilinear upsampling to the input size,
                                            s: min-max normalisation to [0, 1])
    C(A^k) = f^c(X o H^k) - f^c(X_b)       (eq. 5: the increase of confidence, f^c the logit)
    alpha_k^c = exp(C(A^k)) / sum_k' exp(C(A^k'))   (Algorithm 1: softmax over the channels)
    L^c = ReLU(sum_k alpha_k^c A^k)        (eq. 6)

camrt follows the paper's Algorithm 1. The baseline term f^c(X_b) is the same for every channel,
so the channel softmax removes it: alpha = softmax_k(f^c(X o H^k)), and no baseline pass is run.
Where implementations disagree:
- the authors' code (haofanwang/Score-CAM) weights by the class probability softmax_c(f(X o H^k))_c
  (a softmax over classes) with no channel softmax: not the paper's Algorithm 1;
- pytorch-grad-cam 1.5.7 uses the same weights as camrt (softmax over channels of the target
  logits) but upsamples with align_corners=True (UpsamplingBilinear2d);
- torchcam 0.5 also reduces to softmax_k(f^c(M_k)) (it subtracts the unmasked input's logit, a
  constant) but normalises A^k before upsampling (s(Up(A^k)) != Up(s(A^k)): bilinear upsampling
  does not reach the low-resolution extremes), in Score-CAM, SS-CAM and IS-CAM alike.
camrt's masks are the paper's s(Up(A^k)) with pixel-centre bilinear upsampling (cv2 INTER_LINEAR,
= torch ``interpolate(..., align_corners=False)`` as in the authors' code); the weights match
pytorch-grad-cam's and torchcam's formula. Channels that are constant have no mask (s is
undefined): as in the authors' code they are skipped (weight 0, left out of the softmax).
The ReLU of eq. 6, upsampling and normalisation of the map are `camrt.postprocess`'s.

`ScoreWeightedMethod` is that pipeline with one variation point, `masked_inputs` (by default
X o `perturb`(H^k)): SS-CAM (camrt.methods.sscam) and IS-CAM (camrt.methods.iscam) score each mask
over `n_samples` perturbed copies (noisy masks or noisy masked inputs; scaled masks) and average the
target logits before the softmax.

Cost: one forward pass per non-constant channel, sample and perturbation, run `batch_size` masked
inputs at a time (at most `batch_size` masked inputs are held at once).

Opt-in approximation for Score-CAM, option `top_channels` = N > 0: only the N channels of largest
activation variance are scored (the others get weight 0 and stay out of the softmax): N passes
instead of K. This is "Faster Score-CAM" (tabayashi0117/Score-CAM README; tf-keras-vis
`Scorecam(max_N=...)`), not the paper's algorithm; bench/run.py reports its distance to the exact
map next to its speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hookspecs import hookimpl
from ..postprocess import upsample
from .base import BatchedCAMOptions, ChannelWeightingMethod, GraphOutputs, Requirements


def score_masks(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H^k = s(Up(A^k)) for non-constant channels [n, h, w] -> [n, H, W] float32 in [0, 1]."""
    masks = upsample(activations, size)
    low = masks.min(axis=(1, 2), keepdims=True)
    high = masks.max(axis=(1, 2), keepdims=True)
    return (masks - low) / (high - low)


@dataclass(frozen=True)
class ScoreCAMOptions(BatchedCAMOptions):
    """top_channels: score only the N channels of largest activation variance (0: all, the exact
    method); batch_size masked inputs per pass; eigen_smooth as Grad-CAM's."""

    top_channels: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.top_channels < 0:
            raise ValueError(f"top_channels must be >= 0 (0: all channels), got {self.top_channels}")


def highest_variance_channels(flat: np.ndarray, live: np.ndarray, top: int) -> np.ndarray:
    """The `top` channels of `live` whose activations [K, h*w] vary most (all of `live` when top is 0)."""
    if top == 0 or top >= live.size:
        return live
    variance = flat[live].var(axis=1)
    return np.sort(live[np.argsort(-variance, kind="stable")[:top]])


class ScoreWeightedMethod(ChannelWeightingMethod):
    """The Score-CAM family: alpha = softmax over channels of the mean target logit of the input
    masked by each channel's perturbed masks; map = sum_k alpha_k A^k.

    Subclasses set `n_samples` (perturbations per mask; an option or a constant) and implement
    `perturb`. For each sample, perturbation i = 0..n_samples-1 runs over the live channels in
    chunks of `batch_size`, in that order (so a seeded noise stream does not depend on batch_size).
    """

    requires = Requirements(activations=True, extra_passes=True)
    scores_seeded_targets = True  # its masked passes score the target through ExplainContext.target_scores

    def samples(self) -> int:
        """Perturbations per mask."""
        return 1

    def perturb(self, masks: np.ndarray, index: int, rng: np.random.Generator | None) -> np.ndarray:
        """The `index`-th perturbation of masks [n, H, W] (the identity for Score-CAM)."""
        return masks

    def masked_inputs(self, image: np.ndarray, masks: np.ndarray, index: int,
                      rng: np.random.Generator | None) -> np.ndarray:
        """The `index`-th perturbed masked inputs [n, C, H, W] of one image [C, H, W]: X o perturb(H^k)."""
        return image[None] * self.perturb(masks, index, rng)[:, None]

    def channels_to_score(self, flat: np.ndarray, live: np.ndarray) -> np.ndarray:
        """Which of the non-constant channels `live` (activations `flat` [K, h*w]) get a pass: all."""
        return live

    def rng(self) -> np.random.Generator | None:
        """The random stream of one call (None for deterministic perturbations)."""
        return None

    def layer_weights(self, outputs: GraphOutputs, layer: str) -> np.ndarray:
        """alpha [B, K] (float64)."""
        context = outputs.require_context(self.name)
        acts = outputs.activation(layer).astype(np.float32, copy=False)
        x = outputs.inputs
        batch, channels = acts.shape[:2]
        size = x.shape[2:]
        step = self.options.batch_size
        samples = self.samples()
        rng = self.rng()
        alpha = np.zeros((batch, channels), dtype=np.float64)
        for b in range(batch):
            flat = acts[b].reshape(channels, -1)
            live = np.flatnonzero(flat.max(axis=1) > flat.min(axis=1))  # constant channels have no mask
            live = self.channels_to_score(flat, live)
            scores = np.zeros(live.size, dtype=np.float64)
            for index in range(samples):
                for start in range(0, live.size, step):
                    chosen = live[start:start + step]
                    logits = context.forward(self.masked_inputs(x[b], score_masks(acts[b, chosen], size), index, rng))
                    scores[start:start + chosen.size] += context.target_scores(logits, b)
            if live.size:
                scores /= samples
                shifted = np.exp(scores - scores.max())
                alpha[b, live] = shifted / shifted.sum()
        return alpha


class ScoreCAM(ScoreWeightedMethod):
    """Score-CAM: channels weighted by the softmax over channels of the target logit of the input masked by each channel (Wang et al. 2020)."""

    name = "scorecam"
    aliases = ("score-cam",)

    Options = ScoreCAMOptions

    def channels_to_score(self, flat: np.ndarray, live: np.ndarray) -> np.ndarray:
        return highest_variance_channels(flat, live, self.options.top_channels)


@hookimpl
def register_methods(register):
    register(ScoreCAM)
