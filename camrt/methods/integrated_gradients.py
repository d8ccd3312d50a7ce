"""Integrated Gradients.

Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks", ICML 2017 (arXiv:1703.01365),
eq. 1 and its approximation eq. 3:

    IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x')) / dx_i da
            ~ (x_i - x'_i) * sum_j w_j dF(x' + a_j (x - x')) / dx_i

with x' a constant baseline (`baseline`, 0 by default: the all-zero model input) and the
quadrature (a_j, w_j) of Captum's ``IntegratedGradients`` for the same `method` and `steps`:
``gausslegendre`` (Captum's default: Gauss-Legendre nodes on [0, 1]) or ``riemann_left``,
``riemann_right``, ``riemann_middle``, ``riemann_trapezoid`` (Captum's: nodes linspace, weights
1/steps, halved at both ends for the trapezoid). F is the target's ``camrt/logits`` score; the
target is the one explained for x at every point of the path. A seeded target (camrt.seeds.targets)
is integrated likewise: F is its L, its parameters (a segmentation region) resolved on x, its seed
made from each path point's own score (the cosine's gradient there, the box matched again; a fixed
region's seed is the same at every point), as Captum's IntegratedGradients integrates a forward
function returning that L (`ExplainContext.target_gradients`).

Completeness (Prop. 1: sum_i IG_i(x) = F(x) - F(x')) is reported per sample in the Explanation's
extra field ``completeness``: the attribution sum, the score difference and their gap (Captum's
convergence delta); one extra forward pass of the baseline. The attribution is signed; its map is
max_channel |IG| (`channel_max_abs`). Gradient passes run `batch_size` path points at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import contract
from ..hookspecs import hookimpl
from .base import GraphOutputs, InputGradientMethod, Requirements

QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of Captum's approximation method `method` with `steps` points."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    weights = np.full(steps, 1.0 / steps)
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return np.linspace(0, 1, steps), weights
    if method == "riemann_left":
        return np.linspace(0, 1 - 1 / steps, steps), weights
    if method == "riemann_right":
        return np.linspace(1 / steps, 1, steps), weights
    if method == "riemann_middle":
        return np.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps), weights
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(QUADRATURES)}")


class IntegratedGradients(InputGradientMethod):
    """Integrated Gradients: (x - baseline) times the path integral of the input gradient (Sundararajan et al. 2017)."""

    name = "integrated-gradients"
    aliases = ("ig", "integrated_gradients")
    requires = Requirements(input_gradient=contract.RULE_VANILLA, extra_passes=True)
    scores_seeded_targets = True

    @dataclass(frozen=True)
    class Options:
        """steps path points, constant baseline value, Captum quadrature method."""

        steps: int = 50
        baseline: float = 0.0
        method: str = "gausslegendre"
        batch_size: int = 16

        def __post_init__(self):
            if self.steps < 2 or self.batch_size < 1:
                raise ValueError("steps must be >= 2 and batch_size >= 1")
            if self.method not in QUADRATURES:
                raise ValueError(f"method must be one of {', '.join(QUADRATURES)}, got {self.method!r}")

    def attribution(self, outputs: GraphOutputs, *, layer: str | None = None) -> np.ndarray:
        context = outputs.require_context(self.name)
        x = outputs.inputs
        opts = self.options
        alphas, weights = quadrature(opts.method, opts.steps)
        baseline = np.full_like(x[:1], opts.baseline)
        name = contract.input_gradient_output(contract.RULE_VANILLA)
        integral = np.zeros(x.shape, dtype=np.float64)
        for b in range(x.shape[0]):
            delta = x[b] - baseline[0]
            for start in range(0, opts.steps, opts.batch_size):
                a = alphas[start:start + opts.batch_size].astype(np.float32)
                points = baseline + a[:, None, None, None] * delta[None]
                grads = context.target_gradients(points, b, [name])[name]
                integral[b] += np.tensordot(weights[start:start + a.size], grads.astype(np.float64), axes=1)
        attribution = ((x - baseline).astype(np.float64) * integral).astype(np.float32)
        base_logits = context.forward(np.repeat(baseline, x.shape[0], axis=0))
        difference = [float(context.target_scores(outputs.logits[b:b + 1], b)[0])
                      - float(context.target_scores(base_logits[b:b + 1], b)[0]) for b in range(x.shape[0])]
        sums = attribution.reshape(x.shape[0], -1).sum(axis=1, dtype=np.float64)
        context.add_extra("completeness", [
            {"attribution_sum": float(s), "score_difference": float(d), "delta": float(s - d)}
            for s, d in zip(sums, difference)
        ])
        return attribution


@hookimpl
def register_methods(register):
    register(IntegratedGradients)
