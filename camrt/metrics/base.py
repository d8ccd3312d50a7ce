"""The metric contract: what a metric sees (`EvalBatch`) and what it returns.

A metric scores heatmaps that a method produced for a batch of images. It gets the preprocessed
inputs, the heatmaps at the model's input resolution, the explained classes and the
`ExplainContext` of the run, and returns one dict per image: scalar results named in `fields`
(averaged into the summary table) and, optionally, curves (lists) for the plots and the records.

Every model evaluation goes through ``batch.target_scores`` -> ``ExplainContext.forward``: the same
onnxruntime session as the explanation, ``batch_size`` perturbed inputs per run.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError, UsageError
from ..methods.base import Method

SCORES = ("probability", "logit")
HIGHER, LOWER = "higher", "lower"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class EvalBatch:
    """One batch of images explained by one method, as a metric sees it.

    inputs: the preprocessed model input [B, C, H, W] float32; heatmaps: [B, H, W] float32 in
    [0, 1] at the model input's resolution; targets: the explained class per image (int64 [B]);
    context: the run's `ExplainContext` (forward passes through the same session).
    """

    inputs: np.ndarray
    heatmaps: np.ndarray
    targets: np.ndarray
    context: Any
    #: "probability" (softmax of ``camrt/logits`` at the target) or "logit".
    score: str = "probability"
    #: Perturbed inputs per onnxruntime run.
    batch_size: int = 32
    #: The input names (paths as given) and original RGB images (pointing game boxes are in their pixels).
    names: Sequence[str] = ()
    images: Sequence[np.ndarray] = ()
    #: The Explainer of the method (the randomization check re-explains with modified weights).
    explainer: Any = None
    #: path -> an Explainer of the same method, options and layers for another contract file.
    reexplainer: Any = None
    _clean: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.score not in SCORES:
            raise UsageError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        b, _, h, w = self.inputs.shape
        if self.heatmaps.shape != (b, h, w):
            raise InputError(f"heatmaps {self.heatmaps.shape} do not match the inputs {self.inputs.shape}; "
                             "metrics need one [H, W] map per input at the model input's resolution")
        self.targets = np.asarray(self.targets, dtype=np.int64)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def rows(self, rows: Sequence[int]) -> EvalBatch:
        """The batch of the images at `rows`, in that order (camrt/batch/isolate.py scores a failing
        image alone)."""
        rows = list(rows)
        if rows == list(range(len(self))):
            return self
        index = np.asarray(rows, dtype=np.int64)
        inputs, targets = self.inputs[index], self.targets[index]
        return dataclasses.replace(
            self, inputs=inputs, heatmaps=self.heatmaps[index], targets=targets,
            context=type(self.context)(self.context.session, inputs, targets),
            names=[self.names[i] for i in rows] if self.names else (),
            images=[self.images[i] for i in rows] if self.images else (),
            _clean=None if self._clean is None else self._clean[index])

    def select(self, logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The score (float64) of each row's image's target class from logits [N, classes]."""
        values = softmax(logits) if self.score == "probability" else logits.astype(np.float64)
        return values[np.arange(values.shape[0]), self.targets[rows]]

    def target_scores(self, perturbed: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Scores [N] of perturbed inputs [N, C, H, W]; rows[i] is the image that row i was made from."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.float64)
        for start in range(0, len(rows), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out[chunk] = self.select(self.context.forward(np.ascontiguousarray(perturbed[chunk], dtype=np.float32)),
                                     rows[chunk])
        return out

    def clean_scores(self) -> np.ndarray:
        """Scores [B] of the unperturbed inputs (one run, cached for every metric of the batch)."""
        if self._clean is None:
            self._clean = self.target_scores(self.inputs, np.arange(len(self)))
        return self._clean


class Metric(ABC):
    """An evaluation metric. Subclasses set `name`, `fields`, optionally `aliases`, `Options`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "metric"
    #: Scalar result name -> which way is better ("higher" or "lower"); the summary averages these.
    fields: ClassVar[dict[str, str]] = {}

    @dataclass(frozen=True)
    class Options:
        """No options."""

    def __init__(self, **options: Any):
        self.options = self.parse_options(options)

    # Options from the CLI (text) are parsed and type-checked exactly as a method's.
    parse_options = Method.__dict__["parse_options"]

    @classmethod
    def describe(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls.Options)
        options = [{"name": f.name, "type": getattr(hints.get(f.name), "__name__", str(hints.get(f.name))),
                    "default": f.default if f.default is not dataclasses.MISSING else None}
                   for f in dataclasses.fields(cls.Options)]
        doc = (cls.__doc__ or "").strip().splitlines()
        return {"name": cls.name, "aliases": list(cls.aliases), "fields": dict(cls.fields), "options": options,
                "description": doc[0] if doc else ""}

    @abstractmethod
    def evaluate(self, batch: EvalBatch) -> list[dict[str, Any]]:
        """One dict per image: the `fields` (float, or None where undefined) and optional curves."""

    def close(self) -> None:
        """Release what the metric kept between batches (temporary files, sessions)."""


def int_list(value: Any, what: str) -> tuple[int, ...]:
    """An option given as "10,20,30" (CLI text) or a sequence of ints."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(int(str(item).strip()) for item in items)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a comma-separated list of integers, got {value!r}") from None
