"""ROAD: RemOve And Debias, most relevant first (MoRF) and least relevant first (LeRF).

Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022, sec. 4: removed pixels are not set to a constant (whose shape
leaks the removal order to the model) but filled by *noisy linear imputation*: every removed pixel
is the weighted mean of its 8 neighbours (edge neighbours 1/6, corner neighbours 1/12; weights of
neighbours outside the image dropped), a sparse linear system over all removed pixels of a channel,
plus Gaussian noise (sigma 0.01). The metric is the change of the class score, imputed minus
original, averaged over percentiles.

camrt follows pytorch-grad-cam 1.5.7 (``metrics/road.py``, ``perturbation_confidence.py``):
- MoRF at percentile p removes the pixels with map value >= the p-th percentile of the map
  (``np.percentile``), i.e. the (100 - p)% most relevant; LeRF at p does the same on 1 - map,
  removing the (100 - p)% least relevant;
- ``road_morf`` / ``road_lerf``: the mean over ``percentiles`` (default 10, 20, ..., 90) of the score
  change; ``road_combined`` = (LeRF - MoRF) / 2 (pytorch-grad-cam's ``ROADCombined``);
- the imputation is in the model's input space (after normalisation).
The noise is reproducible: it is drawn from ``numpy.random.default_rng((seed, p, 0 for MoRF / 1
for LeRF))`` for each image, so an image's result does not depend on the rest of its batch.
The sparse system is solved with scipy (``pip install scipy``; only ROAD needs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError
from ..hookspecs import hookimpl
from .base import HIGHER, LOWER, EvalBatch, Metric, int_list

#: (row offset, column offset) -> weight of that neighbour in the imputed pixel's mean.
NEIGHBOUR_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                     ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
MORF, LERF = 0, 1


def linear_imputation(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """image [C, H, W] with the pixels where `keep` [H, W] is False replaced by the solution of
    x_i = sum_j w_ij v_j / sum_j w_ij over i's in-image neighbours j (v_j = x_j when j is removed
    too, else the image's value): float64 [C, n_removed], in raster order of the removed pixels."""
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.linalg import spsolve
    except ImportError:
        raise UsageError("the ROAD metric needs scipy for its sparse linear system: pip install scipy") from None
    channels, height, width = image.shape
    known = keep.reshape(-1)
    flat = image.reshape(channels, -1).astype(np.float64)
    removed = np.flatnonzero(~known)
    n = removed.size
    variable = np.full(known.size, -1, dtype=np.int64)
    variable[removed] = np.arange(n)
    rows_r, cols_r = np.divmod(removed, width)
    diagonal = np.zeros(n)
    rhs = np.zeros((n, channels))
    a_rows, a_cols, a_vals = [], [], []
    for (dr, dc), weight in NEIGHBOUR_WEIGHTS:
        r, c = rows_r + dr, cols_r + dc
        inside = (r >= 0) & (c >= 0) & (r < height) & (c < width)
        diagonal[inside] -= weight
        ids = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        has_value = known[neighbour]
        rhs[ids[has_value]] -= weight * flat[:, neighbour[has_value]].T
        a_rows.append(ids[~has_value])
        a_cols.append(variable[neighbour[~has_value]])
        a_vals.append(np.full(a_rows[-1].size, weight))
    a_rows.append(np.arange(n))
    a_cols.append(np.arange(n))
    a_vals.append(diagonal)
    system = coo_matrix((np.concatenate(a_vals), (np.concatenate(a_rows), np.concatenate(a_cols))), shape=(n, n))
    return np.asarray(spsolve(system.tocsc(), rhs)).reshape(n, channels).T


def road_input(image: np.ndarray, heatmap: np.ndarray, percentile: int, order: int, noise: float,
               seed: int) -> np.ndarray:
    """The image [C, H, W] with the pixels that `order` (MORF / LERF) removes at `percentile` imputed."""
    ranking = heatmap if order == MORF else np.float32(1) - heatmap
    keep = ranking < np.float32(np.percentile(ranking, percentile))
    out = image.reshape(image.shape[0], -1).copy()
    removed = np.flatnonzero(~keep.reshape(-1))
    if removed.size:
        solution = linear_imputation(image, keep).astype(np.float32)
        draws = np.random.default_rng((seed, percentile, order)).standard_normal(solution.shape).astype(np.float32)
        out[:, removed] = solution + np.float32(noise) * draws
    return out.reshape(image.shape)


@dataclass(frozen=True)
class ROADOptions:
    """percentiles: comma-separated (default 10,...,90); noise: the imputation's noise sigma; seed: of the noise."""

    percentiles: Any = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    noise: float = 0.01
    seed: int = 0

    def __post_init__(self):
        percentiles = int_list(self.percentiles, "percentiles")
        if not percentiles or any(not 0 < p < 100 for p in percentiles):
            raise ValueError(f"percentiles must be integers in 1..99, got {self.percentiles!r}")
        object.__setattr__(self, "percentiles", percentiles)
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


class ROAD(Metric):
    """ROAD (Rong et al., ICML 2022): score change after removing the most (MoRF) / least (LeRF) relevant pixels, filled by noisy linear imputation."""

    name = "road"
    aliases = ("road-morf", "road-lerf", "road-combined")
    fields = {"road_morf": LOWER, "road_lerf": HIGHER, "road_combined": HIGHER}
    Options = ROADOptions

    def evaluate(self, batch: EvalBatch) -> list[dict[str, Any]]:
        o = self.options
        jobs = [(i, p, order) for order in (MORF, LERF) for p in o.percentiles for i in range(len(batch))]
        changes = np.empty((2, len(o.percentiles), len(batch)))
        clean = batch.clean_scores()
        for start in range(0, len(jobs), batch.batch_size):
            chunk = jobs[start:start + batch.batch_size]
            perturbed = np.stack([road_input(batch.inputs[i], batch.heatmaps[i], p, order, o.noise, o.seed)
                                  for i, p, order in chunk])
            rows = np.array([i for i, _, _ in chunk])
            for (i, p, order), value in zip(chunk, batch.target_scores(perturbed, rows)):
                changes[order, o.percentiles.index(p), i] = value - clean[i]
        morf, lerf = changes.mean(axis=1)
        return [{
            "road_morf": float(morf[i]),
            "road_lerf": float(lerf[i]),
            "road_combined": float((lerf[i] - morf[i]) / 2),
            "road_curve": {"percentile": list(o.percentiles), "morf": changes[MORF, :, i].tolist(),
                           "lerf": changes[LERF, :, i].tolist()},
        } for i in range(len(batch))]


@hookimpl
def register_metrics(register):
    register(ROAD)
