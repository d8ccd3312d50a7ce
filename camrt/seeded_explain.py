"""Running a seeded target (camrt.seeds.targets) for the Explainer: the checks that the file and
the method can serve it, then one forward pass, the seed made from its outputs, one backward pass
(`ExplainSession.run_seeded`) and the method's maps."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import contract
from .errors import ModelError, UsageError
from .execution.context import ExplainContext
from .methods.base import GraphOutputs
from .seeds.batch import SeedBatch
from .seeds.targets import SeededPasses, SeededTarget, method_refusal
from .targets import ClassTarget


def _reads_gradients(requires: Any) -> bool:
    return bool(requires.gradients or requires.input_gradient or requires.bias_gradients)


def check_serves(explainer: Any, target: SeededTarget) -> None:
    """ModelError when the Explainer's file has no seed entry, UsageError when its method or
    options cannot explain `target`."""
    method = explainer.method
    if explainer.info.seed is None:
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


def seeded_maps(explainer: Any, x: np.ndarray, sizes: list[tuple[int, int]],
                target: SeededTarget) -> list[tuple[np.ndarray, float, dict[str, Any]]]:
    """(heatmap, L, the method's extra fields) of `target` in each input of the prepared batch `x`:
    one forward pass, the seed from its outputs, one backward pass (`ExplainSession.run_seeded`),
    the method on the result."""
    check_serves(explainer, target)
    fetch = [contract.LOGITS_OUTPUT, *(name for name in explainer.fetch
                                       if name not in (contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT))]
    made: dict[str, Any] = {}

    def make_seed(forward: dict[str, np.ndarray]) -> SeedBatch:
        made["seeds"], made["scores"] = target.seeds(forward)
        return made["seeds"]

    method = explainer.method
    if _reads_gradients(method.requires):
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
