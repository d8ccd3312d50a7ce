"""Explanations over a dataset on Ray Data (`pip install camrt[ray]`; the runtime never needs ray).

`ExplainBatches` is the callable class for ``Dataset.map_batches``: each actor opens one
`Explainer` and turns batches of rows ``{"input": path, "name": output stem}`` into rows with the
fields of `camrt explain`'s JSON lines, the heatmap as an array column and, optionally, the overlay
as PNG bytes. A bad image is an error row, never a failed task.

    import ray
    from camrt.ray import ExplainBatches, input_rows

    rows = input_rows(["photos/"])                     # names claimed in input order, as the CLI does
    out = ray.data.from_items(rows).map_batches(
        ExplainBatches, fn_constructor_kwargs={"model": "model.camrt.onnx", "method": "gradcam",
                                               "outdir": "out/"},
        batch_size=16, concurrency=2, batch_format="numpy")
    for batch in out.iter_batches(batch_format="numpy"):
        ...                                             # batch["record"]: the JSON lines

`explain_with_ray` is the driver behind `camrt ray-explain`: it lists the inputs, leaves out those a
previous run finished (`skip_existing`, the local CLI's resume semantics), runs the rest on the
cluster and appends each finished batch's records to the manifest from the driver, so a worker that
dies (Ray restarts it and retries its batch) neither loses nor duplicates a record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .batch import ExplainRun, OutputNames, RecordLog, decode_inputs, iter_inputs, latest_ok_records, logged_records
from .errors import UsageError
from .target_parsing import parse_targets

#: Input row fields: the image path (the record's `input`) and its output stem.
INPUT_COLUMN = "input"
NAME_COLUMN = "name"
#: Output row fields besides the record's own: the JSON line, the heatmap, the overlay PNG.
RECORD_COLUMN = "record"
HEATMAP_COLUMN = "heatmap_array"
OVERLAY_COLUMN = "overlay_png"
MANIFESTS = ("jsonl", "parquet")
MANIFEST_JSONL = "camrt-records.jsonl"
MANIFEST_PARQUET = "camrt-records.parquet"
INSTALL_HINT = "camrt ray-explain needs Ray Data: pip install 'camrt[ray]' (or pip install 'ray[data]')"


def input_rows(specs: Iterable[str], skip_dir: str | None = None) -> list[dict[str, str]]:
    """One row per input (files, directories, globs, list files as `iter_inputs` reads them), with
    the output stem the local CLI would give it (claimed in input order: `x`, `x-2`, ...)."""
    names = OutputNames()
    return [{INPUT_COLUMN: path, NAME_COLUMN: names.claim(path)}
            for path in iter_inputs(specs, skip_dir=skip_dir, warn=_ignore)]


def _ignore(message: str) -> None:
    return None


class _GivenNames:
    """Output stems fixed by the driver (a distributed run cannot claim them in input order)."""

    def __init__(self, names: dict[str, str]):
        self._names = names

    def claim(self, path: str) -> str:
        return self._names[path]


def renderers(formats: str) -> list[Any]:
    """The renderers of a `--format` list ("jsonl" is the records log, not a renderer)."""
    from .plugins.registry import build_renderer_registry

    registry = build_renderer_registry()
    return [registry.get(f.strip()) for f in formats.split(",") if f.strip() and f.strip() != "jsonl"]


class ExplainBatches:
    """The per-actor callable of ``Dataset.map_batches`` (batch_format="numpy").

    model, method, layers, target (one `--target` value or several), region (`--region`: a mask path, or
    one per seg target), target_options (the box options: box_iou, box_format, box_layout), device,
    threads, softmax and method options as for
    `camrt explain`; outdir + formats: the files written per input, as the
    CLI writes them (formats "" writes none: the rows carry everything); overlay_bytes: add the
    overlay PNG as bytes; colormap, alpha: the overlay's look; base_dir: the folder relative paths
    (inputs, model, outdir) are read from, e.g. the driver's working directory on a shared
    filesystem (records keep the inputs as given, as the local CLI's do).
    """

    def __init__(self, model: str, method: str = "gradcam", layers: Sequence[str] = (),
                 target: str | Sequence[str] = "top1", region: str | Sequence[str] | None = None,
                 target_options: dict[str, Any] | None = None, device: str = "auto", threads: int | None = None,
                 softmax: bool = False, outdir: str = ".",
                 formats: str = "png,npy", overlay_bytes: bool = False, colormap: str = "jet", alpha: float = 0.5,
                 method_options: dict[str, Any] | None = None,
                 base_dir: str | None = None):
        from .explainer import Explainer
        if base_dir is not None:
            os.chdir(base_dir)  # an actor is a process of its own: this changes nothing else
        explainer = Explainer(model, method=method, device=device, threads=threads, layer=list(layers) or None,
                              softmax=True if softmax else None, **(method_options or {}))
        self.options = {"alpha": alpha, "colormap": colormap}
        self.overlay_bytes = overlay_bytes
        request = parse_targets(target, region, **(target_options or {})).bound(explainer)
        self.run = ExplainRun(explainer, request, renderers(formats), outdir, self.options)
        os.makedirs(outdir, exist_ok=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch[INPUT_COLUMN]]
        self.run.names = _GivenNames(dict(zip(paths, (str(n) for n in batch[NAME_COLUMN]))))
        images = dict(decode_inputs(paths))
        results = self.run.explain_images_with_heatmaps([(path, images[path]) for path in paths])
        return self._columns(results, images)

    def _columns(self, results: list[tuple[dict[str, Any], Any]], images: dict[str, Any]) -> dict[str, np.ndarray]:
        from .imaging.render import encode_overlay_png

        records = [record for record, _ in results]
        heatmaps, overlays = [], []
        for record, heatmap in results:
            ok = record["status"] == "ok" and heatmap is not None
            heatmaps.append(np.asarray(heatmap, np.float32) if ok else np.zeros((0, 0), np.float32))
            if self.overlay_bytes:
                overlays.append(encode_overlay_png(heatmap, images[record["input"]], self.options) if ok else b"")
        columns: dict[str, Any] = {RECORD_COLUMN: [json.dumps(r, ensure_ascii=False) for r in records],
                                   INPUT_COLUMN: [r["input"] for r in records],
                                   "status": [r["status"] for r in records],
                                   "error": [r["error"] or "" for r in records],
                                   HEATMAP_COLUMN: heatmaps}
        if self.overlay_bytes:
            columns[OVERLAY_COLUMN] = overlays
        return {key: _column(values) for key, values in columns.items()}


def _column(values: list[Any]) -> np.ndarray:
    """A numpy column of one value per row (object dtype for arrays and bytes of varying size)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class Manifest:
    """The records of a run, appended batch by batch from the driver: JSON lines, or Parquet parts
    (one file per batch in a folder, so that a killed driver leaves only whole parts)."""

    def __init__(self, path: str, kind: str, resume: bool):
        if kind not in MANIFESTS:
            raise UsageError(f"--manifest must be one of {', '.join(MANIFESTS)}, got {kind!r}")
        self.path, self.kind = path, kind
        self._parts = 0
        if kind == "jsonl":
            self._log = RecordLog(path, resume=resume)
        else:
            if not resume and os.path.isdir(path):
                for name in os.listdir(path):
                    if name.endswith(".parquet"):
                        os.remove(os.path.join(path, name))
            os.makedirs(path, exist_ok=True)
            self._parts = len([n for n in os.listdir(path) if n.endswith(".parquet")])

    def previous(self) -> dict[str, list[dict[str, Any]]]:
        """The ok records of earlier runs, by input (the local CLI's `logged_records`)."""
        if self.kind == "jsonl":
            return logged_records([self.path])
        return latest_ok_records(self._parquet_records())

    def _parquet_records(self) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        for name in sorted(n for n in os.listdir(self.path) if n.endswith(".parquet")):
            for line in pq.read_table(os.path.join(self.path, name), columns=[RECORD_COLUMN])[RECORD_COLUMN]:
                yield json.loads(line.as_py())

    def append(self, lines: list[str]) -> None:
        if self.kind == "jsonl":
            for line in lines:
                self._log.write(line)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        part = os.path.join(self.path, f"part-{self._parts:06d}.parquet")
        temporary = part + ".tmp"
        pq.write_table(pa.table({RECORD_COLUMN: lines}), temporary)
        os.replace(temporary, part)
        self._parts += 1

    def close(self) -> None:
        if self.kind == "jsonl":
            self._log.close()


def explain_with_ray(model: str, inputs: Sequence[str], outdir: str, *, manifest: str = "jsonl",
                     actors: int = 1, batch_size: int = 8, num_gpus: float = 0, ray_address: str | None = None,
                     skip_existing: bool = False, records: Any = None, batches: type = None,
                     **explain_options: Any) -> dict[str, int]:
    """Explain `inputs` on a Ray cluster (a local one unless `ray_address`); returns counts
    {"inputs", "skipped", "records", "failed"}. `records`: a callable given each finished record
    (a dict), e.g. to print JSON lines as they come; `batches`: the actors' class (default
    ExplainBatches; a subclass may add columns). Ray restarts a dead actor and retries its batch."""
    batches = batches or ExplainBatches
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    os.makedirs(outdir, exist_ok=True)
    rows = input_rows(inputs, skip_dir=outdir)
    if not rows:
        raise UsageError("no input images found")
    path = os.path.join(outdir, MANIFEST_JSONL if manifest == "jsonl" else MANIFEST_PARQUET)
    log = Manifest(path, manifest, resume=skip_existing)
    counts = {"inputs": len(rows), "skipped": 0, "records": 0, "failed": 0}
    try:
        todo = rows
        if skip_existing:
            # what the actors would write, to find what an earlier run finished (no model is opened)
            request = parse_targets(explain_options.get("target", "top1"), explain_options.get("region"),
                                    **(explain_options.get("target_options") or {}))
            written = ExplainRun(None, request,
                                 renderers(explain_options.get("formats", "png,npy")), outdir,
                                 previous=log.previous())
            todo = [row for row in rows if not written.is_done(row[NAME_COLUMN], row[INPUT_COLUMN])]
            counts["skipped"] = len(rows) - len(todo)
        if not todo:
            return counts
        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        dataset = ray.data.from_items(todo).map_batches(
            batches, batch_size=batch_size, batch_format="numpy", concurrency=actors, num_gpus=num_gpus or None,
            fn_constructor_kwargs={"model": model, "outdir": outdir, "base_dir": os.getcwd(), **explain_options})
        for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
            lines = [str(line) for line in batch[RECORD_COLUMN]]
            log.append(lines)
            for line in lines:
                record = json.loads(line)
                counts["records"] += 1
                counts["failed"] += record["status"] != "ok"
                if records is not None:
                    records(record)
    finally:
        log.close()
    return counts
