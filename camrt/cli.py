"""The `camrt` command line: `explain`, `methods`, `inspect`, plus commands added by plugins.

Plugins add commands through the `register_commands` hook (camrt-exporters adds `camrt export`);
they are asked only when a command name is not a built-in one, or when commands are listed.
camrt errors become one message on stderr and the exit code of `camrt.errors.ExitCode`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import click

from . import __version__
from .errors import CamrtError, ExitCode, InputError, UsageError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class CamrtCommandError(click.ClickException):
    """A CamrtError on its way out of the CLI: one message, camrt's exit code."""

    def __init__(self, error: CamrtError):
        super().__init__(str(error))
        self.exit_code = int(error.exit_code)

    def show(self, file: Any = None) -> None:
        click.echo(f"camrt: error: {self.format_message()}", err=True)


class CamrtGroup(click.Group):
    """A click group that asks the plugins for their commands once, when first needed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._builtin = set()
        self._plugin_commands_loaded = False

    def add_builtin(self, command: click.Command) -> None:
        self.add_command(command)
        self._builtin.add(command.name)

    def load_plugin_commands(self) -> None:
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        from .plugins import get_plugin_manager, load_failures

        pm = get_plugin_manager()
        for impl in pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(*[{"cli": self}[arg] for arg in impl.argnames])
            except Exception as exc:  # a broken plugin must not take the CLI down; it is reported
                message = f"plugin {impl.plugin_name!r} failed to add its commands: {exc!r}"
                load_failures[impl.plugin_name] = message
                click.echo(f"camrt: warning: {message}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._builtin:
            self.load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CamrtError as exc:
            raise CamrtCommandError(exc) from None


# --- camrt explain ---------------------------------------------------------------------------

#: The JSON-lines log written into OUTDIR when --format includes "jsonl".
RECORDS_FILE = "camrt-records.jsonl"
JSONL_FORMAT = "jsonl"


def iter_inputs(specs: Iterable[str], stdin: TextIO, skip_dir: str | None = None) -> Iterator[str]:
    """Paths to explain, lazily: files as given, directories walked (image extensions, sorted,
    hidden names and `skip_dir` skipped), "-" reads one path per line from stdin."""
    from .images import IMAGE_EXTENSIONS

    skip = os.path.realpath(skip_dir) if skip_dir else None
    for spec in specs:
        if spec == "-":
            for line in stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
        elif os.path.isdir(spec):
            found = False
            for dirpath, dirnames, filenames in os.walk(spec, onerror=_walk_error):
                dirnames[:] = sorted(
                    d for d in dirnames
                    if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) != skip
                )
                for name in sorted(filenames):
                    if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        found = True
                        yield os.path.join(dirpath, name)
            if not found:
                click.echo(f"camrt: warning: no image files under {spec}", err=True)
        else:
            yield spec


def _walk_error(error: OSError) -> None:
    click.echo(f"camrt: warning: cannot list {error.filename}: {error.strerror or error}", err=True)


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


class OutputNames:
    """Unique output stems within one run: the second `a/x.png` and `b/x.png` becomes `x-2`."""

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


def parse_target(text: str) -> int:
    from . import contract

    value = text.strip().lower()
    if value in ("top1", "top-1", str(contract.TOP1_TARGET)):
        return contract.TOP1_TARGET
    try:
        target = int(value)
    except ValueError:
        raise UsageError(f"--target must be a class index or top1, got {text!r}") from None
    if target < 0:
        raise UsageError(f"--target must be a class index >= 0 or top1, got {text!r}")
    return target


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


def _base_record(spec: str, explainer: Any) -> dict[str, Any]:
    return {
        "input": spec, "status": "ok", "error": None,
        "method": explainer.method.name,
        "layer": ",".join(explainer.layers) if explainer.layers else None,
        "target": None, "label": None, "score": None, "probability": None,
        "heatmap": None, "overlay": None, "outputs": {},
        "width": None, "height": None, "elapsed_ms": None,
    }


def _fail(record: dict[str, Any], message: str) -> None:
    record["status"] = "error"
    record["error"] = message


def _explain_chunk(explainer: Any, chunk: list[str], target: int, renderers: list[Any], outdir: str,
                   names: OutputNames, options: dict[str, Any]) -> list[dict[str, Any]]:
    from .images import load_image
    from .render import write_atomic

    records, images, millis = [], [], []
    for spec in chunk:
        start = time.perf_counter()
        record = _base_record(spec, explainer)
        try:
            image = load_image(spec)
            record["height"], record["width"] = int(image.shape[0]), int(image.shape[1])
        except InputError as exc:
            _fail(record, str(exc))
            image = None
        records.append(record)
        images.append(image)
        millis.append((time.perf_counter() - start) * 1000)
    good = [i for i, image in enumerate(images) if image is not None]
    if good:
        start = time.perf_counter()
        results = explainer.explain([images[i] for i in good], targets=[target] * len(good))
        share = (time.perf_counter() - start) * 1000 / len(good)
        for i, result in zip(good, results):
            start = time.perf_counter()
            record = records[i]
            record.update(result.record())
            name = names.claim(chunk[i])
            for renderer in renderers:
                path = os.path.join(outdir, name + renderer.suffix)
                try:
                    write_atomic(path, lambda temp: renderer.write(temp, result.heatmap, images[i], options))
                except Exception as exc:  # a failed write is this input's error record, the run goes on
                    _fail(record, f"cannot write {path} ({renderer.name}): {exc}")
                    break
                record["outputs"][renderer.name] = path
                if renderer.field not in record or renderer.field in ("heatmap", "overlay"):
                    record[renderer.field] = path
            millis[i] += share + (time.perf_counter() - start) * 1000
    for record, ms in zip(records, millis):
        record["elapsed_ms"] = round(ms, 3)
    return records


@click.command("explain", context_settings=CONTEXT_SETTINGS)
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-m", "--method", default="gradcam", show_default=True, help="Explanation method (see `camrt methods`).")
@click.option("-O", "--option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="A method option (repeatable; see `camrt methods`).")
@click.option("--target", default="top1", show_default=True, help="Class index to explain, or top1.")
@click.option("--layer", "layers", multiple=True, help="Layer to explain (repeat to fuse several); default: the file's default layer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--format", "formats", default="png,npy", show_default=True,
              help=f"Comma-separated outputs: png (overlay), npy (heatmap), {JSONL_FORMAT} (records also into OUTDIR/{RECORDS_FILE}), or a plugin's renderer.")
@click.option("-o", "--output", "outdir", required=True, metavar="OUTDIR", help="Output directory (created if needed).")
@click.pass_context
def explain_command(ctx: click.Context, model: str, inputs: tuple[str, ...], method: str,
                    method_options: tuple[str, ...], target: str,
                    layers: tuple[str, ...], batch_size: int, device: str, threads: int | None,
                    formats: str, outdir: str) -> None:
    """Explain MODEL's decisions on INPUT images (files, directories, or - for paths on stdin).

    Writes <stem>.heatmap.npy and <stem>.overlay.png per input into OUTDIR (inputs with the same
    stem get <stem>-2, <stem>-3, ...) and prints one JSON line per input. Exit code 0 when every
    input was explained, 1 when some failed.
    """
    from .explainer import Explainer
    from .registry import build_renderer_registry
    from .render import DEFAULT_ALPHA

    wanted = _split_formats(formats)
    registry = build_renderer_registry()
    renderers = [registry.get(name) for name in wanted if name != JSONL_FORMAT]
    target_index = parse_target(target)
    options_given = _parse_options(method_options)
    explainer = Explainer(model, method=method, device=device, threads=threads, layer=list(layers) or None,
                          **options_given)
    if target_index >= explainer.num_classes:
        raise UsageError(f"--target {target_index} is out of range: {model} has {explainer.num_classes} classes (0..{explainer.num_classes - 1})")
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output directory {outdir}: {exc.strerror or exc}") from None
    log = None
    if JSONL_FORMAT in wanted:
        log = open(os.path.join(outdir, RECORDS_FILE), "w", encoding="utf-8")
    stdin = sys.stdin
    names = OutputNames()
    options = {"alpha": DEFAULT_ALPHA}
    total = failed = 0
    try:
        for chunk in _chunks(iter_inputs(inputs, stdin, skip_dir=outdir), batch_size):
            for record in _explain_chunk(explainer, chunk, target_index, renderers, outdir, names, options):
                total += 1
                failed += record["status"] != "ok"
                line = json.dumps(record, ensure_ascii=False)
                click.echo(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
    finally:
        if log is not None:
            log.close()
    if total == 0:
        raise UsageError("no input images found")
    if failed:
        ctx.exit(int(ExitCode.SOME_INPUTS_FAILED))


# --- camrt methods / inspect ------------------------------------------------------------------


def _requires_text(requires: dict[str, Any]) -> str:
    parts = [key for key in ("activations", "gradients") if requires.get(key)]
    if requires.get("input_gradient"):
        parts.append(f"input_gradient:{requires['input_gradient']}")
    parts += [key for key in ("cam_weights", "bias_gradients", "extra_passes", "tail") if requires.get(key)]
    return ", ".join(parts) or "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


@click.command("methods", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of objects instead of a table.")
def methods_command(as_json: bool) -> None:
    """List the registered explanation methods."""
    from .registry import build_method_registry

    registry = build_method_registry()
    described = [dict(cls.describe(), plugin=registry.plugin_of(cls.name)) for cls in registry]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    rows = [["NAME", "ALIASES", "REQUIRES", "OPTIONS", "PLUGIN"]]
    for m in described:
        rows.append([m["name"], ", ".join(m["aliases"]) or "-", _requires_text(m["requires"]),
                     ", ".join(o["name"] for o in m["options"]) or "-", m["plugin"]])
    click.echo(_table(rows))


def contract_summary(path: str) -> dict[str, Any]:
    """What `camrt inspect` shows: the contract metadata and the registered methods the file supports."""
    from dataclasses import asdict

    from .registry import build_method_registry
    from .session import read_contract

    info = read_contract(path)
    supported = []
    for cls in build_method_registry():
        if cls.requires.supported_by(info):
            supported.append(cls.name)
    return {
        "file": path,
        "contract_version": info.version,
        "exporter_version": info.exporter_version,
        "source": info.source,
        "input": info.input_name,
        "layers": info.layers,
        "default_layer": info.default_layer,
        "rule_sets": info.rule_sets,
        "preprocessing": asdict(info.preprocessing),
        "labels": len(info.labels) if info.labels else 0,
        "score": info.score,
        "methods": supported,
    }


@click.command("inspect", context_settings=CONTEXT_SETTINGS)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def inspect_command(model: str, as_json: bool) -> None:
    """Show the camrt contract of MODEL: layers, rule sets, preprocessing, labels."""
    summary = contract_summary(model)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    p = summary["preprocessing"]
    lines = [
        f"file:             {summary['file']}",
        f"contract version: {summary['contract_version']} (exporter {summary['exporter_version'] or '?'})",
        f"source:           {json.dumps(summary['source'])}",
        f"input:            {summary['input']}",
        f"layers:           {', '.join(summary['layers']) or '(none)'}",
        f"default layer:    {summary['default_layer'] or '(none)'}",
        f"rule sets:        {', '.join(summary['rule_sets']) or '(none)'}",
        f"preprocessing:    {p['height']}x{p['width']} {p['channel_order']}, scale {p['scale']:.6g}, "
        f"mean {list(p['mean'])}, std {list(p['std'])}",
        f"labels:           {summary['labels'] or '(none)'}",
        f"score:            {json.dumps(summary['score'])}",
        f"methods:          {', '.join(summary['methods']) or '(none)'}",
    ]
    click.echo("\n".join(lines))


# --- the group ----------------------------------------------------------------------------------


def build_cli() -> CamrtGroup:
    """A fresh `camrt` group (tests build their own; `cli` below is the process-wide one)."""

    @click.group(cls=CamrtGroup, context_settings=CONTEXT_SETTINGS)
    @click.version_option(__version__, "--version", prog_name="camrt", message="%(prog)s %(version)s")
    def group() -> None:
        """camrt: explain image models where they are deployed (onnxruntime, no PyTorch)."""

    for command in (explain_command, methods_command, inspect_command):
        group.add_builtin(command)
    return group


cli = build_cli()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `camrt ...`."""
    try:
        cli.main(args=argv, prog_name="camrt")
    except CamrtError as exc:  # raised outside a command (e.g. while loading plugins)
        click.echo(f"camrt: error: {exc}", err=True)
        sys.exit(int(exc.exit_code))


if __name__ == "__main__":
    main()
