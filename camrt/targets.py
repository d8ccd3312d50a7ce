"""Targets: what to explain in each input, and the one place where a target becomes what the
graph is fed.

A `TargetRequest` is what a caller asks for, for any batch (``--target 3``, ``top1``,
``topk:3``): given the outputs of one forward pass (those it names in ``forward_outputs``) it
becomes one `Target` per map made for each input, best first. A `Target` says what to
differentiate for the inputs of one batch, and `Target.feeds` turns it into the graph's inputs:
a class target feeds ``camrt/target`` (-1, the top-1 class, is resolved in the graph by ArgMax).
Other kinds of target (a cotangent seed built from the forward outputs) are further subclasses
of these two; the Explainer only calls `TargetRequest.targets` and `Target.feeds`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import contract
from .contract import TOP1_TARGET
from .errors import InputError, UsageError

#: A `ClassTarget` entry for an input that has no target at that rank.
NO_CLASS = None


class Target(ABC):
    """What to differentiate for each input of one batch."""

    @abstractmethod
    def feeds(self, batch: int, num_classes: int) -> dict[str, np.ndarray]:
        """The graph inputs that carry this target for a batch of `batch` inputs, checked
        (InputError naming the bad values)."""

    @abstractmethod
    def select(self, rows: Sequence[int]) -> Target:
        """The target of the inputs `rows` of the batch, in that order."""

    def rows(self, batch: int) -> list[int]:
        """The inputs of a batch of `batch` that this target explains (all of them but where a
        request gives an input fewer targets: `--target above:T`)."""
        return list(range(batch))


@dataclass(frozen=True)
class ClassTarget(Target):
    """One class logit per input: `classes` is one index for every input or one per input, each
    a class index, TOP1_TARGET (-1: the top-1 class, resolved in the graph by ArgMax) or NO_CLASS
    (that input has no target at this rank: `rows` leaves it out)."""

    classes: Any = TOP1_TARGET

    def feeds(self, batch: int, num_classes: int) -> dict[str, np.ndarray]:
        """``camrt/target``: int64 [batch], each -1 or 0 <= t < num_classes."""
        classes = [int(self.classes)] * batch if self._for_all else self.classes
        try:
            array = np.asarray(classes)
        except (TypeError, ValueError) as exc:
            raise InputError(f"targets must be integers, got {classes!r}") from exc
        if array.ndim != 1 or array.shape[0] != batch:
            given = array.size if array.ndim else 1
            raise InputError(f"got {given} target(s) for a batch of {batch}; give one per input")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"targets must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
        bad = [int(t) for t in array if not (t == TOP1_TARGET or 0 <= t < num_classes)]
        if bad:
            raise InputError(f"target(s) {bad} out of range: use {TOP1_TARGET} (top-1) or a class index in "
                             f"0..{num_classes - 1}")
        return {contract.TARGET_INPUT: array}

    @property
    def _for_all(self) -> bool:
        """Whether `classes` is one index for every input."""
        return isinstance(self.classes, (int, np.integer)) and not isinstance(self.classes, bool)

    def select(self, rows: Sequence[int]) -> ClassTarget:
        if self._for_all:
            return self
        classes = list(self.classes)
        return ClassTarget(tuple(classes[i] for i in rows))

    def rows(self, batch: int) -> list[int]:
        if self._for_all:
            return list(range(batch))
        return [i for i, c in enumerate(self.classes) if c is not NO_CLASS]

    def resolved(self, class_scores: np.ndarray) -> list[tuple[int, int]]:
        """(input, class) of each input in `rows`, the top-1 taken from `class_scores` [B, classes]
        as the graph's ArgMax takes it (the first of equal maxima)."""
        batch = class_scores.shape[0]
        classes = [int(self.classes)] * batch if self._for_all else list(self.classes)
        return [(i, int(class_scores[i].argmax()) if classes[i] == TOP1_TARGET else int(classes[i]))
                for i in self.rows(batch)]


def as_target(targets: Any) -> Target:
    """The library's ``targets`` argument as a Target: a Target as it is; None (top-1 for all);
    one int for all inputs; or one per input (an int, or -1/None for top-1)."""
    if isinstance(targets, Target):
        return targets
    if targets is None:
        return ClassTarget(TOP1_TARGET)
    if isinstance(targets, (bool, np.bool_, str, bytes)) or not isinstance(targets, (int, np.integer, Iterable)):
        raise InputError(f"targets must be None, an integer or one integer per input, got {targets!r}")
    if isinstance(targets, (int, np.integer)):
        return ClassTarget(int(targets))
    targets = list(targets)
    if any(isinstance(t, (bool, np.bool_)) for t in targets):
        raise InputError(f"targets must be integers, got {targets!r}")
    return ClassTarget(tuple(TOP1_TARGET if t is None else t for t in targets))


class TargetRequest(ABC):
    """What to explain in every input, for any batch: one or more targets per input."""

    #: The outputs of a forward pass that `targets` reads (none: it needs no forward pass).
    forward_outputs: ClassVar[tuple[str, ...]] = ()
    #: Whether it explains class scores (a [batch, classes] score); seeded requests do not.
    explains_classes: ClassVar[bool] = True

    @property
    @abstractmethod
    def ranks(self) -> list[int | None] | None:
        """One entry per map made for each input: [None] for one target, [1..k] for several; None
        when the forward pass decides how many each input gets (`ThresholdRequest`)."""

    @abstractmethod
    def targets(self, forward: Mapping[str, np.ndarray]) -> list[Target]:
        """One Target per rank for a batch whose forward pass gave `forward` (`forward_outputs`)."""

    @abstractmethod
    def check(self, num_classes: int, path: str) -> None:
        """UsageError when the file at `path`, with `num_classes` classes, cannot serve the request."""

    def record_fields(self, rank: int | None = None) -> dict[str, Any]:
        """Fields every record of the request's target at `rank` carries, failed ones included (none
        for class targets)."""
        return {}

    def output_tag(self, rank: int | None) -> str | None:
        """What tells the output files of the map at `rank` apart (<stem>.<tag>.png); None: one map."""
        return None if rank is None else f"top{rank}"

    def none_found(self) -> str:
        """The error of an input that gets no target (only requests whose `ranks` is None)."""
        return "no target to explain in this input"

    def bound(self, explainer: Any) -> TargetRequest:
        """The request with what it takes from the file resolved (a concept image's embedding)."""
        return self


@dataclass(frozen=True)
class ClassRequest(TargetRequest):
    """--target N or top1: one class (TOP1_TARGET: the top-1 class) for every input."""

    index: int = TOP1_TARGET

    @property
    def ranks(self) -> list[int | None]:
        return [None]

    def targets(self, forward: Mapping[str, np.ndarray]) -> list[Target]:
        return [ClassTarget(self.index)]

    def check(self, num_classes: int, path: str) -> None:
        if self.index >= num_classes:
            raise _out_of_range(str(self.index), num_classes, path)


@dataclass(frozen=True)
class TopKRequest(TargetRequest):
    """--target topk:K: each input's k highest-scoring classes, best first; ties rank the lower
    class index first (as ArgMax, and so top-1, does)."""

    k: int
    forward_outputs: ClassVar[tuple[str, ...]] = (contract.LOGITS_OUTPUT,)

    @property
    def ranks(self) -> list[int | None]:
        return list(range(1, self.k + 1))

    def targets(self, forward: Mapping[str, np.ndarray]) -> list[Target]:
        ranked = np.argsort(-forward[contract.LOGITS_OUTPUT], axis=1, kind="stable")[:, :self.k]
        return [ClassTarget(tuple(ranked[:, rank].tolist())) for rank in range(self.k)]

    def check(self, num_classes: int, path: str) -> None:
        if self.k > num_classes:
            raise _out_of_range(f"topk:{self.k}", num_classes, path)


@dataclass(frozen=True)
class TargetListRequest(TargetRequest):
    """Several targets per input, in the given order (--target 281,285; --target seg:3 --target
    seg:7): one map per (input, target). Each part is a one-target request."""

    requests: tuple[TargetRequest, ...]

    @property
    def forward_outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(name for request in self.requests for name in request.forward_outputs))

    @property
    def ranks(self) -> list[int | None]:
        return list(range(1, len(self.requests) + 1))

    @property
    def explains_classes(self) -> bool:  # type: ignore[override]
        return any(request.explains_classes for request in self.requests)

    def targets(self, forward: Mapping[str, np.ndarray]) -> list[Target]:
        return [request.targets(forward)[0] for request in self.requests]

    def check(self, num_classes: int, path: str) -> None:
        for request in self.requests:
            request.check(num_classes, path)

    def record_fields(self, rank: int | None = None) -> dict[str, Any]:
        return self.requests[(rank or 1) - 1].record_fields()

    def output_tag(self, rank: int | None) -> str | None:
        part = self.requests[(rank or 1) - 1]
        if isinstance(part, ClassRequest) and part.index != TOP1_TARGET:
            return f"class{part.index}"
        return f"target{rank}"

    def bound(self, explainer: Any) -> TargetListRequest:
        return TargetListRequest(tuple(request.bound(explainer) for request in self.requests))


@dataclass(frozen=True)
class ThresholdRequest(TargetRequest):
    """--target above:T (score > T) or above:sigmoid:P (sigmoid(score) > P, multi-label sigmoid
    heads): every class over the threshold, best first (ties: lower class index first). The score is
    the file's `camrt/logits` (the record's score): a logit for a head that ends in a sigmoid."""

    threshold: float
    sigmoid: bool = False
    forward_outputs: ClassVar[tuple[str, ...]] = (contract.LOGITS_OUTPUT,)

    @property
    def ranks(self) -> None:
        return None

    def targets(self, forward: Mapping[str, np.ndarray]) -> list[Target]:
        scores = class_scores(forward[contract.LOGITS_OUTPUT]).astype(np.float64)
        values = 1 / (1 + np.exp(-scores)) if self.sigmoid else scores
        ranked = np.argsort(-scores, axis=1, kind="stable")
        per_input = [[int(c) for c in order if values[i, c] > self.threshold] for i, order in enumerate(ranked)]
        count = max(len(classes) for classes in per_input)
        return [ClassTarget(tuple(classes[r] if r < len(classes) else NO_CLASS for classes in per_input))
                for r in range(count)]

    def check(self, num_classes: int, path: str) -> None:
        """Any file with classes serves it."""

    def record_fields(self, rank: int | None = None) -> dict[str, Any]:
        return {"threshold": self.threshold, "threshold_of": "sigmoid" if self.sigmoid else "score"}

    def none_found(self) -> str:
        of = "sigmoid(score)" if self.sigmoid else "score"
        text = f"above:sigmoid:{self.threshold:g}" if self.sigmoid else f"above:{self.threshold:g}"
        return f"no class has a {of} above {self.threshold:g} (--target {text}): nothing to explain"


def class_scores(logits: np.ndarray) -> np.ndarray:
    """Each class's score [B, classes]: the score tensor, its class channel (axis 1) summed over the
    other axes when it has more (a seeded file's target path explains that sum)."""
    return logits if logits.ndim == 2 else logits.reshape(*logits.shape[:2], -1).sum(axis=2)


def _out_of_range(given: str, num_classes: int, path: str) -> UsageError:
    return UsageError(f"--target {given} is out of range: {path} has {num_classes} classes (0..{num_classes - 1})")
