"""`camrt explain`: the command line over the batch engine (`camrt.batch`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import click

from ..batch import ExplainRun, Progress, RecordLog, is_terminal, iter_inputs, logged_records, record_line
from ..errors import ExitCode, UsageError
from .common import CONTEXT_SETTINGS, warn

#: The JSON-lines log written into OUTDIR when --format includes "jsonl".
RECORDS_FILE = "camrt-records.jsonl"
JSONL_FORMAT = "jsonl"
DEFAULT_OUTDIR = "camrt-out"


def _split_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    if not formats:
        raise UsageError("--format names no format")
    return list(dict.fromkeys(formats))


def parse_method_options(items: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value
    return options


def checked_request(explainer, request, model: str):
    """`request` bound to the explainer's file (a concept image embedded), once it is known that the
    file and method serve it: UsageError (class out of range, method refusing a seeded target) or
    ModelError (no seed entry) before any input is read."""
    from ..seeded_explain import check_serves, seeded_parts

    request.check(explainer.num_classes, model)
    for target in seeded_parts(request):
        check_serves(explainer, target)
    return request.bound(explainer)


EXPLAIN_EPILOG = """\b
Examples:
  camrt explain model.camrt.onnx photo.jpg photos/ -m gradcam -o out/
  camrt explain model.camrt.onnx 'photos/**/*.jpg' --target topk:3 --format png,npy,jsonl -o out/
  camrt explain model.camrt.onnx photos/ --target 2 --colormap turbo --alpha 0.4 -o out/
  camrt explain model.camrt.onnx photos/ --target 3,1 -o out/
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
@click.option("--target", "targets", multiple=True, default=("top1",), show_default=True,
              metavar="N|N,M,..|top1|topk:K|above:T|KIND:V",
              help="Class index to explain, a list of classes (one record each), the top-1 class, the K best "
                   "classes (K records per input), every class whose score is above T (above:sigmoid:P: whose "
                   "sigmoid is above P; multi-label heads), or, in a file exported with --seed: seg:C (class C's "
                   "logits over a region), similar:F (cosine similarity to the embedding in F.npy, or to the "
                   "file's embedding of the image F), box:x1,y1,x2,y2[:L] (a raw detection head's candidates "
                   "matching a box, in model input pixels), or a plugin's KIND:V. Repeat for several targets per "
                   "input (one record each).")
@click.option("--region", "regions", metavar="MASK", multiple=True,
              help="With --target seg:C: a mask image whose nonzero pixels are the region (default, or 'argmax': "
                   "the pixels where C is the argmax). Once: every seg target's region; repeated: one per seg "
                   "target, in the order of --target.")
@click.option("--box-iou", type=float, default=None, metavar="T",
              help="With --target box:...: a candidate matches when its IoU with the box exceeds T, in [0, 1) "
                   "(default 0.5).")
@click.option("--box-format", type=click.Choice(["cxcywh", "xyxy"]), default=None,
              help="With --target box:...: the head's boxes as centre and size or as corners (default cxcywh).")
@click.option("--box-layout", type=click.Choice(["candidates-last", "candidates-first"]), default=None,
              help="With --target box:...: the head is [B, 4+C, N] (candidates-last, ultralytics; default) or "
                   "[B, N, 4+C] (candidates-first: YOLOv5, torchvision detectors' decoded heads).")
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
                    method_options: tuple[str, ...], outdir: str, targets: tuple[str, ...], regions: tuple[str, ...],
                    box_iou: float | None, box_format: str | None, box_layout: str | None, layers: tuple[str, ...],
                    batch_size: int, device: str, threads: int | None, graph_optimization: str, formats: str,
                    colormap: str, alpha: float, softmax: bool, skip_existing: bool, fail_fast: bool,
                    jsonl_path: str | None, quiet: bool) -> None:
    """Explain MODEL's decisions on INPUT images: files, directories (walked for image files),
    globs, or - for paths on stdin.

    Writes <stem>.overlay.png and <stem>.heatmap.npy per input into OUTDIR (top-k:
    <stem>.top<rank>.*; inputs with the same stem get <stem>-2, <stem>-3, ...), each file
    atomically, and prints one JSON line per input (per class with top-k). Exit code 0 when every
    input was explained, 1 when some failed (their records say why), 2 for a usage error, 3 for a
    model or contract error. Several targets per input (class lists, above:T, repeated --target):
    <stem>.class<N>.* for classes, <stem>.top<rank>.* for above:T, <stem>.target<rank>.* otherwise.
    """
    from ..explainer import Explainer
    from ..imaging.render import colormap_code, remove_stale_temporaries
    from ..plugins.registry import build_renderer_registry
    from ..target_parsing import parse_targets

    wanted = _split_formats(formats)
    registry = build_renderer_registry()
    renderers = [registry.get(name) for name in wanted if name != JSONL_FORMAT]
    request = parse_targets(targets, regions, box_iou=box_iou, box_format=box_format, box_layout=box_layout)
    colormap_code(colormap)
    explainer = Explainer(model, method=method, device=device, threads=threads, layer=list(layers) or None,
                          softmax=True if softmax else None, graph_optimization=graph_optimization,
                          **parse_method_options(method_options))
    request = checked_request(explainer, request, model)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output directory {outdir}: {exc.strerror or exc}") from None
    if skip_existing:
        remove_stale_temporaries(outdir)
    say = (lambda message: None) if quiet else warn
    paths: Iterable[str] = iter_inputs(inputs, sys.stdin, skip_dir=outdir, warn=say)
    progress = None
    if not quiet and is_terminal(sys.stderr):
        if "-" not in inputs:  # a stdin list streams; others are listed first for the total
            paths = list(paths)
        progress = Progress(len(paths) if isinstance(paths, list) else None, sys.stderr)
    log_paths = [os.path.join(outdir, RECORDS_FILE)] if JSONL_FORMAT in wanted else []
    if jsonl_path not in (None, "-"):
        log_paths.append(jsonl_path)
    previous = logged_records(log_paths) if skip_existing and log_paths else None
    run = ExplainRun(explainer, request, renderers, outdir, {"alpha": alpha, "colormap": colormap}, skip_existing,
                     previous)
    logs: list[RecordLog] = []
    total = failed = 0
    try:
        for path in log_paths:
            logs.append(RecordLog(path, resume=skip_existing))
        to_stdout = jsonl_path in (None, "-")
        for records in run.run(paths, batch_size):
            for record in records:
                line = record_line(record)
                if to_stdout:
                    click.echo(line)
                for log in logs:
                    log.write(line)
            total += len(records)
            chunk_failed = sum(record["status"] != "ok" for record in records)
            failed += chunk_failed
            if progress is not None:
                progress.update(records)
            if chunk_failed and fail_fast:
                say("stopping at the first failed batch (--fail-fast)")
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
