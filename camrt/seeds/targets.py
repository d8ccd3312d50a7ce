"""Seeded targets: what to explain when L is not one class logit (`--target seg:CLASS`,
`similar:concept.npy`, `box:x1,y1,x2,y2[:label]`), their parsing, and which methods serve them.

A `SeededTarget` makes its seed (the cotangent dL/d score, camrt/seeds/) from the outputs of one
forward pass; the Explainer then runs the backward pass on the same activations
(`ExplainSession.run_seeded`) and hands the method the gradients of L. Methods with further passes
(Score-CAM's masked inputs, Ablation-CAM's ablated activations, SmoothGrad's noisy and Integrated
Gradients' interpolated inputs) get the target's L and its seed on each pass from `SeededPasses`
through `ExplainContext`. Methods that read what follows `camrt/target` (CAM's class weights) or
nothing that depends on the target are refused (`method_refusal`), never run on the class path.
camrt/seeded_explain.py runs them.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from .. import contract
from ..errors import InputError, ModelError, UsageError
from ..targets import Target, TargetRequest
from . import boxes
from .batch import SeedBatch
from .embedding import cosine_similarity, similarity_seed
from .segmentation import segmentation_seed


class SeededTarget(Target):
    """A target whose seed is built from the forward outputs: one seed row per input."""

    kind: ClassVar[str]

    @abstractmethod
    def seeds(self, forward: Mapping[str, np.ndarray]) -> tuple[SeedBatch, np.ndarray]:
        """(one seed row per input, L of each row in float64) from the forward outputs
        (``camrt/logits``: the score tensor)."""

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """The target's parameters, JSON-able, for the explanation's record."""

    # Further passes (perturbed copies of an input: masked, ablated, noisy, interpolated) explain
    # the same L as the input, its parameters (a class, a region) resolved on the unperturbed input
    # as a class target's top-1 is; L and its seed are then those of each copy's own score. The
    # defaults are those of a target linear in the score (a segmentation region, a plugin's fixed
    # seed); a target that is not (a cosine, a box matched again) overrides both.
    def row_scores(self, scores: np.ndarray, seed_row: np.ndarray) -> np.ndarray:
        """L [N] of score rows [N, ...] of perturbed copies of an input whose seed row is
        `seed_row`: <seed_row, row>, the L of a target linear in the score."""
        return _inner(np.broadcast_to(seed_row, scores.shape), scores)

    def row_seeds(self, scores: np.ndarray, seed_row: np.ndarray) -> np.ndarray:
        """dL/d score [N, ...] at score rows [N, ...] of perturbed copies of an input whose seed row
        is `seed_row`: `seed_row` itself for a target linear in the score."""
        return np.broadcast_to(seed_row, scores.shape)

    @property
    def class_index(self) -> int | None:
        """The class the target explains (the record's ``target``), None when there is none."""
        return None

    def feeds(self, batch: int, num_classes: int) -> dict[str, np.ndarray]:
        raise UsageError(f"a {self.kind} target is a seed made from the forward pass, not a graph input: explain it "
                         "with Explainer.explain(..., targets=...) or ExplainSession.run_seeded")

    def select(self, rows: Sequence[int]) -> SeededTarget:
        return self  # the same target in every input

    def check(self, num_classes: int, path: str) -> None:
        """UsageError when a file with `num_classes` classes (axis 1 of its score) cannot serve it."""

    def bound(self, explainer: Any) -> SeededTarget:
        """The target with what it takes from the file resolved (`SimilarityTarget`'s concept image)."""
        return self


#: --region's name for the default region, the pixels where the class is the argmax (a file of that
#: name: ./argmax).
ARGMAX_REGION = "argmax"


@dataclass(frozen=True)
class SegmentationTarget(SeededTarget):
    """L = the sum of class `category`'s logits over a region (pytorch-grad-cam's
    `SemanticSegmentationTarget`): `region` a [H, W] weight map (nonzero: in the region), resized
    (nearest) to the logits' size; None: the pixels where `category` is the argmax."""

    category: int
    region: np.ndarray | None = field(default=None, compare=False)
    region_path: str | None = None
    kind: ClassVar[str] = "seg"

    @property
    def class_index(self) -> int:
        return self.category

    def parameters(self) -> dict[str, Any]:
        return {"class": self.category, "region": self.region_path if self.region is not None else ARGMAX_REGION}

    def check(self, num_classes: int, path: str) -> None:
        if not 0 <= self.category < num_classes:
            raise UsageError(f"--target seg:{self.category} is out of range: {path} has {num_classes} classes "
                             f"(0..{num_classes - 1})")

    def seeds(self, forward: Mapping[str, np.ndarray]) -> tuple[SeedBatch, np.ndarray]:
        logits = forward[contract.LOGITS_OUTPUT]
        if logits.ndim != 4:
            raise ModelError(f"seg targets need a [batch, classes, height, width] score; this file's is {logits.shape}")
        mask = None if self.region is None else _resized(self.region, logits.shape[2:])
        seeds = segmentation_seed(logits, self.category, mask)
        return seeds, _inner(seeds.values, logits)


@dataclass(frozen=True)
class SimilarityTarget(SeededTarget):
    """L = cos(embedding, concept) (pytorch-grad-cam's `SimilarityToConceptTarget`). concept None:
    the embedding of the image at `concept_path` by the explained file (`bound`)."""

    concept: np.ndarray | None = field(compare=False)
    concept_path: str | None = None
    kind: ClassVar[str] = "similar"

    def parameters(self) -> dict[str, Any]:
        return {"concept": self.concept_path,
                "dim": None if self.concept is None else int(np.asarray(self.concept).shape[-1])}

    def bound(self, explainer: Any) -> SimilarityTarget:
        if self.concept is not None:
            return self
        return SimilarityTarget(concept_embedding(explainer, self.concept_path), self.concept_path)

    def seeds(self, forward: Mapping[str, np.ndarray]) -> tuple[SeedBatch, np.ndarray]:
        if self.concept is None:
            raise UsageError(f"similar:{self.concept_path}: the concept image is not embedded yet; explain through "
                             "an Explainer (it runs the file on the image once)")
        embeddings = forward[contract.LOGITS_OUTPUT]
        return similarity_seed(embeddings, self.concept), cosine_similarity(embeddings, self.concept)

    def row_scores(self, scores: np.ndarray, seed_row: np.ndarray) -> np.ndarray:
        return cosine_similarity(scores, self.concept)

    def row_seeds(self, scores: np.ndarray, seed_row: np.ndarray) -> np.ndarray:
        return similarity_seed(scores, self.concept).values


@dataclass(frozen=True)
class BoxScoreTarget(SeededTarget):
    """L = sum over the raw head's candidates matching `box` (IoU > iou_threshold, label
    `label`; None: any) of IoU x class score (D-RISE's similarity; camrt/seeds/boxes.py), in every
    input. box_format: the head's boxes (cxcywh or xyxy); layout: candidates-last [B, 4 + C, N] or
    candidates-first [B, N, 4 + C]."""

    box: tuple[float, float, float, float]
    label: int | None = None
    iou_threshold: float = 0.5
    box_format: str = "cxcywh"
    layout: str = boxes.CANDIDATES_LAST
    kind: ClassVar[str] = "box"

    def __post_init__(self):
        boxes.check_box_options(self.iou_threshold, self.box_format, self.layout)

    @property
    def class_index(self) -> int | None:
        return self.label

    def parameters(self) -> dict[str, Any]:
        return {"box": list(self.box), "label": self.label, "iou_threshold": self.iou_threshold,
                "box_format": self.box_format, "layout": self.layout}

    def seeds(self, forward: Mapping[str, np.ndarray]) -> tuple[SeedBatch, np.ndarray]:
        head = forward[contract.LOGITS_OUTPUT]
        wanted = [boxes.BoxTarget(b, self.box, self.label) for b in range(head.shape[0])]
        seeds = boxes.box_seed(head, wanted, self.iou_threshold, self.box_format, layout=self.layout)
        return seeds, self.row_scores(head, seeds.values[0])

    def row_scores(self, scores: np.ndarray, seed_row: np.ndarray) -> np.ndarray:
        """Each row's candidates matched again (none matching: 0)."""
        return np.array([boxes.box_score(scores, boxes.BoxTarget(i, self.box, self.label), self.iou_threshold,
                                         self.box_format, self.layout) for i in range(scores.shape[0])])

    def row_seeds(self, scores: np.ndarray, seed_row: np.ndarray) -> np.ndarray:
        """Each row's candidates matched again (none matching: a zero row, L = 0 around it)."""
        wanted = [boxes.BoxTarget(i, self.box, self.label) for i in range(scores.shape[0])]
        return boxes.box_seed(scores, wanted, self.iou_threshold, self.box_format, layout=self.layout,
                              allow_unmatched=True).values


def _resized(region: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [H, W] region at `size` (nearest neighbour: the preprocessing resizes without cropping)."""
    region = np.asarray(region, dtype=np.float32)
    if region.ndim != 2:
        raise InputError(f"a region mask must be [H, W], got shape {region.shape}")
    rows = (np.arange(size[0]) * region.shape[0] // size[0]).astype(np.int64)
    cols = (np.arange(size[1]) * region.shape[1] // size[1]).astype(np.int64)
    return region[rows][:, cols]


def _inner(seeds: np.ndarray, score: np.ndarray) -> np.ndarray:
    """<seed row, score row> in float64: L for a seed that is dL/d score of a linear L."""
    return (seeds.astype(np.float64) * score.astype(np.float64)).reshape(len(seeds), -1).sum(axis=1)


@dataclass(frozen=True)
class SeededPasses:
    """A seeded target resolved on a batch (`seed_rows` [B, ...]: the seed of each input), for the
    further passes of a method (`camrt.execution.context.ExplainContext`): L and dL/d score of score
    rows made from batch sample `sample`."""

    target: SeededTarget
    seed_rows: np.ndarray

    def scores(self, scores: np.ndarray, sample: int) -> np.ndarray:
        return self.target.row_scores(scores, self.seed_rows[sample])

    def seeds(self, scores: np.ndarray, sample: int) -> np.ndarray:
        return self.target.row_seeds(scores, self.seed_rows[sample])


@dataclass(frozen=True)
class SeededRequest(TargetRequest):
    """One seeded target for every input (one map per input)."""

    target: SeededTarget
    explains_classes: ClassVar[bool] = False

    @property
    def ranks(self) -> list[int | None]:
        return [None]

    def targets(self, forward: Mapping[str, np.ndarray]) -> list[Target]:
        return [self.target]

    def check(self, num_classes: int, path: str) -> None:
        self.target.check(num_classes, path)

    def record_fields(self, rank: int | None = None) -> dict[str, Any]:
        return {"target_kind": self.target.kind, "target_params": self.target.parameters()}

    def bound(self, explainer: Any) -> SeededRequest:
        return SeededRequest(self.target.bound(explainer))


# -- which methods and files serve a seeded target ---------------------------------------------
def target_kinds(info: contract.ContractInfo) -> list[str]:
    """The `--target` kinds a file serves: class (N, top1, topk:K) always; with a seed entry, the
    seeded kinds whose score shape fits its score: seg [B, C, H, W], similar [B, D], box [B, 4 + C, N]."""
    if info.seed is None:
        return ["class"]
    rank = len(info.seed.get("shape", ()))
    return ["class", *{4: ["seg"], 2: ["similar"], 3: ["box"]}.get(rank, [])]


def reads_target_gradients(requires: Any) -> bool:
    """Whether a method reads gradients of the target (of a layer, the input, the biases or the
    attention maps): its backward pass then starts from the target's seed."""
    return bool(requires.gradients or requires.input_gradient or requires.bias_gradients
                or requires.attention_gradients or requires.attention_rule_gradients)


def method_refusal(method: Any) -> str | None:
    """Why `method` (a Method class or instance) cannot explain a seeded target, or None. A method
    with further passes explains one when they get the target only through `ExplainContext`
    (``scores_seeded_targets``: Score-CAM's family, Ablation-CAM, SmoothGrad, Smooth Grad-CAM++,
    Integrated Gradients)."""
    requires = method.requires
    if requires.cam_weights:
        return ("reads the target class's classifier weights (camrt/cam_weights), which a seed has not: CAM is "
                "defined for a class of a global-average-pooling + linear head (Zhou et al. 2016); gradcam equals "
                "it on such a head and serves every target")
    if requires.attention_layer_gradients:
        return ("reads the gradients of each block's own class scores (LeGrad's layer scores: the model's head "
                "applied to that block's tokens), which a seed of the model's score does not define")
    if requires.extra_passes or requires.tail:
        if getattr(method, "scores_seeded_targets", False):
            return None
        return ("runs further passes that do not declare scores_seeded_targets (getting their target only "
                "through ExplainContext.target_scores / target_gradients)")
    if not reads_target_gradients(requires):
        return "reads no gradient, so its map would not depend on the target"
    return None


# -- --target KIND:... (registered by camrt.seeds.plugin through the register_targets hook) ----
def parse_segmentation(value: str, region: str | os.PathLike | None = None) -> SeededRequest:
    """seg:CLASS, with `region` a mask image (nonzero pixels: the region; None or "argmax": the
    pixels where CLASS is the argmax)."""
    if not value.isdigit():
        raise UsageError(f"--target seg:CLASS needs a class index >= 0, got 'seg:{value}'")
    if region is None or os.fspath(region) == ARGMAX_REGION:
        return SeededRequest(SegmentationTarget(int(value)))
    return SeededRequest(SegmentationTarget(int(value), _load_region(region), os.fspath(region)))


def parse_similarity(value: str) -> SeededRequest:
    """similar:FILE.npy, the concept embedding [dim]; similar:IMAGE (any other file, e.g. cat.png):
    the embedding the explained file gives that image (`concept_embedding`)."""
    if value and not value.lower().endswith(".npy"):
        if not os.path.isfile(value):
            raise UsageError(f"--target similar:{value}: no such concept file (a .npy embedding or an image)")
        return SeededRequest(SimilarityTarget(None, value))
    return SeededRequest(SimilarityTarget(_load_concept(value), value))


def concept_embedding(explainer: Any, path: str | None) -> np.ndarray:
    """The embedding [dim] (float64) of the image at `path`: one forward pass of the explainer's file
    on it, preprocessed as the file says (as pytorch-grad-cam's tutorial embeds its concept image)."""
    from ..imaging.decode import load_image
    from ..targets import ClassTarget

    try:
        image = load_image(path)
    except InputError as exc:
        raise UsageError(f"--target similar:{path}: {exc}") from None
    x, _ = explainer.prepare([image])
    embedding = explainer.session.run(x, ClassTarget(), [contract.LOGITS_OUTPUT])[contract.LOGITS_OUTPUT][0]
    if embedding.ndim != 1 or not embedding.any():
        raise UsageError(f"--target similar:{path}: the file's score for the image is {embedding.shape}, not a nonzero "
                         "embedding [dim]")
    return embedding.astype(np.float64)


def parse_box(value: str, box_iou: float | str | None = None, box_format: str | None = None,
              box_layout: str | None = None) -> SeededRequest:
    """box:x1,y1,x2,y2[:label], in model input pixels; `box_iou` (--box-iou, default 0.5),
    `box_format` (--box-format: cxcywh or xyxy) and `box_layout` (--box-layout: candidates-last
    [B, 4 + C, N] or candidates-first [B, N, 4 + C]) describe the match and the head."""
    target = _parse_box(f"box:{value}", value)
    options: dict[str, Any] = {}
    for flag, name, given, check in (("--box-iou", "iou_threshold", box_iou, boxes.check_iou_threshold),
                                     ("--box-format", "box_format", box_format, boxes.check_box_format),
                                     ("--box-layout", "layout", box_layout, boxes.check_layout)):
        if given is None:
            continue
        try:
            options[name] = float(given) if name == "iou_threshold" else given
            check(options[name])
        except (ValueError, InputError) as exc:
            raise UsageError(f"{flag} {given!r}: {exc}") from None
    return SeededRequest(replace(target, **options))


def _load_region(path: str | os.PathLike) -> np.ndarray:
    from ..imaging.decode import load_image

    try:
        image = load_image(path)
    except InputError as exc:
        raise UsageError(f"--region {os.fspath(path)}: {exc}") from None
    region = (image.max(axis=2) > 0).astype(np.float32)
    if not region.any():
        raise UsageError(f"--region {os.fspath(path)} has no nonzero pixel: the region is empty")
    return region


def _load_concept(path: str) -> np.ndarray:
    if not path:
        raise UsageError("--target similar:FILE needs a .npy file holding the concept embedding [dim]")
    try:
        concept = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--target similar:{path}: cannot read the concept embedding ({exc})") from None
    concept = np.asarray(concept, dtype=np.float64).squeeze()
    if concept.ndim != 1 or not np.isfinite(concept).all() or not concept.any():
        raise UsageError(f"--target similar:{path}: the concept must be one finite nonzero vector [dim], "
                         f"got shape {np.shape(concept)}")
    return concept


def _parse_box(text: str, value: str) -> BoxScoreTarget:
    coordinates, _, label = value.partition(":")
    try:
        box = tuple(float(v) for v in coordinates.split(","))
        parsed_label = int(label) if label else None
    except ValueError:
        box, parsed_label = (), None
    if len(box) != 4 or not box[0] < box[2] or not box[1] < box[3] or (parsed_label is not None and parsed_label < 0):
        raise UsageError(f"--target box:x1,y1,x2,y2[:label] needs 4 numbers with x1 < x2, y1 < y2 (input pixels) "
                         f"and a class index >= 0, got {text!r}")
    return BoxScoreTarget(box, parsed_label)  # type: ignore[arg-type]
