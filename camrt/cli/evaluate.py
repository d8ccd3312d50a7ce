"""`camrt eval` (methods x metrics over images, streaming) and `camrt metrics`.

    camrt eval MODEL.onnx INPUT... -m gradcam,saliency --metric deletion,insertion,confidence \
        [-o OUTDIR] [--plot] [--boxes FILE] [-P deletion.steps=50] [-O smoothgrad.n_samples=8]

One JSON line per image and method on stdout; the summary table (means over the images) on
stderr. With -o, OUTDIR gets eval-records.jsonl, eval-summary.json and eval-summary.txt, and with
--plot, per image, <stem>.curves.png (deletion/insertion curves of every method) and
<stem>.methods.png (every method's overlay side by side).
"""

from __future__ import annotations

import json
import os
from typing import Any

RECORDS_FILE = "eval-records.jsonl"
SUMMARY_JSON = "eval-summary.json"
SUMMARY_TEXT = "eval-summary.txt"


EVAL_EPILOG = """\b
Examples:
  camrt eval model.camrt.onnx photos/ -m gradcam,saliency --metric deletion,insertion -P deletion.steps=8 -P insertion.steps=8
  camrt eval model.camrt.onnx photo.jpg --metric confidence,road -o eval-out/ --plot
"""

METRICS_EPILOG = """\b
Examples:
  camrt metrics
  camrt metrics --json
"""


def parse_named_options(items: tuple[str, ...], flag: str) -> dict[str, dict[str, str]]:
    """("deletion.steps=50", ...) -> {"deletion": {"steps": "50"}} (metric or method options)."""
    from ..errors import UsageError

    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        owner, dot, name = key.partition(".")
        if not sep or not dot or not owner.strip() or not name.strip():
            raise UsageError(f"{flag} expects NAME.KEY=VALUE, got {item!r}")
        options.setdefault(owner.strip(), {})[name.strip()] = value
    return options


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class Figures:
    """<stem>.curves.png (deletion/insertion curves of every method) and <stem>.methods.png (every
    method's overlay) per readable input, drawn when the last method has scored it. Methods run one
    after the other, so the earlier methods' heatmaps and curves wait in a temporary folder, not in
    memory."""

    def __init__(self, outdir: str, methods: list[str]):
        import tempfile

        from ..batch import OutputNames

        self.outdir, self.methods = outdir, methods
        self.names = OutputNames()
        self._spool = tempfile.TemporaryDirectory(prefix="camrt-figures-")

    def add(self, chunk: Any) -> list[str]:
        """Keep or draw the figures of an `EvaluatedChunk`; returns the paths written."""
        import numpy as np

        written = []
        last = chunk.method == self.methods[-1]
        for k, ((name, image), record, heatmap) in enumerate(zip(chunk.inputs, chunk.records, chunk.maps)):
            if heatmap is None:  # an input that could not be read
                continue
            curves = {kind: np.asarray([record[f"{kind}_curve"]["fraction"], record[f"{kind}_curve"]["score"]])
                      for kind in ("deletion", "insertion") if f"{kind}_curve" in record}
            if not last:
                np.savez(self._held(chunk.start + k, chunk.method), heatmap=heatmap, **curves)
                continue
            maps, curves_of = {}, {}
            for method in self.methods[:-1]:
                path = self._held(chunk.start + k, method)
                if not os.path.exists(path):  # the file could not be read when that method's turn came
                    continue
                with np.load(path) as held:
                    maps[method] = held["heatmap"]
                    curves_of[method] = {kind: tuple(held[kind].tolist()) for kind in held.files if kind != "heatmap"}
                os.remove(path)
            maps[chunk.method] = heatmap
            curves_of[chunk.method] = {kind: tuple(value.tolist()) for kind, value in curves.items()}
            written += self._draw(self.names.claim(name), image, maps, curves_of)
        return written

    def _held(self, position: int, method: str) -> str:
        return os.path.join(self._spool.name, f"{position}.{self.methods.index(method)}.npz")

    def _draw(self, stem: str, image: Any, maps: dict[str, Any], curves: dict[str, dict[str, Any]]) -> list[str]:
        from ..metrics.plot import plot_curves, plot_overlays

        written = []
        if any(curves.values()):
            path = os.path.join(self.outdir, f"{stem}.curves.png")
            plot_curves(path, {m: c for m, c in curves.items() if c}, title=stem)
            written.append(path)
        path = os.path.join(self.outdir, f"{stem}.methods.png")
        plot_overlays(path, image, maps, title=stem)
        written.append(path)
        return written

    def close(self) -> None:
        self._spool.cleanup()


def build_eval_command():
    import click

    from .common import CONTEXT_SETTINGS

    @click.command("eval", context_settings=CONTEXT_SETTINGS, epilog=EVAL_EPILOG)
    @click.argument("model")
    @click.argument("inputs", nargs=-1, required=True)
    @click.option("-m", "--method", "methods", default="gradcam", show_default=True,
                  help="Comma-separated methods to compare (see `camrt methods`).")
    @click.option("--metric", "metrics", default="deletion,insertion,confidence", show_default=True,
                  help="Comma-separated metrics: deletion, insertion, confidence, road, pointing, randomization, "
                       "or a plugin's (see `camrt metrics`).")
    @click.option("-P", "--metric-option", "metric_options", multiple=True, metavar="METRIC.KEY=VALUE",
                  help="A metric option, e.g. deletion.steps=50 or road.percentiles=20,40,60,80 (repeatable).")
    @click.option("-O", "--method-option", "method_options", multiple=True, metavar="METHOD.KEY=VALUE",
                  help="A method option, e.g. smoothgrad.n_samples=8 (repeatable; see `camrt methods`).")
    @click.option("--boxes", default=None, metavar="FILE", help="Ground-truth boxes for the pointing game (JSON or CSV).")
    @click.option("--score", type=click.Choice(["probability", "logit"]), default="probability", show_default=True,
                  help="The class score the metrics compare: softmax probability or logit.")
    @click.option("--layer", "layers", multiple=True, help="Layer to explain (default: the file's default layer).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                  help="Perturbed inputs per onnxruntime run.")
    @click.option("--images-per-batch", type=click.IntRange(min=1), default=8, show_default=True,
                  help="Images explained and scored together.")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
    @click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
    @click.option("--graph-optimization", type=click.Choice(["all", "extended", "basic", "none"]), default="all",
                  show_default=True, help="onnxruntime's graph optimisations (see `camrt explain --help`).")
    @click.option("-o", "--output", "outdir", default=None, metavar="OUTDIR",
                  help="Write records, summary (and figures with --plot) here.")
    @click.option("--plot", is_flag=True, help="Write deletion/insertion curves and the methods' overlays as PNG (needs -o).")
    @click.pass_context
    def eval_command(ctx: click.Context, model: str, inputs: tuple[str, ...], methods: str, metrics: str,
                     metric_options: tuple[str, ...], method_options: tuple[str, ...], boxes: str | None, score: str, layers: tuple[str, ...],
                     batch_size: int, images_per_batch: int, device: str, threads: int | None,
                     graph_optimization: str, outdir: str | None, plot: bool) -> None:
        """Score METHODS' heatmaps of MODEL on INPUT images with faithfulness metrics and sanity checks.

        Prints one JSON line per image and method, then the summary table (means) on stderr.
        Exit code 0 when every input was evaluated, 1 when some could not be read.
        """
        import itertools
        import sys

        from ..batch import RecordLog, SpooledPaths, decode_inputs, iter_inputs, record_line
        from ..batch.evaluation import Evaluation
        from ..errors import ExitCode, UsageError
        from ..plugins.registry import build_metric_registry
        from .common import warn

        if plot and not outdir:
            raise UsageError("--plot writes PNG files: give an output directory with -o OUTDIR")
        options = parse_named_options(metric_options, "--metric-option")
        wanted = _split(metrics)
        if boxes is not None:
            pointing = build_metric_registry().get("pointing").name
            if not any(build_metric_registry().get(m).name == pointing for m in wanted):
                wanted.append(pointing)
            options.setdefault(pointing, {})["boxes"] = boxes
        evaluation = Evaluation(model, _split(methods), wanted, metric_options=options,
                                method_options=parse_named_options(method_options, "--method-option"), layers=layers,
                                device=device, threads=threads, score=score, batch_size=batch_size,
                                images_per_batch=images_per_batch, keep_maps=plot,
                                graph_optimization=graph_optimization)
        found = iter_inputs(inputs, sys.stdin, skip_dir=outdir, warn=warn)
        first = next(found, None)
        if first is None:
            raise UsageError("no input images found")
        log = None
        if outdir:
            try:
                os.makedirs(outdir, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create the output directory {outdir}: {exc.strerror or exc}") from None
            log = RecordLog(os.path.join(outdir, RECORDS_FILE))
        failed = False
        paths = SpooledPaths(itertools.chain([first], found))  # every method reads the inputs again
        figures = Figures(outdir, evaluation.methods) if plot else None
        try:
            for chunk in evaluation.run_chunks(lambda: decode_inputs(paths)):
                for record in chunk.records:
                    failed |= record["status"] != "ok"
                    line = record_line(record)
                    click.echo(line)
                    if log is not None:
                        log.write(line)
                for path in figures.add(chunk) if figures is not None else ():
                    click.echo(f"camrt: wrote {path}", err=True)
            table = evaluation.summary_table()
            click.echo(table, err=True)
            if outdir:
                with open(os.path.join(outdir, SUMMARY_JSON), "w", encoding="utf-8") as handle:
                    json.dump(evaluation.summary(), handle, indent=2)
                with open(os.path.join(outdir, SUMMARY_TEXT), "w", encoding="utf-8") as handle:
                    handle.write(table + "\n")
        finally:
            evaluation.close()
            paths.close()
            if figures is not None:
                figures.close()
            if log is not None:
                log.close()
        if failed:
            ctx.exit(int(ExitCode.SOME_INPUTS_FAILED))

    return eval_command


def build_metrics_command():
    import click

    from .common import CONTEXT_SETTINGS

    @click.command("metrics", context_settings=CONTEXT_SETTINGS, epilog=METRICS_EPILOG)
    @click.option("--json", "as_json", is_flag=True, help="A JSON list of objects instead of a table.")
    def metrics_command(as_json: bool) -> None:
        """List the registered evaluation metrics (for `camrt eval --metric`)."""
        from ..plugins.registry import build_metric_registry

        registry = build_metric_registry()
        described = [dict(cls.describe(), plugin=registry.plugin_of(cls.name)) for cls in registry]
        if as_json:
            click.echo(json.dumps(described, indent=2))
            return
        for m in described:
            fields = ", ".join(f"{name} ({better} is better)" for name, better in m["fields"].items())
            options = ", ".join(f"{o['name']}={o['default']}" for o in m["options"]) or "-"
            aliases = f" (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
            click.echo(f"{m['name']}{aliases} [{m['plugin']}]\n  {m['description']}\n  results: {fields}\n"
                       f"  options: {options}")

    return metrics_command
