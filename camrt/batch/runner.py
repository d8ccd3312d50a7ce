"""Explaining inputs in chunks: one record per input (per class with top-k), files written
atomically, an interrupted run resumed. The engine of `camrt explain`, usable from Python (and
from a data-parallel framework's per-batch callable, `ExplainRun.explain_images`).

    run = ExplainRun(Explainer("model.camrt.onnx"), renderers=[...], outdir="out")
    for records in run.run(iter_inputs(["photos/"]), batch_size=8):   # one list per chunk
        ...
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, UsageError
from ..targets import ClassRequest, TargetRequest
from .inputs import OutputNames, chunked
from .isolate import isolate_failures
from .records import base_record, mark_failed


@dataclass
class _Pending:
    """One input of a chunk on its way to its records."""

    name: str  # its output stem
    spec: str  # the input as given
    records: list[dict[str, Any]]
    image: Any = None  # HWC uint8 RGB; None when skipped or failed
    millis: float = 0.0
    heatmaps: list[Any] = field(default_factory=list)  # one per record once explained

    def fail(self, message: str) -> None:
        """A failed input has one error record, whatever the number of targets."""
        self.records = self.records[:1]
        self.records[0].pop("rank", None)
        mark_failed(self.records[0], message)
        self.image = None
        self.heatmaps = []

    def take(self, image: Any) -> None:
        self.image = image
        for record in self.records:
            record["height"], record["width"] = int(image.shape[0]), int(image.shape[1])


@dataclass
class ExplainRun:
    """Explains inputs chunk by chunk with one Explainer and writes each result with `renderers`.

    target: the class(es) per input; renderers: `camrt.imaging.render` renderers (none: records
    only); render_options: what they read (alpha, colormap); skip_existing: resume, an input whose
    files exist (and, with `previous`, whose records an earlier run logged) is not explained again.
    """

    explainer: Any
    target: TargetRequest = field(default_factory=ClassRequest)
    renderers: Sequence[Any] = ()
    outdir: str = "."
    render_options: dict[str, Any] = field(default_factory=dict)
    skip_existing: bool = False
    #: Resuming with a records log: input -> its ok records from the earlier run(s) (`logged_records`).
    #: An input is done only when its files exist and its records were logged (a kill can fall between them).
    previous: dict[str, list[dict[str, Any]]] | None = None
    names: OutputNames = field(default_factory=OutputNames)

    def run(self, paths: Iterable[str], batch_size: int = 8) -> Iterator[list[dict[str, Any]]]:
        """The records of each chunk of `batch_size` paths, pulling paths only as they are needed:
        at most one chunk of images is decoded at a time."""
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        for chunk in chunked(paths, batch_size):
            yield self.explain_chunk(chunk)

    def output_path(self, name: str, rank: int | None, renderer: Any) -> str:
        tag = self.target.output_tag(rank)
        return os.path.join(self.outdir, f"{name}{'' if tag is None else f'.{tag}'}{renderer.suffix}")

    def explain_chunk(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        """The records of a batch of input paths, in input order (top-k: k records per input)."""
        from ..imaging.decode import load_image

        pending = []
        for spec in paths:
            start = time.perf_counter()
            item = self._claim(spec)
            if self.skip_existing and self.is_done(item.name, spec):
                self._reuse(item, spec)
            else:
                try:
                    item.take(load_image(spec))
                except InputError as exc:
                    item.fail(str(exc))
            item.millis = (time.perf_counter() - start) * 1000
            pending.append(item)
        return [record for record, _ in self._finish(pending)]

    def explain_images(self, items: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
        """The records of already decoded inputs: (name, HWC uint8 RGB image, or the error that
        reading it raised), in order; the same fields as `explain_chunk`'s (elapsed_ms without
        decoding). Every input is explained: `skip_existing` concerns paths (`explain_chunk`)."""
        return [record for record, _ in self.explain_images_with_heatmaps(items)]

    def explain_images_with_heatmaps(self, items: Sequence[tuple[str, Any]]) -> list[tuple[dict[str, Any], Any]]:
        """As `explain_images`, each record with its heatmap (float32 [H, W] in [0, 1] at the
        image's resolution; None where the input could not be explained): a data-parallel
        framework's array column. An input that is not an HWC uint8 RGB array gets an error record."""
        from ..imaging.decode import check_image

        pending = []
        for spec, image in items:
            item = self._claim(spec)
            if isinstance(image, Exception):
                item.fail(str(image))
                pending.append(item)
                continue
            try:
                item.take(check_image(image, spec))
            except InputError as exc:
                item.fail(str(exc))
            pending.append(item)
        return self._finish(pending)

    def _claim(self, spec: str) -> _Pending:
        # a request whose forward pass decides the number of maps starts with one record (`_finish`)
        return _Pending(self.names.claim(spec), spec, self._records(spec, self.target.ranks or [1]))

    def _records(self, spec: str, ranks: Sequence[int | None]) -> list[dict[str, Any]]:
        return [{**base_record(spec, self.explainer, rank), **self.target.record_fields(rank)} for rank in ranks]

    def _reuse(self, item: _Pending, spec: str) -> None:
        if self.previous is not None:
            item.records = [dict(record) for record in self.previous[spec]]
        for record in item.records:
            record["skipped"] = True
            for renderer in self.renderers:
                self._set_output(record, renderer, self.output_path(item.name, record.get("rank"), renderer))

    def _finish(self, pending: list[_Pending]) -> list[tuple[dict[str, Any], Any]]:
        """Explain the decoded inputs of a chunk and write their files: (record, heatmap or None) in order."""
        good = [item for item in pending if item.image is not None]
        if good:
            start = time.perf_counter()
            results = self._explain_each([item.image for item in good])
            share = (time.perf_counter() - start) * 1000 / len(good)
            for item, ranked in zip(good, results):
                start = time.perf_counter()
                if isinstance(ranked, InputError):
                    item.fail(str(ranked))
                    continue
                if not ranked:  # every input yields a record: an input without a target an error one
                    item.fail(self.target.none_found())
                    continue
                if len(ranked) != len(item.records):
                    item.records = self._records(item.spec, range(1, len(ranked) + 1))
                    item.take(item.image)
                for record, result in zip(item.records, ranked):
                    record.update(result.record())
                    self._write(record, item.name, result.heatmap, item.image)
                    item.heatmaps.append(result.heatmap)
                item.millis += share + (time.perf_counter() - start) * 1000
        out = []
        for item in pending:
            for j, record in enumerate(item.records):
                record["elapsed_ms"] = round(item.millis / len(item.records), 3)
                out.append((record, item.heatmaps[j] if j < len(item.heatmaps) else None))
        return out

    def _explain_each(self, images: list[Any]) -> list[Any]:
        """Per image, its Explanations (best class first) or its InputError: when one input of a
        batch fails (e.g. the model produced NaN for it), the batch is explained again one image at
        a time so that only that input gets an error record."""
        return isolate_failures(lambda rows: self.explainer.explain_request([images[i] for i in rows], self.target),
                                range(len(images)))

    def is_done(self, name: str, spec: str) -> bool:
        """Whether input `spec` (output stem `name`) was finished by an earlier run: all its files
        exist and, when `previous` is known, its records were logged."""
        ranks = self.target.ranks
        if ranks is None:  # as many maps as the earlier run found: known only from its records
            if self.previous is None or spec not in self.previous:
                return False
            ranks = [record.get("rank") for record in self.previous[spec]]
        elif self.previous is not None and len(self.previous.get(spec, ())) != len(ranks):
            return False
        return all(os.path.isfile(self.output_path(name, rank, renderer))
                   for rank in ranks for renderer in self.renderers)

    def _set_output(self, record: dict[str, Any], renderer: Any, path: str) -> None:
        record["outputs"][renderer.name] = path
        if renderer.field not in record or renderer.field in ("heatmap", "overlay"):
            record[renderer.field] = path

    def _write(self, record: dict[str, Any], name: str, heatmap: Any, image: Any) -> None:
        from ..imaging.render import write_atomic

        for renderer in self.renderers:
            path = self.output_path(name, record.get("rank"), renderer)
            try:
                write_atomic(path, lambda temp: renderer.write(temp, heatmap, image, self.render_options))
            except Exception as exc:  # a failed write is this input's error record, the run goes on
                mark_failed(record, f"cannot write {path} ({renderer.name}): {exc}")
                return
            self._set_output(record, renderer, path)
