"""`camrt explain`: explain image files with a camrt file, streaming, resumable, one record per input."""

from __future__ import annotations

import glob
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import click

from ..errors import ExitCode, InputError, UsageError
from .common import CONTEXT_SETTINGS

if TYPE_CHECKING:
    from ..targets import TargetRequest

# --- camrt explain ---------------------------------------------------------------------------

#: The JSON-lines log written into OUTDIR when --format includes "jsonl".
RECORDS_FILE = "camrt-records.jsonl"
JSONL_FORMAT = "jsonl"
DEFAULT_OUTDIR = "camrt-out"
#: The fields of every record, in this order (a method's extra fields, `outputs`, `width`,
#: `height`, and `rank` / `skipped` where they apply, come after them).
RECORD_FIELDS = ("input", "status", "error", "method", "layer", "target", "label", "score", "probability",
                 "heatmap", "overlay", "elapsed_ms")
_GLOB_CHARS = frozenset("*?[")


def iter_inputs(specs: Iterable[str], stdin: TextIO, skip_dir: str | None = None,
                warn: Callable[[str], None] | None = None) -> Iterator[str]:
    """Paths to explain, lazily: files as given, directories walked (image extensions, sorted,
    hidden names and `skip_dir` skipped), globs expanded (sorted, `**` recursive; a matched
    directory is walked), "-" reads one path per line from stdin."""
    from ..imaging.decode import IMAGE_EXTENSIONS

    warn = warn or _warn
    skip = os.path.realpath(skip_dir) if skip_dir else None

    def walk(folder: str) -> Iterator[str]:
        found = False
        for dirpath, dirnames, filenames in os.walk(folder, onerror=lambda e: warn(
                f"cannot list {e.filename}: {e.strerror or e}")):
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) != skip
            )
            for name in sorted(filenames):
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    found = True
                    yield os.path.join(dirpath, name)
        if not found:
            warn(f"no image files under {folder}")

    for spec in specs:
        if spec == "-":
            for line in stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
        elif os.path.isdir(spec):
            yield from walk(spec)
        elif not os.path.lexists(spec) and _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                warn(f"no files match {spec}")
            for match in matches:
                yield from (walk(match) if os.path.isdir(match) else (match,))
        else:
            yield spec  # a missing file becomes an error record naming it


def _warn(message: str) -> None:
    click.echo(f"camrt: warning: {message}", err=True)


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


class OutputNames:
    """Unique output stems within one run, claimed in input order: the second `a/x.png` and
    `b/x.png` becomes `x-2`. The same input list gives the same names (how --skip-existing finds
    an interrupted run's outputs)."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def claim(self, path: str) -> str:
        stem = os.path.splitext(os.path.basename(path.rstrip("/\\")))[0] or "input"
        name, number = stem, 1
        while name.casefold() in self._used:
            number += 1
            name = f"{stem}-{number}"
        self._used.add(name.casefold())
        return name


def _split_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    if not formats:
        raise UsageError("--format names no format")
    return list(dict.fromkeys(formats))


def _parse_options(items: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value
    return options


def _base_record(spec: str, explainer: Any, rank: int | None) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(input=spec, status="ok", method=explainer.method.name,
                  layer=",".join(explainer.layers) if explainer.layers else None, outputs={},
                  width=None, height=None)
    if rank is not None:
        record["rank"] = rank
    return record


def _fail(record: dict[str, Any], message: str) -> None:
    record["status"] = "error"
    record["error"] = message


@dataclass
class ExplainRun:
    """One `camrt explain` invocation: what to compute and where the files go."""

    explainer: Any
    target: TargetRequest
    renderers: list[Any]
    outdir: str
    options: dict[str, Any]
    skip_existing: bool
    #: Resuming with a records log: input -> its ok records from the earlier run(s). An input is
    #: done only when its files exist and its records were logged (a kill can fall between them).
    previous: dict[str, list[dict[str, Any]]] | None = None
    names: OutputNames = field(default_factory=OutputNames)

    def output_path(self, name: str, rank: int | None, renderer: Any) -> str:
        return os.path.join(self.outdir, f"{name}{'' if rank is None else f'.top{rank}'}{renderer.suffix}")

    def _set_output(self, record: dict[str, Any], renderer: Any, path: str) -> None:
        record["outputs"][renderer.name] = path
        if renderer.field not in record or renderer.field in ("heatmap", "overlay"):
            record[renderer.field] = path

    def explain_chunk(self, chunk: list[str]) -> list[dict[str, Any]]:
        """The records of a batch of input paths, in input order (top-k: k records per input)."""
        from ..imaging.decode import load_image

        explainer = self.explainer
        per_input: list[list[dict[str, Any]]] = []
        images, millis, names = [], [], []
        for spec in chunk:
            start = time.perf_counter()
            name = self.names.claim(spec)
            records = [_base_record(spec, explainer, rank) for rank in self.target.ranks]
            image = None
            if self.skip_existing and self._done(name, spec):
                if self.previous is not None:
                    records = [dict(record) for record in self.previous[spec]]
                for record in records:
                    record["skipped"] = True
                    for renderer in self.renderers:
                        self._set_output(record, renderer, self.output_path(name, record.get("rank"), renderer))
            else:
                try:
                    image = load_image(spec)
                except InputError as exc:
                    records = records[:1]
                    records[0].pop("rank", None)
                    _fail(records[0], str(exc))
                else:
                    for record in records:
                        record["height"], record["width"] = int(image.shape[0]), int(image.shape[1])
            per_input.append(records)
            images.append(image)
            names.append(name)
            millis.append((time.perf_counter() - start) * 1000)
        good = [i for i, image in enumerate(images) if image is not None]
        if good:
            start = time.perf_counter()
            results = self._explain_each([images[i] for i in good])
            share = (time.perf_counter() - start) * 1000 / len(good)
            for i, ranked in zip(good, results):
                start = time.perf_counter()
                if isinstance(ranked, InputError):
                    per_input[i] = per_input[i][:1]
                    per_input[i][0].pop("rank", None)
                    _fail(per_input[i][0], str(ranked))
                    continue
                for record, result in zip(per_input[i], ranked):
                    record.update(result.record())
                    self._write(record, names[i], result.heatmap, images[i])
                millis[i] += share + (time.perf_counter() - start) * 1000
        out = []
        for records, ms in zip(per_input, millis):
            for record in records:
                record["elapsed_ms"] = round(ms / len(records), 3)
                out.append(record)
        return out

    def _explain_each(self, images: list[Any]) -> list[Any]:
        """Per image, its Explanations (best class first) or its InputError: when one input of a
        batch fails (e.g. the model produced NaN for it), the batch is explained again one image at
        a time so that only that input gets an error record."""
        try:
            return self.explainer.explain_request(images, self.target)
        except InputError as exc:
            if len(images) == 1:
                return [exc]
        return [self._explain_each([image])[0] for image in images]

    def _done(self, name: str, spec: str) -> bool:
        if self.previous is not None and len(self.previous.get(spec, ())) != len(self.target.ranks):
            return False
        return all(os.path.isfile(self.output_path(name, rank, renderer))
                   for rank in self.target.ranks for renderer in self.renderers)

    def _write(self, record: dict[str, Any], name: str, heatmap: Any, image: Any) -> None:
        from ..imaging.render import write_atomic

        for renderer in self.renderers:
            path = self.output_path(name, record.get("rank"), renderer)
            try:
                write_atomic(path, lambda temp: renderer.write(temp, heatmap, image, self.options))
            except Exception as exc:  # a failed write is this input's error record, the run goes on
                _fail(record, f"cannot write {path} ({renderer.name}): {exc}")
                return
            self._set_output(record, renderer, path)


class Progress:
    """`done/total inputs, N failed, rate` on one stderr line, redrawn; only on a terminal."""

    def __init__(self, total: int | None, stream: TextIO):
        self.total, self.stream = total, stream
        self.done = self.failed = 0
        self.started = time.monotonic()

    def update(self, records: list[dict[str, Any]]) -> None:
        self.done += len({r["input"] for r in records})
        self.failed += sum(r["status"] != "ok" for r in records)
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        bar = ""
        if self.total:
            filled = int(30 * self.done / self.total)
            bar = "[" + "#" * filled + "." * (30 - filled) + "] "
        self.stream.write(f"\r{bar}{self.done}{of} inputs, {self.failed} failed, {rate:.1f}/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def logged_records(paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The ok records of earlier runs in these JSON-lines logs, by input (the last run's win;
    an unfinished last line is ignored)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break
                record = json.loads(line)
                if record.get("status") == "ok":
                    mine = found.setdefault(record["input"], [])
                    if record.get("rank", 1) == 1:
                        mine.clear()
                    mine.append({k: v for k, v in record.items() if k != "skipped"})
    return found


def open_log(path: str, resume: bool) -> TextIO:
    """A JSON-lines file, truncated; when resuming, appended to after dropping a last line that an
    interrupted run left unfinished."""
    if resume and os.path.exists(path):
        with open(path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
        return open(path, "a", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


EXPLAIN_EPILOG = """\b
Examples:
  camrt explain model.camrt.onnx photo.jpg photos/ -m gradcam -o out/
  camrt explain model.camrt.onnx 'photos/**/*.jpg' --target topk:3 --format png,npy,jsonl -o out/
  camrt explain model.camrt.onnx photos/ --target 2 --colormap turbo --alpha 0.4 -o out/
  camrt explain model.camrt.onnx photos/ -m saliency --format npy --jsonl records.jsonl -o out/
  find photos -name '*.jpg' | camrt explain model.camrt.onnx - --skip-existing -o out/
"""


@click.command("explain", context_settings=CONTEXT_SETTINGS, epilog=EXPLAIN_EPILOG)
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-m", "--method", default="gradcam", show_default=True, help="Explanation method (see `camrt methods`).")
@click.option("-O", "--option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="A method option (repeatable; see `camrt methods`).")
@click.option("-o", "--output", "outdir", default=DEFAULT_OUTDIR, show_default=True, metavar="OUTDIR",
              help="Output directory (created if needed).")
@click.option("--target", default="top1", show_default=True, metavar="N|top1|topk:K",
              help="Class index to explain, the top-1 class, or the K best classes (K records per input).")
@click.option("--layer", "layers", multiple=True,
              help="Layer to explain (repeat to fuse several); default: the file's default layer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per onnxruntime run.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime offers it (onnxruntime-gpu), else the CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--graph-optimization", type=click.Choice(["all", "extended", "basic", "none"]), default="all",
              show_default=True, help="onnxruntime's graph optimisations: 'extended' leaves out the NCHWc "
                                      "kernels of 'all': slower, closer to float64 on ill-conditioned layers.")
@click.option("--format", "formats", default="png,npy", show_default=True,
              help=f"Comma-separated outputs: png (overlay), npy (heatmap), {JSONL_FORMAT} (records also "
                   f"into OUTDIR/{RECORDS_FILE}), or a plugin's renderer.")
@click.option("--colormap", default="jet", show_default=True, help="OpenCV colormap of the overlay (jet, turbo, viridis, ...).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Heatmap weight in the overlay: alpha * colormap + (1 - alpha) * image.")
@click.option("--softmax", is_flag=True, help="Report the softmax probability even if the model has no softmax.")
@click.option("--skip-existing", is_flag=True,
              help="Resume an interrupted run: skip inputs whose output files all exist and, when a records "
                   "log is kept (jsonl format or --jsonl FILE), whose records it holds; logs are appended to.")
@click.option("--fail-fast", is_flag=True, help="Stop after the batch in which an input failed.")
@click.option("--jsonl", "jsonl_path", metavar="FILE", help="Write the records to FILE instead of stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings on stderr (errors still).")
@click.pass_context
def explain_command(ctx: click.Context, model: str, inputs: tuple[str, ...], method: str,
                    method_options: tuple[str, ...], outdir: str, target: str, layers: tuple[str, ...],
                    batch_size: int, device: str, threads: int | None, graph_optimization: str, formats: str,
                    colormap: str, alpha: float, softmax: bool, skip_existing: bool, fail_fast: bool,
                    jsonl_path: str | None, quiet: bool) -> None:
    """Explain MODEL's decisions on INPUT images: files, directories (walked for image files),
    globs, or - for paths on stdin.

    Writes <stem>.overlay.png and <stem>.heatmap.npy per input into OUTDIR (top-k:
    <stem>.top<rank>.*; inputs with the same stem get <stem>-2, <stem>-3, ...), each file
    atomically, and prints one JSON line per input (per class with top-k). Exit code 0 when every
    input was explained, 1 when some failed (their records say why), 2 for a usage error, 3 for a
    model or contract error.
    """
    from ..explainer import Explainer
    from ..imaging.render import colormap_code, remove_stale_temporaries
    from ..plugins.registry import build_renderer_registry
    from ..targets import parse_target

    wanted = _split_formats(formats)
    registry = build_renderer_registry()
    renderers = [registry.get(name) for name in wanted if name != JSONL_FORMAT]
    request = parse_target(target)
    colormap_code(colormap)
    explainer = Explainer(model, method=method, device=device, threads=threads, layer=list(layers) or None,
                          softmax=True if softmax else None, graph_optimization=graph_optimization,
                          **_parse_options(method_options))
    request.check(explainer.num_classes, model)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output directory {outdir}: {exc.strerror or exc}") from None
    if skip_existing:
        remove_stale_temporaries(outdir)
    warn = (lambda message: None) if quiet else _warn
    paths: Iterable[str] = iter_inputs(inputs, sys.stdin, skip_dir=outdir, warn=warn)
    progress = None
    if not quiet and _is_terminal(sys.stderr):
        if "-" not in inputs:  # a stdin list streams; others are listed first for the total
            paths = list(paths)
        progress = Progress(len(paths) if isinstance(paths, list) else None, sys.stderr)
    log_paths = [os.path.join(outdir, RECORDS_FILE)] if JSONL_FORMAT in wanted else []
    if jsonl_path not in (None, "-"):
        log_paths.append(jsonl_path)
    previous = logged_records(log_paths) if skip_existing and log_paths else None
    run = ExplainRun(explainer, request, renderers, outdir, {"alpha": alpha, "colormap": colormap}, skip_existing,
                     previous)
    logs = []
    total = failed = 0
    try:
        for path in log_paths:
            logs.append(open_log(path, skip_existing))
        to_stdout = jsonl_path in (None, "-")
        for chunk in _chunks(iter(paths), batch_size):
            records = run.explain_chunk(chunk)
            for record in records:
                line = json.dumps(record, ensure_ascii=False)
                if to_stdout:
                    click.echo(line)
                for log in logs:
                    log.write(line + "\n")
                    log.flush()
            total += len(records)
            chunk_failed = sum(record["status"] != "ok" for record in records)
            failed += chunk_failed
            if progress is not None:
                progress.update(records)
            if chunk_failed and fail_fast:
                warn("stopping at the first failed batch (--fail-fast)")
                break
    finally:
        for log in logs:
            log.close()
        if progress is not None:
            progress.close()
    if total == 0:
        raise UsageError("no input images found")
    if failed:
        ctx.exit(int(ExitCode.SOME_INPUTS_FAILED))


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
