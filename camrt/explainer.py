"""The library entry point: a contract file + a method -> heatmaps and their records.

    explainer = Explainer("model.camrt.onnx", method="gradcam")
    results = explainer.explain([rgb_image], targets=None)   # None: the top-1 class
    results[0].heatmap   # float32 [H, W] in [0, 1] at the image's resolution

An Explainer is safe to share between threads: it keeps no per-call state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import contract, postprocess
from .errors import InputError, PluginError, UsageError
from .execution.session import ExplainSession
from .methods.base import GraphOutputs, Method, _coerce
from .plan import ExplainPlan
from .seeded_explain import StackedMap, seeded_maps, stacked_maps, stacks_targets
from .seeds.targets import SeededTarget
from .targets import ClassTarget, Target, TargetRequest, TopKRequest, as_target


@dataclass
class Explanation:
    """One explained input: the heatmap and what it explains."""

    heatmap: np.ndarray  # float32 [H, W] in [0, 1]
    target: int | None  # the class explained (top-1 resolved); None for a seeded target without a class
    score: float | None  # the logit of the target (None if not finite)
    probability: float | None  # softmax of the logits at the target (model ends in a softmax, or softmax=True)
    label: str | None  # the target's class name, when the file has labels
    layer: str | None  # the explained layer(s), comma-joined; None for layer-free methods
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON-able fields (everything but the heatmap)."""
        return {
            "method": self.method,
            "layer": self.layer,
            "target": self.target,
            "label": self.label,
            "score": self.score,
            "probability": self.probability,
            **self.extra,
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None


class Explainer:
    """A contract file opened for one method (and its layers)."""

    def __init__(
        self,
        path: str | os.PathLike,
        method: str | Method = "gradcam",
        device: str = "auto",
        threads: int | None = None,
        layer: str | Sequence[str] | None = None,
        softmax: bool | None = None,
        custom_op_libraries: Sequence[str | os.PathLike] | None = None,
        aug_smooth: bool | str = False,
        device_postprocess: bool = False,
        graph_optimization: str = "all",
        **method_options: Any,
    ):
        """softmax: give each result the softmax probability of its target; None: when the file's
        model ends in a softmax (its score metadata says so). custom_op_libraries: onnxruntime
        custom-op libraries the file may use (refused otherwise). aug_smooth: average the heatmaps
        of flipped and scaled copies of the input (pytorch-grad-cam's test-time augmentation,
        `camrt.postprocess.AUGMENTATIONS`; 6x the cost); CAM-family methods and FullGrad only.
        device_postprocess: make the heatmaps inside the onnxruntime session (`camrt.execution.heatmap_graph`), so
        that only they leave the device; for methods with a ``weights_graph`` (Grad-CAM).
        graph_optimization: onnxruntime's optimisation level, "all" (fastest) or "extended" (closer to
        float64 on ill-conditioned layers), "basic", "none" (`camrt.execution.session.GRAPH_OPTIMIZATIONS`).
        Other keyword arguments are the method's options."""
        self.session = ExplainSession(path, device=device, threads=threads, custom_op_libraries=custom_op_libraries,
                                      graph_optimization=graph_optimization)
        if isinstance(method, Method):
            if method_options:
                raise UsageError("give method options to the method instance, not to the Explainer")
            self.method = method
            #: Who provides the method: the registering plugin's name, or the class's module.
            self.method_plugin = type(method).__module__
        else:
            from .plugins.registry import build_method_registry

            registry = build_method_registry()
            cls = registry.get(method)
            self.method = cls(**method_options)
            self.method_plugin = registry.plugin_of(cls.name)
        #: What this file offers the method: the layers, the fetched outputs (`camrt.plan`).
        self.plan = ExplainPlan.build(self.info, self.session.output_names, self.method, layer=layer,
                                     path=self.session.path)
        self.aug_smooth: bool = self._check_aug_smooth(aug_smooth)
        if self.plan.tail:
            for name in self.layers:  # the tail graphs are cut now: a layer without one fails here
                self.session.tail_plan(name)
        self.softmax = bool(self.info.score.get("softmax", False)) if softmax is None else bool(softmax)
        self._fused = self._fused_session() if device_postprocess else None
        if self._fused is None:
            self.session.prepare(self.fetch)  # load errors surface when the file is opened, not mid-run

    def _fused_session(self):
        from .execution import heatmap_graph as fused

        method = self.method
        weights_graph = method.session_weights_graph()
        if weights_graph is None or self.aug_smooth or (len(self.layers) > 1 and method.layer_fusion() != "mean"):
            raise UsageError(f"method {method.name!r} cannot make its heatmaps inside the session (it has no "
                             "ONNX weights_graph, or eigen_smooth or aug_smooth is on, or it fuses several layers "
                             "other than by the mean); use device_postprocess=False")
        return self.session.prepare(
            self.fetch, name=f"heatmap:{method.name}",
            extend=lambda model: fused.heatmap_model(model, self.layers, weights_graph, method.relu,
                                                     self.info.layer_layouts))

    # -- setup ---------------------------------------------------------------------------
    @property
    def info(self) -> contract.ContractInfo:
        return self.session.info

    @property
    def layers(self) -> tuple[str, ...]:
        return self.plan.layers

    @property
    def fetch(self) -> tuple[str, ...]:
        return self.plan.fetch

    @property
    def num_classes(self) -> int:
        return self.session.num_classes

    def _check_aug_smooth(self, aug_smooth: bool | str) -> bool:
        value = _coerce(aug_smooth, bool, self.method.name, "aug_smooth")
        if not isinstance(value, bool):
            raise UsageError(f"aug_smooth must be true or false, got {aug_smooth!r}")
        if value and not self.method.takes_aug_smooth():
            raise UsageError(f"aug_smooth applies to CAM-family methods (those that explain a layer, and "
                             f"fullgrad); method {self.method.name!r} does not take it")
        return value

    # -- explaining ----------------------------------------------------------------------
    def _checked(self, maps: Any, layer: str | None, outputs: GraphOutputs) -> np.ndarray:
        """The method's raw maps, or PluginError naming the method and its plugin.

        The boundary between camrt and method code: raw maps must be a real-valued [B, h, w]
        array, one map per input, and finite (postprocessing would turn a NaN into a NaN heatmap).
        """
        batch = outputs.inputs.shape[0]
        who = f"method {self.method.name!r} (plugin {self.method_plugin!r}) returned"
        where = f"for layer {layer!r}" if layer is not None else "for the input"
        if not isinstance(maps, np.ndarray) or maps.ndim != 3 or maps.shape[0] != batch or 0 in maps.shape:
            raise PluginError(
                f"{who} {getattr(maps, 'shape', type(maps).__name__)} {where}; "
                f"expected raw maps [B, h, w] with B = {batch}"
            )
        if maps.dtype.kind not in "fiu":
            raise PluginError(f"{who} raw maps of dtype {maps.dtype} {where}; expected real numbers (float32)")
        bad = int(np.count_nonzero(~np.isfinite(maps)))
        if bad:  # the session refuses non-finite model outputs, so this is the method's doing
            raise PluginError(f"{who} {bad} non-finite value(s) (NaN or inf) in raw maps {maps.shape} {where}; "
                              "its inputs were finite")
        return maps

    def prepare(self, images: Any) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(NCHW float32 model input, the (H, W) each heatmap is returned at)."""
        from .imaging.decode import check_image
        from .imaging.preprocess import preprocess

        if isinstance(images, np.ndarray) and images.ndim == 4 and np.issubdtype(images.dtype, np.floating):
            x = self.session.check_inputs(images)
            return x, [tuple(x.shape[2:])] * x.shape[0]
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3:
            images = [images]
        elif isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray):
            raise InputError(
                f"images: expected HWC uint8 RGB images or an NCHW float32 batch, got {images.dtype} {images.shape}"
            )
        images = [check_image(image, f"image {i}") for i, image in enumerate(images)]
        if not images:
            raise InputError("no images to explain")
        return preprocess(images, self.info.preprocessing), [image.shape[:2] for image in images]

    def _raw_maps(self, outputs: GraphOutputs) -> list[np.ndarray]:
        """The method's checked raw maps, one [B, h, w] array per explained layer."""
        return [self._checked(self.method.explain(outputs, layer=layer), layer, outputs)
                for layer in (self.layers or (None,))]

    def _augmented_raw_maps(self, x: np.ndarray, targets: np.ndarray,
                            raw: list[np.ndarray]) -> list[tuple[bool, list[np.ndarray]]]:
        """(flip, raw maps) for each augmented copy of the input (aug_smooth); the unchanged copy
        reuses `raw`. Every copy explains the class resolved for the original input (for top-1,
        pytorch-grad-cam takes each copy's own top-1 instead)."""
        from .execution.context import ExplainContext

        augmented = []
        for flip, factor in postprocess.AUGMENTATIONS:
            if not flip and factor == 1.0:
                augmented.append((flip, raw))
                continue
            x_aug = postprocess.augment(x, flip, factor)
            values = self.session.run(x_aug, targets, self.fetch)
            augmented.append((flip, self._raw_maps(GraphOutputs(values, x_aug, ExplainContext(self.session, x_aug, targets)))))
        return augmented

    def explain(self, images: Any, targets: Any = None) -> list[Explanation]:
        """Explain a batch.

        images: a list of HWC uint8 RGB arrays (preprocessed as the file says; heatmaps at each
        image's resolution) or an NCHW float32 array already preprocessed (heatmaps at the model
        input size). targets: None (top-1 for all), one int for all, one per image
        (an int, or -1/None for top-1), or a `camrt.targets.Target` (a seeded one,
        `camrt.seeds.targets`: segmentation region, concept similarity, detection box).
        """
        x, sizes = self.prepare(images)
        return self._explain_prepared(x, sizes, as_target(targets))

    def explain_top_k(self, images: Any, k: int) -> list[list[Explanation]]:
        """For each image, explanations of its k highest-scoring classes, best first.

        Ties rank the lower class index first (as ArgMax, and so top-1, does). The class order
        comes from one forward pass; each rank is then explained like `explain` with those targets,
        or all ranks by one batched backward pass (`explain_request`).
        """
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_classes:
            raise UsageError(f"top-k: k must be in 1..{self.num_classes} (the model's classes), got {k!r}")
        return self.explain_request(images, TopKRequest(int(k)))

    def explain_request(self, images: Any, request: TargetRequest) -> list[list[Explanation]]:
        """For each image, one explanation per target of `request` (`camrt.targets`: a class, the
        top-1, the top k, a class list, the classes above a threshold, seeded targets), in its rank
        order; an image the request gives no target (none above a threshold) gets an empty list.

        Several targets per image on a file with a seed entry, with a method that reads only
        gradients: one forward pass and one backward pass of all (image, target) seed rows
        (`camrt.seeded_explain.stacked_maps`). Otherwise the targets come from one forward pass
        when the request reads one, and each rank is explained like `explain`."""
        if request.explains_classes:
            self._require_class_scores()
        x, sizes = self.prepare(images)
        request = request.bound(self)
        if request.ranks != [None] and stacks_targets(self):
            by_image: list[list[Explanation]] = [[] for _ in sizes]
            for stacked in stacked_maps(self, x, sizes, request):
                by_image[stacked.sample].append(self._stacked_explanation(stacked))
            return by_image
        forward = self.session.run(x, ClassTarget(), request.forward_outputs) if request.forward_outputs else {}
        by_rank = [self._explain_rows(x, sizes, target) for target in request.targets(forward)]
        return [[explained[i] for explained in by_rank if explained[i] is not None] for i in range(x.shape[0])]

    def _explain_rows(self, x: np.ndarray, sizes: list[tuple[int, int]], target: Target) -> list[Explanation | None]:
        """`_explain_prepared` of the inputs the target explains (`Target.rows`); None for the others."""
        rows = target.rows(x.shape[0])
        if len(rows) == x.shape[0]:
            return list(self._explain_prepared(x, sizes, target))
        explained: list[Explanation | None] = [None] * x.shape[0]
        if rows:
            for i, result in zip(rows, self._explain_prepared(x[rows], [sizes[i] for i in rows], target.select(rows))):
                explained[i] = result
        return explained

    def _stacked_explanation(self, stacked: StackedMap) -> Explanation:
        if isinstance(stacked.target, SeededTarget):
            return self._seeded_explanation(stacked.target, stacked.heatmap, stacked.score, stacked.extra)
        probability = _finite(float(_softmax(stacked.class_scores)[stacked.target])) if self.softmax else None
        return self._explanation(stacked.heatmap, stacked.target, _finite(stacked.score), probability, stacked.extra)

    def _explanation(self, heatmap: np.ndarray, index: int | None, score: float | None, probability: float | None,
                     extra: dict[str, Any]) -> Explanation:
        labels = self.info.labels
        return Explanation(heatmap=heatmap, target=index, score=score, probability=probability,
                           label=labels[index] if labels and index is not None and 0 <= index < len(labels) else None,
                           layer=",".join(self.layers) if self.layers else None, method=self.method.name,
                           extra=extra)

    def _explain_prepared(self, x: np.ndarray, sizes: list[tuple[int, int]], target: Target) -> list[Explanation]:
        if isinstance(target, SeededTarget):  # a seed made from the forward pass (camrt.seeds.targets)
            return self._explain_seeded(x, sizes, target.bound(self))
        self._require_class_scores()
        if self._fused is not None:
            return self._explain_fused(x, target, sizes)
        values = self.session.run(x, target, self.fetch)
        from .execution.context import ExplainContext

        context = ExplainContext(self.session, x, values[contract.TARGET_INDEX_OUTPUT])
        outputs = GraphOutputs(values, x, context)
        raw = self._raw_maps(outputs)
        if not self.aug_smooth:
            heatmaps = self._heatmaps(raw, sizes)
        else:
            augmented = self._augmented_raw_maps(x, outputs.target_index.astype(np.int64), raw)
            per_flip = [(flip, self._heatmaps(maps_t, sizes)) for flip, maps_t in augmented]
            heatmaps = [postprocess.merge_augmented([(flip, maps[i]) for flip, maps in per_flip])
                        for i in range(len(sizes))]
        return self._explanations(values, heatmaps, context.extra)

    def _require_class_scores(self) -> None:
        """UsageError unless the file's score is [batch, classes]: a class target of a seeded file's
        segmentation map, detection head or embedding has no meaning."""
        shape = self.session.score_shape
        if len(shape) != 2:
            shown = "[" + ", ".join(str(d) for d in shape) + "]"
            raise UsageError(
                f"{self.session.path}: its score {self.info.score.get('tensor')!r} is {shown}, not class scores "
                "[batch, classes], so a class target (the default top-1, an index, topk:, a class list) has "
                "no meaning: give a seeded target, --target seg:C (segmentation), box:X1,Y1,X2,Y2[:LABEL] "
                "(detection head) or similar:FILE (embedding)")

    def _heatmaps(self, raw: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Each input's heatmap at its size, from the method's raw maps (one [B, h, w] per layer)."""
        relu, fusion = self.method.relu, self.method.layer_fusion()
        return [postprocess.finalize([maps[i] for maps in raw], size, apply_relu=relu, fusion=fusion)
                for i, size in enumerate(sizes)]

    def _explain_seeded(self, x: np.ndarray, sizes: list[tuple[int, int]], target: SeededTarget) -> list[Explanation]:
        return [self._seeded_explanation(target, heatmap, score, extra)
                for heatmap, score, extra in seeded_maps(self, x, sizes, target)]

    def _seeded_explanation(self, target: SeededTarget, heatmap: np.ndarray, score: float,
                            extra: dict[str, Any]) -> Explanation:
        return self._explanation(heatmap, target.class_index, _finite(score), None,
                                 {**extra, "target_kind": target.kind, "target_params": target.parameters()})

    def _explain_fused(self, x: np.ndarray, target: Target, sizes: list[tuple[int, int]]) -> list[Explanation]:
        """One session run per distinct heatmap size (one run when the images share a size)."""
        from .execution import heatmap_graph as fused

        fetch = [fused.HEATMAP_OUTPUT, contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT]
        heatmaps: list = [None] * len(sizes)
        values = {name: [None] * len(sizes) for name in fetch[1:]}
        for size in dict.fromkeys(sizes):
            rows = [i for i, s in enumerate(sizes) if s == size]
            got = self.session.run(x[rows], target.select(rows), fetch, session=self._fused,
                                   fixed={fused.SIZE_INPUT: np.asarray(size, dtype=np.int64)})
            for j, i in enumerate(rows):
                heatmaps[i] = got[fused.HEATMAP_OUTPUT][j]
                for name in fetch[1:]:
                    values[name][i] = got[name][j]
        return self._explanations({k: np.stack(v) for k, v in values.items()}, heatmaps, {})

    def _explanations(self, values, heatmaps: list[np.ndarray], extra: dict) -> list[Explanation]:
        method = self.method
        logits = values[contract.LOGITS_OUTPUT]
        target_index = values[contract.TARGET_INDEX_OUTPUT].astype(np.int64)
        probabilities = _softmax(logits) if self.softmax else None
        labels = self.info.labels
        layer_field = ",".join(self.layers) if self.layers else None
        results = []
        for i, heatmap in enumerate(heatmaps):
            target = int(target_index[i])
            results.append(Explanation(
                heatmap=heatmap,
                target=target,
                score=_finite(float(logits[i, target])),
                probability=_finite(float(probabilities[i, target])) if probabilities is not None else None,
                label=labels[target] if labels and 0 <= target < len(labels) else None,
                layer=layer_field,
                method=method.name,
                extra={key: value[i] for key, value in extra.items()},
            ))
        return results
