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


class Target(ABC):
    """What to differentiate for each input of one batch."""

    @abstractmethod
    def feeds(self, batch: int, num_classes: int) -> dict[str, np.ndarray]:
        """The graph inputs that carry this target for a batch of `batch` inputs, checked
        (InputError naming the bad values)."""

    @abstractmethod
    def select(self, rows: Sequence[int]) -> Target:
        """The target of the inputs `rows` of the batch, in that order."""


@dataclass(frozen=True)
class ClassTarget(Target):
    """One class logit per input: `classes` is one index for every input or one per input, each
    a class index or TOP1_TARGET (-1: the top-1 class, resolved in the graph by ArgMax)."""

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

    @property
    @abstractmethod
    def ranks(self) -> list[int | None]:
        """One entry per map made for each input: [None] for one target, [1..k] for ranked ones."""

    @abstractmethod
    def targets(self, forward: Mapping[str, np.ndarray]) -> list[Target]:
        """One Target per rank for a batch whose forward pass gave `forward` (`forward_outputs`)."""

    @abstractmethod
    def check(self, num_classes: int, path: str) -> None:
        """UsageError when the file at `path`, with `num_classes` classes, cannot serve the request."""

    def record_fields(self) -> dict[str, Any]:
        """Fields every record of the request carries, failed ones included (none for class targets)."""
        return {}


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


def _out_of_range(given: str, num_classes: int, path: str) -> UsageError:
    return UsageError(f"--target {given} is out of range: {path} has {num_classes} classes (0..{num_classes - 1})")


def _flag(option: str) -> str:
    """The `camrt explain` flag of a target option (box_iou: box-iou)."""
    return option.replace("_", "-")


def parse_target(text: str, region: Any = None, **options: Any) -> TargetRequest:
    """--target: a class index, top1 (or -1), topk:K, or KIND:VALUE of a registered target kind
    (the `register_targets` hook; built-in: seg:CLASS with an optional `region` mask file,
    similar:concept.npy, box:x1,y1,x2,y2[:label] with options box_iou, box_format, box_layout,
    camrt.seeds.targets). `region` and `options` (None: not given) go to kinds that take them."""
    from .plugins.registry import build_target_registry

    value = text.strip().lower()
    given = {name: option for name, option in {"region": region, **options}.items() if option is not None}
    kind, colon, rest = text.strip().partition(":")
    if colon and kind.lower() != "topk":
        registered = build_target_registry().get(kind)
        unknown = [name for name in given if name not in registered.options]
        if unknown:
            raise UsageError(f"--{_flag(unknown[0])} does not apply to --target {kind}:... ({text!r})")
        return registered.parse(rest, **given)
    if given:
        name = next(iter(given))
        registry = build_target_registry()
        kinds = [f"{k}:..." for k in registry.names() if name in registry.get(k).options]
        raise UsageError(f"--{_flag(name)} applies to --target {' or '.join(kinds) or 'no kind'}, not to {text!r}")
    if value in ("top1", "top-1", str(TOP1_TARGET)):
        return ClassRequest(TOP1_TARGET)
    if value.startswith("topk:"):
        k = value[len("topk:"):]
        if not k.isdigit() or int(k) < 1:
            raise UsageError(f"--target topk:K needs a whole number K >= 1, got {text!r}")
        return TopKRequest(int(k))
    try:
        target = int(value)
    except ValueError:
        raise UsageError(f"--target must be a class index, top1, topk:K, seg:CLASS, similar:FILE.npy or "
                         f"box:x1,y1,x2,y2[:label], got {text!r}") from None
    if target < 0:
        raise UsageError(f"--target must be a class index >= 0, top1 or topk:K, got {text!r}")
    return ClassRequest(target)
