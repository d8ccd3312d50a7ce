"""Running a seeded target (camrt.seeds.targets) for the Explainer: the checks that the file and
the method can serve it, then one forward pass, the seed made from its outputs, one backward pass
(`ExplainSession.run_seeded`) and the method's maps. Several targets per input (top-k, class lists,
thresholds, repeated seeded targets) stack their seeds along the batch: one forward pass and one
batched backward pass for all of them (`stacked_maps`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import contract
from .errors import ModelError, UsageError
from .execution.context import ExplainContext
from .methods.base import GraphOutputs
from .seeds.batch import SeedBatch
from .seeds.targets import SeededPasses, SeededTarget, method_refusal, reads_target_gradients
from .targets import ClassTarget, TargetRequest, class_scores


def check_serves(explainer: Any, target: SeededTarget) -> None:
    """ModelError when the Explainer's file has no seed entry, UsageError when its method or
    options cannot explain `target`."""
    method = explainer.method
    if explainer.info.seed is None and reads_target_gradients(method.requires):
        raise ModelError(f"{explainer.session.path} has no seed entry ({contract.SEED_TENSOR!r}), needed by a "
                         f"{target.kind} target: re-export it with `camrt export ... --seed`")
    reason = method_refusal(method)
    if reason is not None:
        raise UsageError(f"method {method.name!r} cannot explain a {target.kind} target: it {reason}; use a gradient "
                         "method (gradcam, gradcam++, layercam, saliency, smoothgrad, integrated-gradients, ...), scorecam or "
                         "ablationcam")
    if explainer._fused is not None or explainer.aug_smooth:
        option = "device_postprocess" if explainer._fused is not None else "aug_smooth"
        raise UsageError(f"{option} runs the class path; a {target.kind} target needs {option} off")


def seeded_fetch(explainer: Any) -> list[str]:
    """What a seeded run of the Explainer fetches: the score and its method's outputs but those
    that follow `camrt/target`."""
    return [contract.LOGITS_OUTPUT, *(name for name in explainer.fetch
                                      if name not in (contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT))]


def backward_seeds(method: Any, seeds: SeedBatch, forward: dict[str, np.ndarray],
                   targets: list[int | SeededTarget]) -> SeedBatch:
    """The rows the backward pass starts from: the method's `seed_from` of the targets' seeds, their
    score rows and each row's target (the seeds themselves unless the method propagates another
    output relevance); further passes and the record keep the targets' own seeds and L."""
    fed = method.seed_from(seeds.values, forward[contract.LOGITS_OUTPUT][seeds.samples], targets)
    return seeds if fed is seeds.values else SeedBatch(np.asarray(fed, dtype=seeds.values.dtype), seeds.samples)


def seeded_maps(explainer: Any, x: np.ndarray, sizes: list[tuple[int, int]],
                target: SeededTarget) -> list[tuple[np.ndarray, float, dict[str, Any]]]:
    """(heatmap, L, the method's extra fields) of `target` in each input of the prepared batch `x`:
    one forward pass, the seed from its outputs, one backward pass (`ExplainSession.run_seeded`),
    the method on the result."""
    check_serves(explainer, target)
    fetch = seeded_fetch(explainer)
    made: dict[str, Any] = {}

    def make_seed(forward: dict[str, np.ndarray]) -> SeedBatch:
        made["seeds"], made["scores"] = target.seeds(forward)
        return backward_seeds(explainer.method, made["seeds"], forward, [target] * len(made["seeds"].samples))

    method = explainer.method
    if reads_target_gradients(method.requires):
        values = explainer.session.run_seeded(x, make_seed, fetch)
    else:  # Score-CAM's family: a forward pass, the seed (and L) for scoring its further passes
        values = explainer.session.run(x, ClassTarget(), fetch)
        make_seed(values)
    seeds = made["seeds"]
    if not np.array_equal(seeds.samples, np.arange(x.shape[0])):
        raise UsageError(f"a {target.kind} target must make one seed row per input, in order")
    context = ExplainContext(explainer.session, x, np.full(x.shape[0], contract.TOP1_TARGET),
                             seeded=SeededPasses(target, seeds.values))
    heatmaps = explainer._heatmaps(explainer._raw_maps(GraphOutputs(values, x, context)), sizes)
    return [(heatmap, float(score), {key: per_sample[i] for key, per_sample in context.extra.items()})
            for i, (heatmap, score) in enumerate(zip(heatmaps, made["scores"]))]


def stacks_targets(explainer: Any) -> bool:
    """Whether the Explainer can serve several targets per input with one batched backward pass: a
    file with a seed entry, and a method that reads only gradients of the target (no further passes)."""
    requires = explainer.method.requires
    return (explainer.info.seed is not None and explainer._fused is None and not explainer.aug_smooth
            and reads_target_gradients(requires) and method_refusal(explainer.method) is None
            and not (requires.extra_passes or requires.tail or getattr(explainer.method, "scores_seeded_targets", False))
            and _rows_repeat_samples(explainer))


def _rows_repeat_samples(explainer: Any) -> bool:
    """Whether every forward tensor the backward pass reads has a known batch axis, so that backward rows
    can repeat a sample (not so where an export folds the batch into another axis: timm's ViTs through
    torch's dynamo exporter). Otherwise each target gets its own passes."""
    graphs = explainer.session.seeded_plan(seeded_fetch(explainer)).graphs
    return all(name in graphs.batched for name in graphs.boundary)


@dataclass(frozen=True)
class StackedMap:
    """One map of a stacked run: the input it explains, its target (a class index or a bound
    SeededTarget), the heatmap, L (the class's score), the method's extra fields."""

    sample: int
    target: int | SeededTarget
    heatmap: np.ndarray
    score: float
    extra: dict[str, Any]
    #: The input's class scores [classes] (`class_scores`), for the class's probability.
    class_scores: np.ndarray


def class_seeds(logits: np.ndarray, target: ClassTarget) -> tuple[SeedBatch, np.ndarray, list[int]]:
    """The one-hot seed rows of a class target (the class channel, every position of a score with
    more axes: what the file's target path differentiates), L of each row, and each row's class."""
    scores = class_scores(logits)
    pairs = target.resolved(scores)
    seeds = np.zeros((len(pairs), *logits.shape[1:]), dtype=logits.dtype)
    for row, (_, category) in enumerate(pairs):
        seeds[row, category] = 1
    return (SeedBatch(seeds, np.array([i for i, _ in pairs], dtype=np.int64)),
            np.array([scores[i, c] for i, c in pairs], dtype=np.float64), [c for _, c in pairs])


def stacked_maps(explainer: Any, x: np.ndarray, sizes: list[tuple[int, int]], request: TargetRequest) -> list[StackedMap]:
    """Every map of `request` for the prepared batch `x`, in rank order: one forward pass, the
    targets and their seed rows from its outputs, one backward pass of all rows (`run_seeded`)."""
    for target in seeded_parts(request):
        check_serves(explainer, target)
    fetch = seeded_fetch(explainer)
    made: dict[str, Any] = {}

    def make_seed(forward: dict[str, np.ndarray]) -> SeedBatch:
        batches, scores, targets = [], [], []
        for target in request.targets(forward):
            if isinstance(target, SeededTarget):
                target = target.bound(explainer)
                seeds, values = target.seeds(forward)
                row_targets = [target] * len(seeds.samples)
            else:
                seeds, values, row_targets = class_seeds(forward[contract.LOGITS_OUTPUT], target)
            if len(seeds.samples):
                batches.append(seeds)
                scores.extend(values)
                targets.extend(row_targets)
        if not batches:
            raise _NoTarget
        made["scores"], made["targets"] = scores, targets
        made["class_scores"] = class_scores(forward[contract.LOGITS_OUTPUT])
        made["seeds"] = SeedBatch.stack(batches)
        return backward_seeds(explainer.method, made["seeds"], forward, targets)

    try:
        values = explainer.session.run_seeded(x, make_seed, fetch)
    except _NoTarget:  # no input has a target (e.g. none above a threshold): no backward pass
        return []
    seeds = made["seeds"]
    rows_x = x[seeds.samples]
    targets = made["targets"]
    classes = np.array([t if isinstance(t, int) else contract.TOP1_TARGET for t in targets], dtype=np.int64)
    context = ExplainContext(explainer.session, rows_x, classes, seeded=_RowPasses(targets, seeds.values))
    heatmaps = explainer._heatmaps(explainer._raw_maps(GraphOutputs(values, rows_x, context)),
                                   [sizes[s] for s in seeds.samples])
    return [StackedMap(int(sample), target, heatmap, float(score), {k: v[m] for k, v in context.extra.items()},
                       made["class_scores"][sample])
            for m, (sample, target, heatmap, score) in enumerate(zip(seeds.samples, targets, heatmaps, made["scores"]))]


class _NoTarget(Exception):
    """Raised from a seed maker when the request gives no input a target."""


@dataclass(frozen=True)
class _RowPasses:
    """`SeededPasses` of a stacked run, whose row m has its own target (a class or a seeded target)
    and seed row: L and dL/d score of score rows made from row m."""

    targets: list[int | SeededTarget]
    seed_rows: np.ndarray

    def scores(self, scores: np.ndarray, m: int) -> np.ndarray:
        target = self.targets[m]
        if isinstance(target, SeededTarget):
            return target.row_scores(scores, self.seed_rows[m])
        return class_scores(scores)[:, target]

    def seeds(self, scores: np.ndarray, m: int) -> np.ndarray:
        target = self.targets[m]
        if isinstance(target, SeededTarget):
            return target.row_seeds(scores, self.seed_rows[m])
        return np.broadcast_to(self.seed_rows[m], scores.shape)  # a class logit is linear in the score


def seeded_parts(request: TargetRequest) -> list[SeededTarget]:
    """The seeded targets a request names (its parts', for a list)."""
    from .seeds.targets import SeededRequest

    parts = getattr(request, "requests", (request,))
    return [part.target for part in parts if isinstance(part, SeededRequest)]
