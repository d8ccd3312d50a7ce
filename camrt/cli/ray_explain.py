"""`camrt ray-explain`: `camrt explain` on a Ray cluster (local by default), resumable, with a manifest.

Ray is imported only when the command runs; without it the command says how to install it.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ..errors import ExitCode
from .common import CONTEXT_SETTINGS
from .explain import DEFAULT_OUTDIR, explain_command, parse_method_options

#: `camrt explain` options that mean the same here (one definition: explain's).
SHARED_OPTIONS = ("method", "method_options", "targets", "regions", "box_iou", "box_format", "box_layout", "layers",
                  "batch_size", "device", "threads", "formats", "colormap", "alpha", "softmax", "skip_existing")

RAY_EPILOG = """\b
Examples:
  camrt ray-explain model.camrt.onnx photos/ -o out/
  camrt ray-explain model.camrt.onnx photos/ -o out/ --actors 2 --manifest parquet
  camrt ray-explain model.camrt.onnx 'photos/**/*.png' -o out/ --ray-address auto --skip-existing
"""


def _ray_explain(ctx: click.Context, model: str, inputs: tuple[str, ...], outdir: str, actors: int,
                 num_gpus: float, ray_address: str | None, manifest: str, quiet: bool, method: str,
                 method_options: tuple[str, ...], targets: tuple[str, ...], regions: tuple[str, ...],
                 box_iou: float | None, box_format: str | None, box_layout: str | None,
                 layers: tuple[str, ...], batch_size: int,
                 device: str, threads: int | None, formats: str, colormap: str, alpha: float, softmax: bool,
                 skip_existing: bool) -> None:
    """Explain MODEL's decisions on INPUT images on a Ray cluster: one actor per --actors, each with
    its own onnxruntime session. Files and records are those of `camrt explain`; the records go to
    OUTDIR/camrt-records.jsonl (or a Parquet folder) as batches finish, and to stdout unless --quiet.
    A rerun with --skip-existing redoes only what is missing. Exit code 1 when some inputs failed.
    """
    from ..explainer import Explainer
    from ..ray import explain_with_ray
    from ..target_parsing import parse_targets
    from .explain import checked_request

    options = parse_method_options(method_options)
    target_options = {"box_iou": box_iou, "box_format": box_format, "box_layout": box_layout}
    # the check `camrt explain` makes before reading inputs, here before any actor starts
    checked_request(Explainer(model, method=method, device="cpu", threads=threads, layer=list(layers) or None,
                              **options), parse_targets(targets, regions, **target_options), model)

    def echo(record: dict[str, Any]) -> None:
        click.echo(json.dumps(record, ensure_ascii=False))

    counts = explain_with_ray(
        model, inputs, outdir, manifest=manifest, actors=actors, batch_size=batch_size, num_gpus=num_gpus,
        ray_address=ray_address, skip_existing=skip_existing, records=None if quiet else echo, method=method,
        layers=layers, target=list(targets), region=list(regions), target_options=target_options, device=device, threads=threads, softmax=softmax,
        formats=formats, colormap=colormap, alpha=alpha, method_options=options)
    if not quiet:
        click.echo(f"camrt: {counts['records']} records ({counts['failed']} failed), {counts['skipped']} inputs "
                   "already done", err=True)
    if counts["failed"]:
        ctx.exit(int(ExitCode.SOME_INPUTS_FAILED))


def build_ray_explain_command() -> click.Command:
    shared = [param for param in explain_command.params if param.name in SHARED_OPTIONS]
    own = [
        click.Argument(["model"]),
        click.Argument(["inputs"], nargs=-1, required=True),
        click.Option(["-o", "--output", "outdir"], default=DEFAULT_OUTDIR, show_default=True, metavar="OUTDIR",
                     help="Output directory (created if needed; must be shared by the cluster's nodes)."),
        click.Option(["--actors"], type=click.IntRange(min=1), default=1, show_default=True,
                     help="Explainer actors (each holds one onnxruntime session)."),
        click.Option(["--num-gpus"], type=click.FloatRange(min=0), default=0, show_default=True,
                     help="GPUs per actor (onnxruntime-gpu on the workers)."),
        click.Option(["--ray-address"], default=None, metavar="ADDRESS",
                     help="An existing cluster (e.g. auto, or ray://head:10001); default: a local one."),
        click.Option(["--manifest"], type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True,
                     help="The records file: camrt-records.jsonl or a camrt-records.parquet folder of parts."),
        click.Option(["-q", "--quiet"], is_flag=True, help="No records on stdout, no summary on stderr."),
    ]
    return click.Command("ray-explain", callback=click.pass_context(_ray_explain), params=own + shared,
                         help=_ray_explain.__doc__, epilog=RAY_EPILOG, context_settings=CONTEXT_SETTINGS,
                         short_help="Explain images on a Ray cluster (local by default), resumable.")

