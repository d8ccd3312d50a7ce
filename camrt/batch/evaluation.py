"""Run metrics over images x methods: the engine of `camrt eval` (and its Python API).

    evaluation = Evaluation("model.camrt.onnx", ["gradcam", "saliency"], ["deletion", "confidence"])
    for record in evaluation.run([("cat.png", rgb_uint8)]):   # one record per image and method
        ...
    evaluation.run(lambda: decode_inputs(paths))   # inputs read again for each method
    evaluation.summary()   # method -> field -> mean over the images
    evaluation.close()

Methods are run one after the other (one Explainer, hence one onnxruntime session, at a time), and
for each the inputs are read again, `images_per_batch` at a time: a chunk is explained, scored by
every metric and handed on before the next one is read, and the summary is kept as running means,
so memory grows neither with the number of inputs nor with the number of methods. Each method
explains a chunk's preprocessed batch once and every metric scores those heatmaps, running its
perturbed inputs through the same session (`ExplainContext.forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CamrtError, InputError, ModelError, UsageError
from ..metrics.base import EvalBatch, Metric
from .inputs import chunked
from .isolate import isolate_failures

#: An input of an evaluation: its name and its HWC uint8 RGB image, or the error reading it raised.
EvalInput = tuple[str, "np.ndarray | CamrtError"]
#: The inputs, read once per method: a list (any iterable that can be iterated again), or a function
#: returning a fresh iterator of them (e.g. ``lambda: decode_inputs(paths)``).
EvalInputs = Iterable[EvalInput] | Callable[[], Iterable[EvalInput]]


@dataclass
class EvaluatedChunk:
    """One chunk of inputs evaluated by one method."""

    method: str
    #: The position of the chunk's first input among all inputs.
    start: int
    inputs: list[EvalInput]
    #: One record per input, in input order.
    records: list[dict[str, Any]]
    #: Per input: its heatmap [H, W] at the model input's resolution (keep_maps, readable inputs), else None.
    maps: list[np.ndarray | None] = field(default_factory=list)


@dataclass
class _Mean:
    """A running mean (the summary's)."""

    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total += float(value)
        self.count += 1

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


def _evaluate(metric: Metric, batch: EvalBatch) -> list[dict[str, Any] | CamrtError]:
    """The metric's results per image, or the error of each image it failed for: an InputError only
    that image's (camrt/batch/isolate.py), a ModelError (it cannot run on this method's file) every image's."""
    try:
        return isolate_failures(lambda rows: metric.evaluate(batch.rows(rows)), range(len(batch)))
    except ModelError as exc:
        return [exc] * len(batch)


def _reader(inputs: EvalInputs, passes: int) -> Callable[[], Iterable[EvalInput]]:
    """A function giving the inputs afresh for each pass; a one-shot iterator serves one pass only."""
    if callable(inputs):
        return inputs
    if passes > 1 and iter(inputs) is inputs:
        raise UsageError("the inputs are read once per method, and an iterator can be read only once: give a "
                         "list, or a function that returns a fresh iterator (e.g. lambda: decode_inputs(paths))")
    return lambda: inputs


def _unique(names: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UsageError(f"no {what} given")
    return list(dict.fromkeys(names))


class Evaluation:
    """Methods x metrics on one contract file.

    metric_options: canonical metric name -> options (text values are parsed as the CLI's);
    method_options: method name -> options; score: "probability" or "logit"; batch_size: perturbed
    inputs per onnxruntime run; images_per_batch: images explained and scored together (a chunk);
    keep_maps: hand each chunk's heatmaps (model input resolution) on in `EvaluatedChunk.maps`, for
    figures.
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
        #: method -> its ok records so far and the running mean of each field (the summary).
        self._images = dict.fromkeys(self.methods, 0)
        self._means = {method: {name: _Mean() for name in self.fields} for method in self.methods}

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

    def run(self, inputs: EvalInputs) -> Iterator[dict[str, Any]]:
        """inputs: (name, HWC uint8 RGB image, or the error that loading it raised), see `EvalInputs`.
        One record per input and method, methods outermost."""
        for chunk in self.run_chunks(inputs):
            yield from chunk.records

    def run_chunks(self, inputs: EvalInputs) -> Iterator[EvaluatedChunk]:
        """For each method in turn, its chunks of `images_per_batch` inputs, each read only when the
        previous one has been handed on."""
        read = _reader(inputs, len(self.methods))
        for method in self.methods:
            explainer = self._explainer(method)
            start = 0
            for chunk in chunked(read(), self.images_per_batch):
                yield self._chunk(explainer, start, chunk)
                start += len(chunk)
            del explainer  # let this method's session go before the next one is made

    def _chunk(self, explainer: Any, start: int, chunk: list[EvalInput]) -> EvaluatedChunk:
        layer = ",".join(explainer.layers) if explainer.layers else None
        base = [{"input": name, "method": explainer.method.name, "layer": layer, "status": "ok", "error": None}
                for name, _ in chunk]
        evaluated = EvaluatedChunk(explainer.method.name, start, chunk, base, [None] * len(chunk))
        good = [i for i, (_, image) in enumerate(chunk) if isinstance(image, np.ndarray)]
        for i, (_, image) in enumerate(chunk):
            if i not in good:
                base[i].update(status="error", error=str(image))
        if good:
            x, _ = explainer.prepare([chunk[i][1] for i in good])
            results = isolate_failures(lambda rows: explainer.explain(x[list(rows)]), range(len(good)))
            for i, result in zip(good, results):
                if isinstance(result, InputError):
                    base[i].update(status="error", error=str(result))
            explained = [k for k, result in enumerate(results) if not isinstance(result, InputError)]
            if explained:
                self._score([good[k] for k in explained], x[explained], [results[k] for k in explained],
                            explainer, chunk, evaluated)
        return evaluated

    def _score(self, positions: list[int], x: np.ndarray, results: list[Any], explainer: Any,
               chunk: list[EvalInput], evaluated: EvaluatedChunk) -> None:
        """Every metric on the explained inputs at `positions` of the chunk, into their records. A metric
        that fails for an input (e.g. a randomized model's NaN) leaves its fields None and says why in
        the record's ``metric_errors``; the input's other metrics stand."""
        from ..execution.context import ExplainContext

        targets = np.array([r.target for r in results], dtype=np.int64)
        batch = EvalBatch(
            inputs=x, heatmaps=np.stack([r.heatmap for r in results]), targets=targets,
            context=ExplainContext(explainer.session, x, targets), score=self.score,
            batch_size=self.batch_size, names=[chunk[i][0] for i in positions],
            images=[chunk[i][1] for i in positions], explainer=explainer, reexplainer=self._reexplainer(explainer),
        )
        clean = batch.clean_scores()
        per_metric = [(metric, _evaluate(metric, batch)) for metric in self.metrics]
        for k, i in enumerate(positions):
            record = evaluated.records[i]
            record.update(target=int(targets[k]), label=results[k].label, score=float(clean[k]),
                          score_type=self.score)
            for metric, values in per_metric:
                if isinstance(values[k], CamrtError):
                    record.update(dict.fromkeys(metric.fields))
                    record.setdefault("metric_errors", {})[metric.name] = str(values[k])
                else:
                    record.update(values[k])
            self._count(record)
            if self.keep_maps:
                evaluated.maps[i] = batch.heatmaps[k]
        return evaluated

    def _count(self, record: dict[str, Any]) -> None:
        """Add an ok record to the summary's running means."""
        method = record["method"]
        self._images[method] += 1
        for name, mean in self._means[method].items():
            if record.get(name) is not None:
                mean.add(record[name])

    def summary(self) -> dict[str, dict[str, Any]]:
        """method -> {field: mean over the images where it is defined, "images": count of ok records}."""
        return {method: {"images": self._images[method],
                         **{name: mean.value for name, mean in self._means[method].items()}}
                for method in self.methods}

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
