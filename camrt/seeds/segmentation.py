"""Segmentation seeds: L = the sum of a class's logits over a region of the image.

As pytorch-grad-cam's `SemanticSegmentationTarget(category, mask)`: (output[category] * mask).sum(),
the region defaulting to the pixels where `category` is the argmax of the logits. The seed
dL/d logits is the mask placed in the class's channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .batch import SeedBatch


def argmax_region(logits: np.ndarray, category: int) -> np.ndarray:
    """float [B, H, W]: 1 where `category` is the argmax over the class axis of logits [B, C, H, W]."""
    return (np.asarray(logits).argmax(axis=1) == category).astype(np.float32)


def segmentation_seed(logits: np.ndarray, categories: int | Sequence[int],
                      masks: np.ndarray | None = None) -> SeedBatch:
    """One seed row per image: `categories` (one class, or one per image) over `masks` (a [H, W] or
    [B, H, W] weight map, e.g. a binary region; default: `argmax_region`)."""
    logits = np.asarray(logits)
    if logits.ndim != 4:
        raise InputError(f"segmentation targets need [batch, classes, height, width] logits, got shape {logits.shape}")
    batch, classes = logits.shape[:2]
    wanted = np.broadcast_to(np.asarray(categories, dtype=np.int64), (batch,))
    bad = [int(c) for c in wanted if not 0 <= c < classes]
    if bad:
        raise InputError(f"segmentation class(es) {bad} out of range 0..{classes - 1}")
    if masks is not None:
        masks = np.asarray(masks, dtype=np.float32)
        if masks.shape[-2:] != logits.shape[2:] or masks.ndim not in (2, 3):
            raise InputError(f"region mask of shape {masks.shape}: give [H, W] or [batch, H, W] at the logits' "
                             f"size {logits.shape[2:]} (resize the mask to the model's output first)")
        masks = np.broadcast_to(masks, (batch, *logits.shape[2:]))
    seed = np.zeros_like(logits, dtype=np.float32)
    for b, category in enumerate(wanted):
        region = argmax_region(logits[b:b + 1], category)[0] if masks is None else masks[b]
        if not region.any():
            where = "is the argmax at no pixel" if masks is None else "has an empty region mask"
            raise InputError(f"image {b}: segmentation class {int(category)} {where}; give a region (--region) "
                             "or another class")
        seed[b, category] = region
    return SeedBatch.one_per_sample(seed)
