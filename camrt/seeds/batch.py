"""A batch of seeds (cotangents dL/d score) and the batch samples they belong to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class SeedBatch:
    """`values` [M, ...] shaped like the score tensor's rows; row m explains batch sample `samples[m]`.

    Several targets of one image are several rows with the same sample: the backward pass runs once
    for all M rows on the activations of one forward pass."""

    values: np.ndarray
    samples: np.ndarray

    def __post_init__(self):
        samples = np.asarray(self.samples, dtype=np.int64)
        if samples.ndim != 1 or samples.shape[0] != self.values.shape[0]:
            raise InputError(f"{samples.size} sample indices for {self.values.shape[0]} seed rows; give one per row")
        object.__setattr__(self, "samples", samples)

    @classmethod
    def one_per_sample(cls, values: np.ndarray) -> SeedBatch:
        """Row b explains sample b."""
        return cls(values, np.arange(np.asarray(values).shape[0]))

    @classmethod
    def stack(cls, batches: Sequence[SeedBatch]) -> SeedBatch:
        """The rows of every batch, in order (one map per (image, target))."""
        if not batches:
            raise InputError("no seeds to stack")
        return cls(np.concatenate([b.values for b in batches]), np.concatenate([b.samples for b in batches]))
