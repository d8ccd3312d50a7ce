"""Run metrics over images x methods: the engine of `camrt eval` (and its Python API).

    evaluation = Evaluation("model.camrt.onnx", ["gradcam", "saliency"], ["deletion", "confidence"])
    for record in evaluation.run([("cat.png", rgb_uint8)]):   # one record per image and method
        ...
    evaluation.summary()   # method -> field -> mean over the images
    evaluation.close()

Methods are run one after the other (one Explainer, hence one onnxruntime session, at a time);
for each chunk of images the method explains the preprocessed batch once and every metric scores
those heatmaps, running its perturbed inputs through the same session (`ExplainContext.forward`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import CamrtError, UsageError
from .base import EvalBatch, Metric


def _unique(names: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UsageError(f"no {what} given")
    return list(dict.fromkeys(names))


class Evaluation:
    """Methods x metrics on one contract file.

    metric_options: canonical metric name -> options (text values are parsed as the CLI's);
    method_options: method name -> options; score: "probability" or "logit"; batch_size: perturbed
    inputs per onnxruntime run; images_per_batch: images explained together; keep_maps: keep each
    heatmap (model input resolution) in `maps` for figures.
    """

    def __init__(self, model: str, methods: Sequence[str], metrics: Sequence[str], *,
                 metric_options: Mapping[str, Mapping[str, Any]] | None = None,
                 method_options: Mapping[str, Mapping[str, Any]] | None = None,
                 layers: Sequence[str] | None = None, device: str = "auto", threads: int | None = None,
                 score: str = "probability", batch_size: int = 32, images_per_batch: int = 8,
                 keep_maps: bool = False, graph_optimization: str = "all"):
        from ..plugins.registry import build_method_registry, build_metric_registry

        method_registry = build_method_registry()
        self._method_classes = {cls.name: cls for cls in (method_registry.get(n) for n in _unique(methods, "methods"))}
        self.methods = list(self._method_classes)
        registry = build_metric_registry()
        classes = list(dict.fromkeys(registry.get(name) for name in _unique(metrics, "metrics")))
        metric_options = dict(metric_options or {})
        unknown = [key for key in metric_options if registry.get(key) not in classes]
        if unknown:
            raise UsageError(f"options given for metric(s) {', '.join(unknown)}, which are not evaluated")
        options_of = {registry.get(key).name: value for key, value in metric_options.items()}
        self.metrics: list[Metric] = [cls(**options_of.get(cls.name, {})) for cls in classes]
        self.method_options = {method_registry.get(k).name: dict(v) for k, v in (method_options or {}).items()}
        unused = [k for k in self.method_options if k not in self.methods]
        if unused:
            raise UsageError(f"options given for method(s) {', '.join(unused)}, which are not evaluated")
        self.model, self.layers, self.device, self.threads = model, list(layers or []) or None, device, threads
        self.graph_optimization = graph_optimization
        self.score, self.batch_size, self.images_per_batch = score, batch_size, images_per_batch
        if images_per_batch < 1:
            raise UsageError(f"images_per_batch must be >= 1, got {images_per_batch}")
        self.keep_maps = keep_maps
        #: input name -> method -> heatmap [H, W] (when keep_maps).
        self.maps: dict[str, dict[str, np.ndarray]] = {}
        self.records: list[dict[str, Any]] = []

    @property
    def fields(self) -> dict[str, str]:
        """Every scalar result of the metrics -> "higher" or "lower" is better."""
        return {name: better for metric in self.metrics for name, better in metric.fields.items()}

    def _explainer(self, method: str):
        from ..explainer import Explainer

        # --layer concerns the methods that explain a layer; the input-space ones take none
        uses_layers = self._method_classes[method].requires.uses_layers
        return Explainer(self.model, method=method, device=self.device, threads=self.threads,
                         layer=self.layers if uses_layers else None, graph_optimization=self.graph_optimization,
                         **self.method_options.get(method, {}))

    def _reexplainer(self, explainer: Any):
        """path -> an Explainer of `explainer`'s method instance (same options and layers) for that file."""
        from ..explainer import Explainer

        layers = list(explainer.layers) or None
        return lambda path: Explainer(path, method=explainer.method, device=self.device, threads=self.threads,
                                      layer=layers, graph_optimization=self.graph_optimization)

    def run(self, inputs: Iterable[tuple[str, np.ndarray | CamrtError]]) -> Iterator[dict[str, Any]]:
        """inputs: (name, HWC uint8 RGB image, or the error that loading it raised). One record per
        input and method, methods outermost."""
        inputs = list(inputs)
        for method in self.methods:
            explainer = self._explainer(method)
            for start in range(0, len(inputs), self.images_per_batch):
                yield from self._chunk(explainer, inputs[start:start + self.images_per_batch])

    def _chunk(self, explainer: Any, chunk: list[tuple[str, Any]]) -> Iterator[dict[str, Any]]:
        from ..execution.context import ExplainContext

        layer = ",".join(explainer.layers) if explainer.layers else None
        base = [{"input": name, "method": explainer.method.name, "layer": layer, "status": "ok", "error": None}
                for name, _ in chunk]
        good = [i for i, (_, image) in enumerate(chunk) if isinstance(image, np.ndarray)]
        for i, (_, image) in enumerate(chunk):
            if i not in good:
                base[i].update(status="error", error=str(image))
        if good:
            names = [chunk[i][0] for i in good]
            images = [chunk[i][1] for i in good]
            x, _ = explainer.prepare(images)
            results = explainer.explain(x)
            targets = np.array([r.target for r in results], dtype=np.int64)
            batch = EvalBatch(
                inputs=x, heatmaps=np.stack([r.heatmap for r in results]), targets=targets,
                context=ExplainContext(explainer.session, x, targets), score=self.score,
                batch_size=self.batch_size, names=names, images=images, explainer=explainer,
                reexplainer=self._reexplainer(explainer),
            )
            clean = batch.clean_scores()
            per_metric = [metric.evaluate(batch) for metric in self.metrics]
            for k, i in enumerate(good):
                record = base[i]
                record.update(target=int(targets[k]), label=results[k].label, score=float(clean[k]),
                              score_type=self.score)
                for values in per_metric:
                    record.update(values[k])
                if self.keep_maps:
                    self.maps.setdefault(names[k], {})[explainer.method.name] = batch.heatmaps[k]
        for record in base:
            self.records.append(record)
            yield record

    def summary(self) -> dict[str, dict[str, Any]]:
        """method -> {field: mean over the images where it is defined, "images": count of ok records}."""
        table: dict[str, dict[str, Any]] = {}
        for method in self.methods:
            ok = [r for r in self.records if r["method"] == method and r["status"] == "ok"]
            row: dict[str, Any] = {"images": len(ok)}
            for name in self.fields:
                values = [r[name] for r in ok if r.get(name) is not None]
                row[name] = float(np.mean(values)) if values else None
            table[method] = row
        return table

    def summary_table(self) -> str:
        """The summary as a fixed-width text table (arrows: which way is better)."""
        fields = self.fields
        header = ["method", "images", *(f"{name} {'↑' if better == 'higher' else '↓'}" for name, better in fields.items())]
        rows = [header]
        for method, row in self.summary().items():
            rows.append([method, str(row["images"]),
                         *("-" if row[name] is None else f"{row[name]:.4f}" for name in fields)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)

    def close(self) -> None:
        for metric in self.metrics:
            metric.close()
