"""Deletion and insertion AUC.

Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models",
BMVC 2018, sec. 4.1 ("Evaluation metrics"): pixels are ranked by the heatmap, most important
first. *Deletion* replaces them, a step at a time, with a baseline and records the class score;
a good map makes it fall fast (lower AUC is better). *Insertion* starts from the baseline and puts
the original pixels back in the same order; a good map makes the score rise fast (higher is better).
The paper deletes to zeros and inserts into a blurred copy of the image.

camrt follows torchcam 0.5's ``DeletionInsertionMetric`` exactly: positions ranked by a stable
descending sort of the map (ties keep raster order), one mask for all channels, ``steps``
intervals of ``ceil(H*W / steps)`` positions (the last one shorter), and the area under the score
curve by the trapezoidal rule against the perturbed fraction (0 to 1). The baseline is in the
model's input space (after normalisation): ``zeros`` (RISE's deletion, torchcam's default), ``blur``
(a Gaussian blur of the input, RISE's insertion: kernel 11, sigma 5) or ``mean`` (each channel's
mean over the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hookspecs import hookimpl
from .base import HIGHER, LOWER, EvalBatch, Metric

BASELINES = ("zeros", "blur", "mean")


@dataclass(frozen=True)
class CurveOptions:
    """steps: perturbation intervals; baseline: zeros, blur or mean; blur_kernel / blur_sigma: the
    Gaussian of the blur baseline."""

    steps: int = 20
    baseline: str = "zeros"
    blur_kernel: int = 11
    blur_sigma: float = 5.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be an odd number >= 1, got {self.blur_kernel}")


def baseline_inputs(inputs: np.ndarray, options: CurveOptions) -> np.ndarray:
    """The fully perturbed inputs [B, C, H, W] for `options.baseline`."""
    if options.baseline == "zeros":
        return np.zeros_like(inputs)
    if options.baseline == "mean":
        return np.broadcast_to(inputs.mean(axis=(2, 3), keepdims=True), inputs.shape).astype(np.float32)
    import cv2

    k = options.blur_kernel
    return np.stack([
        np.stack([cv2.GaussianBlur(channel, (k, k), options.blur_sigma) for channel in image]) for image in inputs
    ]).astype(np.float32)


def perturbation_counts(positions: int, steps: int) -> list[int]:
    """Numbers of perturbed positions at each point of the curve: 0, s, 2s, ..., positions."""
    step = -(-positions // steps)
    return [*range(0, positions, step), positions]


def score_curves(batch: EvalBatch, options: CurveOptions, insertion: bool) -> tuple[np.ndarray, np.ndarray]:
    """(fractions [P], scores [B, P]): the target score as the top-ranked positions are deleted
    (replaced by the baseline) or, for insertion, restored from the image into the baseline."""
    b, c, h, w = batch.inputs.shape
    counts = perturbation_counts(h * w, options.steps)
    order = np.argsort(-batch.heatmaps.reshape(b, -1), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(h * w)[None].repeat(b, 0), axis=1)
    original = batch.inputs.reshape(b, c, -1)
    baseline = baseline_inputs(batch.inputs, options).reshape(b, c, -1)
    scores = np.empty((b, len(counts)), dtype=np.float64)
    known = len(counts) - 1 if insertion else 0  # the unperturbed end needs no pass
    scores[:, known] = batch.clean_scores()
    jobs = [(i, p) for i in range(b) for p in range(len(counts)) if p != known]
    for start in range(0, len(jobs), batch.batch_size):
        chunk = jobs[start:start + batch.batch_size]
        rows = np.array([i for i, _ in chunk])
        counts_now = np.array([counts[p] for _, p in chunk])
        top = ranks[rows] < counts_now[:, None]  # [n, H*W]: the positions perturbed so far
        from_image = top if insertion else ~top
        perturbed = np.where(from_image[:, None, :], original[rows], baseline[rows]).reshape(-1, c, h, w)
        values = batch.target_scores(perturbed, rows)
        for (i, p), value in zip(chunk, values):
            scores[i, p] = value
    return np.asarray(counts, dtype=np.float64) / (h * w), scores


def _curve_records(kind: str, fractions: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    areas = ((scores[:, 1:] + scores[:, :-1]) / 2 * np.diff(fractions)).sum(axis=1)  # the trapezoidal rule
    return [{f"{kind}_auc": float(area), f"{kind}_curve": {"fraction": fractions.tolist(), "score": row.tolist()}}
            for area, row in zip(areas, scores)]


class DeletionAUC(Metric):
    """Deletion AUC (Petsiuk et al., RISE, BMVC 2018): the score as top-ranked pixels are replaced by a baseline; lower is better."""

    name = "deletion"
    aliases = ("deletion-auc",)
    fields = {"deletion_auc": LOWER}
    Options = CurveOptions

    def evaluate(self, batch: EvalBatch) -> list[dict[str, Any]]:
        return _curve_records("deletion", *score_curves(batch, self.options, insertion=False))


@dataclass(frozen=True)
class InsertionOptions(CurveOptions):
    """steps: perturbation intervals; baseline: zeros, blur or mean (RISE inserts into a blurred
    image); blur_kernel / blur_sigma: the Gaussian of the blur baseline."""

    baseline: str = "blur"


class InsertionAUC(Metric):
    """Insertion AUC (Petsiuk et al., RISE, BMVC 2018): the score as top-ranked pixels are restored into a baseline; higher is better."""

    name = "insertion"
    aliases = ("insertion-auc",)
    fields = {"insertion_auc": HIGHER}
    Options = InsertionOptions

    def evaluate(self, batch: EvalBatch) -> list[dict[str, Any]]:
        return _curve_records("insertion", *score_curves(batch, self.options, insertion=True))


@hookimpl
def register_metrics(register):
    register(DeletionAUC)
    register(InsertionAUC)
