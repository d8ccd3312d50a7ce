"""The library entry point: a contract file + a method -> heatmaps and their records.

    explainer = Explainer("model.camrt.onnx", method="gradcam")
    results = explainer.explain([rgb_image], targets=None)   # None: the top-1 class
    results[0].heatmap   # float32 [H, W] in [0, 1] at the image's resolution

An Explainer is safe to share between threads: it keeps no per-call state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import contract, postprocess
from .errors import InputError, ModelError, PluginError, UsageError
from .methods.attention import missing_attention_flag
from .methods.base import GraphOutputs, Method, _coerce
from .session import ExplainSession


@dataclass
class Explanation:
    """One explained input: the heatmap and what it explains."""

    heatmap: np.ndarray  # float32 [H, W] in [0, 1]
    target: int  # the class explained (top-1 resolved)
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
        device_postprocess: make the heatmaps inside the onnxruntime session (`camrt.fused`), so
        that only they leave the device; for methods with a ``weights_graph`` (Grad-CAM).
        graph_optimization: onnxruntime's optimisation level, "all" (fastest) or "extended" (closer to
        float64 on ill-conditioned layers), "basic", "none" (`camrt.session.GRAPH_OPTIMIZATIONS`).
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
            from .registry import build_method_registry

            registry = build_method_registry()
            cls = registry.get(method)
            self.method = cls(**method_options)
            self.method_plugin = registry.plugin_of(cls.name)
        self.layers: tuple[str, ...] = self._resolve_layers(layer)
        self.aug_smooth: bool = self._check_aug_smooth(aug_smooth)
        self.fetch: tuple[str, ...] = (
            contract.LOGITS_OUTPUT,
            contract.TARGET_INDEX_OUTPUT,
            *self.method.requires.outputs(self.layers, self.info),
        )
        self._check_outputs()
        if self.method.requires.tail:
            for name in self.layers:  # the tail graphs are cut now: a layer without one fails here
                self.session.tail_plan(name)
        self.softmax = bool(self.info.score.get("softmax", False)) if softmax is None else bool(softmax)
        self._fused = self._fused_session() if device_postprocess else None
        if self._fused is None:
            self.session.prepare(self.fetch)  # load errors surface when the file is opened, not mid-run

    def _fused_session(self):
        from . import fused

        method = self.method
        weights_graph = method.session_weights_graph()
        if weights_graph is None or self.aug_smooth or (len(self.layers) > 1 and method.layer_fusion() != "mean"):
            raise UsageError(f"method {method.name!r} cannot make its heatmaps inside the session (it has no "
                             "ONNX weights_graph, or eigen_smooth or aug_smooth is on, or it fuses several layers "
                             "other than by the mean); use device_postprocess=False")
        return self.session.prepare(
            self.fetch, name=f"heatmap:{method.name}",
            extend=lambda model: fused.heatmap_model(model, self.layers, weights_graph, method.relu))

    # -- setup ---------------------------------------------------------------------------
    @property
    def info(self) -> contract.ContractInfo:
        return self.session.info

    @property
    def num_classes(self) -> int:
        return self.session.num_classes

    def _resolve_layers(self, layer: str | Sequence[str] | None) -> tuple[str, ...]:
        requires = self.method.requires
        path = self.session.path
        if not requires.uses_layers:
            if layer:
                raise UsageError(f"method {self.method.name!r} explains the input, it takes no layer")
            return ()
        if layer is None or (not isinstance(layer, str) and len(layer) == 0):
            default = self.info.default_layer or (self.info.layers[0] if self.info.layers else None)
            if default is None:
                needs = ", ".join(what for what, needed in (
                    ("activations", requires.activations), ("gradients", requires.gradients),
                    ("CAM class weights", requires.cam_weights), ("tail graph", requires.tail)) if needed)
                rule = requires.input_gradient
                flags = ["--layer NAME", *([self._rules_flag(rule)] if rule and rule not in self.info.rule_sets else [])]
                raise ModelError(
                    f"method {self.method.name!r} needs a layer's {needs} but {path} has no layers; "
                    f"re-export it with `camrt export ... {' '.join(flags)}`"
                )
            return (default,)
        layers = (layer,) if isinstance(layer, str) else tuple(layer)
        unknown = [name for name in layers if name not in self.info.layers]
        if unknown:
            have = ", ".join(self.info.layers) or "(none)"
            flags = " ".join(f"--layer {name}" for name in unknown)
            raise ModelError(
                f"layer(s) {', '.join(unknown)} not in {path} (it has: {have}); "
                f"re-export it with `camrt export ... {flags}`"
            )
        return tuple(dict.fromkeys(layers))

    def _check_aug_smooth(self, aug_smooth: bool | str) -> bool:
        value = _coerce(aug_smooth, bool, self.method.name, "aug_smooth")
        if not isinstance(value, bool):
            raise UsageError(f"aug_smooth must be true or false, got {aug_smooth!r}")
        if value and not self.method.takes_aug_smooth():
            raise UsageError(f"aug_smooth applies to CAM-family methods (those that explain a layer, and "
                             f"fullgrad); method {self.method.name!r} does not take it")
        return value

    def _rules_flag(self, rule: str) -> str:
        """The `camrt export` flag that keeps the file's rule sets and adds `rule`."""
        return f"--rules {','.join(dict.fromkeys([*self.info.rule_sets, rule]))}"

    def _check_outputs(self) -> None:
        requires = self.method.requires
        if requires.cam_weights and self.info.cam_layers is not None:
            no_head = [layer for layer in self.layers if layer not in self.info.cam_layers]
            if no_head:
                raise ModelError(
                    f"method {self.method.name!r}: layer(s) {', '.join(no_head)} of {self.session.path} are not "
                    "followed by global average pooling and a fully connected classifier, so CAM's class "
                    "weights do not exist for them; use -m gradcam (equal to CAM on such a head) or a layer "
                    f"that feeds the pooling (with CAM weights here: {', '.join(self.info.cam_layers) or 'none'})"
                )
        missing = [name for name in self.fetch if name not in self.session.output_names]
        if requires.bias_gradients and not self.info.bias_terms:
            missing.append(contract.bias_gradient_output("<node>") + " (FullGrad's bias-gradient terms)")
        attention_flag = missing_attention_flag(requires, self.info)
        if attention_flag:
            missing.append(contract.attention_output("<map>") + " (attention maps" +
                           (" with layer-score gradients)" if requires.attention_layer_gradients else ")"))
        if not missing:
            return
        flags: list[str] = []
        for layer in self.layers:
            if any(name in missing for name in (contract.activation_output(layer), contract.gradient_output(layer),
                                                contract.cam_weights_output(layer))):
                flags.append(f"--layer {layer}")
        rule = requires.input_gradient
        if rule is not None and contract.input_gradient_output(rule) in missing:
            flags.append(self._rules_flag(rule))
        if requires.bias_gradients and not self.info.bias_terms:
            flags.append("--fullgrad")
        if attention_flag:
            flags.append(attention_flag)
        raise ModelError(
            f"method {self.method.name!r} needs output(s) {', '.join(missing)}, which {self.session.path} "
            f"lacks; re-export it with `camrt export ... {' '.join(flags)}`"
        )

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
        from .images import check_image, preprocess

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

    def _targets(self, targets: Any, batch: int) -> list[int]:
        if targets is None:
            return [contract.TOP1_TARGET] * batch
        if isinstance(targets, (bool, np.bool_, str, bytes)) or not isinstance(targets, (int, np.integer, Iterable)):
            raise InputError(f"targets must be None, an integer or one integer per input, got {targets!r}")
        if isinstance(targets, (int, np.integer)):
            return [int(targets)] * batch
        targets = list(targets)
        if any(isinstance(t, (bool, np.bool_)) for t in targets):
            raise InputError(f"targets must be integers, got {targets!r}")
        return [contract.TOP1_TARGET if t is None else t for t in targets]

    def _raw_maps(self, outputs: GraphOutputs) -> list[np.ndarray]:
        """The method's checked raw maps, one [B, h, w] array per explained layer."""
        return [self._checked(self.method.explain(outputs, layer=layer), layer, outputs)
                for layer in (self.layers or (None,))]

    def _augmented_raw_maps(self, x: np.ndarray, targets: np.ndarray,
                            raw: list[np.ndarray]) -> list[tuple[bool, list[np.ndarray]]]:
        """(flip, raw maps) for each augmented copy of the input (aug_smooth); the unchanged copy
        reuses `raw`. Every copy explains the class resolved for the original input (for top-1,
        pytorch-grad-cam takes each copy's own top-1 instead)."""
        from .context import ExplainContext

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
        input size). targets: None (top-1 for all), one int for all, or one per image
        (an int, or -1/None for top-1).
        """
        x, sizes = self.prepare(images)
        return self._explain_prepared(x, sizes, self._targets(targets, x.shape[0]))

    def explain_top_k(self, images: Any, k: int) -> list[list[Explanation]]:
        """For each image, explanations of its k highest-scoring classes, best first.

        Ties rank the lower class index first (as ArgMax, and so top-1, does). The class order
        comes from one forward pass; each rank is then explained like `explain` with those targets.
        """
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_classes:
            raise UsageError(f"top-k: k must be in 1..{self.num_classes} (the model's classes), got {k!r}")
        x, sizes = self.prepare(images)
        logits = self.session.run(x, [contract.TOP1_TARGET] * x.shape[0], [contract.LOGITS_OUTPUT])[
            contract.LOGITS_OUTPUT]
        ranked = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        by_rank = [self._explain_prepared(x, sizes, ranked[:, rank].tolist()) for rank in range(int(k))]
        return [[by_rank[rank][i] for rank in range(int(k))] for i in range(x.shape[0])]

    def _explain_prepared(self, x: np.ndarray, sizes: list[tuple[int, int]], targets: list[int]) -> list[Explanation]:
        if self._fused is not None:
            return self._explain_fused(x, targets, sizes)
        values = self.session.run(x, targets, self.fetch)
        from .context import ExplainContext

        context = ExplainContext(self.session, x, values[contract.TARGET_INDEX_OUTPUT])
        outputs = GraphOutputs(values, x, context)
        relu, fusion = self.method.relu, self.method.layer_fusion()
        raw = self._raw_maps(outputs)
        if not self.aug_smooth:
            heatmaps = [postprocess.finalize([maps[i] for maps in raw], size, apply_relu=relu, fusion=fusion)
                        for i, size in enumerate(sizes)]
        else:
            augmented = self._augmented_raw_maps(x, outputs.target_index.astype(np.int64), raw)
            heatmaps = [postprocess.merge_augmented([
                (flip, postprocess.finalize([maps[i] for maps in maps_t], size, apply_relu=relu, fusion=fusion))
                for flip, maps_t in augmented]) for i, size in enumerate(sizes)]
        return self._explanations(values, heatmaps, context.extra)

    def _explain_fused(self, x: np.ndarray, targets: list, sizes: list[tuple[int, int]]) -> list[Explanation]:
        """One session run per distinct heatmap size (one run when the images share a size)."""
        from . import fused

        fetch = [fused.HEATMAP_OUTPUT, contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT]
        heatmaps: list = [None] * len(sizes)
        values = {name: [None] * len(sizes) for name in fetch[1:]}
        for size in dict.fromkeys(sizes):
            rows = [i for i, s in enumerate(sizes) if s == size]
            got = self.session.run(x[rows], [targets[i] for i in rows], fetch, session=self._fused,
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
