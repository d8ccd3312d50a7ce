"""Average drop, increase in confidence, and confidence change of the map-multiplied image.

Chattopadhay, Sarkar, Howlader, Balasubramanian, "Grad-CAM++: Generalized Gradient-based Visual
Explanations for Deep Convolutional Networks", WACV 2018, sec. 5.1: with Y the class score of the
image and O the score of the image multiplied by its explanation map (E * X),

    Average Drop = mean_i max(0, Y_i - O_i) / Y_i        (lower is better; the paper shows %)
    Increase in Confidence = mean_i 1[Y_i < O_i]          (higher is better)

camrt computes them as torchcam 0.5's ``ClassificationMetric`` does (per image
``relu(Y - O) / (Y + 1e-7)`` and ``Y < O``, as fractions, not percentages) on the model input
(after normalisation) multiplied by the [0, 1] heatmap. ``confidence_change`` is pytorch-grad-cam
1.5.7's ``CamMultImageConfidenceChange``: ``O - Y`` on the same product. One extra forward pass per
image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..hookspecs import hookimpl
from .base import HIGHER, LOWER, EvalBatch, Metric

#: torchcam's epsilon in the average drop's denominator.
EPS = 1e-7


class Confidence(Metric):
    """Average drop and increase in confidence (Chattopadhay et al., Grad-CAM++, WACV 2018) and the confidence change of the map-multiplied image."""

    name = "confidence"
    aliases = ("average-drop", "increase-in-confidence", "confidence-change")
    fields = {"average_drop": LOWER, "increase_in_confidence": HIGHER, "confidence_change": HIGHER}

    def evaluate(self, batch: EvalBatch) -> list[dict[str, Any]]:
        clean = batch.clean_scores()
        masked = batch.target_scores(batch.heatmaps[:, None] * batch.inputs, np.arange(len(batch)))
        return [{
            "average_drop": float(max(0.0, y - o) / (y + EPS)),
            "increase_in_confidence": float(y < o),
            "confidence_change": float(o - y),
        } for y, o in zip(clean, masked)]


@hookimpl
def register_metrics(register):
    register(Confidence)
