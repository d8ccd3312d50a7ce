"""The ONNX front end on files written by real converters: `camrt export` on torch's two exporters.

For each model (torchvision, timm; random weights, torch.manual_seed(0), eval mode) and each torch
exporter (`legacy`: torch.onnx.export(dynamo=False, dynamic_axes batch); `dynamo`: dynamo=True with a
dynamic batch), the sweep
1. writes the plain ONNX file once (cached in bench/.cache/onnx_sweep/, failures too: delete the
   cached file or its .error.json to retry);
2. runs `camrt export PLAIN -o OUT` in a subprocess with a timeout (a crash or hang is a row, not
   the end of the sweep): exit code, the first `camrt: error:` line, seconds;
3. checks every written file's gradients independently of camrt's own self-check: central
   differences of the ORIGINAL plain file's target logit (onnxruntime float32, chelsea at the
   model's size) along unit-norm directions (one along the gradient, two random), at several steps,
   Richardson-extrapolated at the best-conditioned pair; error = max |fd - <g, v>| / ||g|| over the
   directions, with the FD's own noise next to it, for the vanilla input gradient and for the
   default layer's gradient (the plain graph's layer tensor perturbed through a copy of the graph
   cut there); the input gradient also against torch autograd of the same model, the oracle where
   a random-weight model's gradient is too small for float32 finite differences (googlenet). A
   self-check refusal is written again with camrt's check off and checked the same way, so a
   false refusal shows as such;
4. writes <results>/<date>-onnx-sweep.json and .md (model, exporter, result, gradient errors,
   seconds, and the refusals grouped by construct).

On 2 shared cores the full sweep (52 rows) took 19 minutes: torch exports 10, camrt export 5,
checks 3; a rerun on the cached plain files (--skip-torch-export) 16, half of it writing and checking
the self-check refusals again with the check off (gone once the self-check is fixed).

    python bench/onnx_sweep.py                                   # every model, both exporters
    python bench/onnx_sweep.py --models resnet18,densenet121 --exporters legacy --timeout 300
    python bench/onnx_sweep.py --skip-torch-export               # cached plain files only (quick rerun)

Run from the repository root with the runtime and the exporters importable (PYTHONPATH=$PWD:$PWD/exporters)
and timm installed (pretrained=False: nothing is downloaded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "exporters")]

from bench.run import machine, versions  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "onnx_sweep"
EXPORTERS = ("legacy", "dynamo")
#: model -> (library, constructor keyword arguments). Input sizes: torchvision 224 (inception_v3
#: 299), timm its pretrained_cfg's.
MODELS: dict[str, tuple[str, dict]] = {
    **{name: ("torchvision", {}) for name in (
        "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0",
        "densenet121", "vgg11_bn", "squeezenet1_1", "shufflenet_v2_x1_0", "regnet_y_400mf", "convnext_tiny")},
    "googlenet": ("torchvision", {"aux_logits": False, "init_weights": True}),
    "inception_v3": ("torchvision", {"aux_logits": False, "init_weights": True}),
    **{name: ("timm", {}) for name in (
        "resnet50d", "efficientnet_lite0", "ghostnet_100", "rexnet_100", "repvgg_a0", "convnextv2_atto",
        "mobilevitv2_050", "levit_128s", "lcnet_050",
        # the transformer issue's: legacy files are refused on the dynamic batch; dynamo files export,
        # with a default layer that is no token map (the transformer issue)
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224")},
}
INPUT_NAME = "input"
EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1; 2 keeps the batch dimension symbolic
#: central-difference steps, relative to the point's L2 norm (a 224x224 image of (x - 127) / 128:
#: about 0.1 to 0.006 in norm, under 3e-4 per pixel; activations of random-weight models reach 1e6)
STEPS = (5e-4, 2.5e-4, 1.25e-4, 6.25e-5, 3.125e-5)
#: camrt export's message when its own finite-difference check refuses (the file is then written
#: once more with that check off and checked here, to tell a false refusal from a wrong gradient)
SELF_CHECK_REFUSAL = "export validation failed"


# --- the plain files -------------------------------------------------------------------------


def build_model(name: str):
    import torch

    library, kwargs = MODELS[name]
    torch.manual_seed(0)
    if library == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **kwargs)
        size = 299 if name == "inception_v3" else 224
    else:
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
        size = model.pretrained_cfg["input_size"][-1]
    return model.eval(), size


def write_plain(name: str, exporter: str, path: str) -> None:
    """Export `name` with torch's `exporter` to `path` (run in a subprocess of its own)."""
    import torch

    model, size = build_model(name)
    x = torch.randn(EXAMPLE_BATCH, 3, size, size)
    with torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=[INPUT_NAME], output_names=["logits"],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}})
        else:
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(path)


def plain_file(name: str, exporter: str, timeout: float, skip_torch_export: bool, env: dict) -> tuple[Path | None, dict]:
    """The cached plain file (written now unless skip_torch_export) and how its export went."""
    path = CACHE / f"{name}.{exporter}.onnx"
    record = CACHE / f"{name}.{exporter}.json"
    if path.exists() and record.exists():
        return path, json.loads(record.read_text())
    failed = CACHE / f"{name}.{exporter}.error.json"
    if failed.exists():
        return None, json.loads(failed.read_text())
    if skip_torch_export:
        return None, {"torch_error": "not cached (--skip-torch-export)", "torch_export_s": None}
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) / path.name
        error = _call_here("write_plain", [name, exporter, str(tmp)], tmp, timeout, env, "torch export")
        seconds = round(time.perf_counter() - start, 1)
        if error is None:
            tmp.replace(path)
            record.write_text(json.dumps({"torch_error": None, "torch_export_s": seconds}) + "\n")
            return path, json.loads(record.read_text())
    failed.write_text(json.dumps({"torch_error": error, "torch_export_s": seconds}) + "\n")
    return None, json.loads(failed.read_text())


def _call_here(function: str, args: list[str], writes: Path, timeout: float, env: dict, what: str) -> str | None:
    """Run this module's `function(*args)` in a subprocess of its own (a crash or hang stays there):
    None when it wrote `writes`, else its error line."""
    code = f"import sys; sys.path[:0] = [sys.argv[1]]; from bench.onnx_sweep import {function}; {function}(*sys.argv[2:])"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(ROOT), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"{what} timed out after {timeout:.0f} s"
    return None if done.returncode == 0 and writes.exists() else _last_error(done.stderr)


def _last_error(stderr: str) -> str:
    """The exception line of a Python traceback (the last line naming an Error), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":", 1)[0]]
    return (errors or lines or ["no output"])[-1][:300]


# --- camrt export ----------------------------------------------------------------------------


def camrt_export(plain: Path, out: Path, timeout: float, env: dict) -> dict:
    command = [sys.executable, "-m", "camrt", "export", str(plain), "-o", str(out)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"exit_code": None, "error": f"camrt export timed out after {timeout:.0f} s",
                "export_s": round(time.perf_counter() - start, 1)}
    seconds = round(time.perf_counter() - start, 1)
    error = None
    if done.returncode != 0 or not out.exists():
        error = _camrt_error(done.stderr) or _last_error(done.stderr)
    return {"exit_code": done.returncode, "error": error, "export_s": seconds}


def _camrt_error(stderr: str) -> str | None:
    """The `camrt: error:` message with its indented continuation lines, on one line."""
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("camrt: error:")), None)
    if first is None:
        return None
    message = [lines[first].removeprefix("camrt: error: ").rstrip(":")]
    message += [line.strip() for line in lines[first + 1:] if line.startswith(" ")]
    return "; ".join(message)[:400]


def export_unchecked(plain: str, out: str) -> None:
    """`camrt export` with its finite-difference self-check off (run in a subprocess of its own): what
    a self-check refusal would have written, so the independent check can tell a false refusal from a
    wrong gradient."""
    from camrt_exporters import export

    if not hasattr(export, "validate_finite_differences"):
        raise AttributeError("camrt_exporters.export.validate_finite_differences is gone: update the sweep's bypass")
    export.validate_finite_differences = lambda *args, **kwargs: []
    model, _ = export.export_onnx(plain)
    export.write_model(model, out)


# --- the independent gradient check ----------------------------------------------------------


@dataclass(frozen=True)
class Directional:
    """error: max |fd - <g, v>| / ||g|| over the directions; noise: the largest disagreement of the two
    central differences behind an fd estimate, / ||g|| (an error below it is not resolved)."""

    error: float
    noise: float


def directional_error(f, point: np.ndarray, gradient: np.ndarray, directions: list[np.ndarray],
                      steps: tuple[float, ...] = STEPS) -> Directional:
    """|fd - <g, v>| / ||g|| along unit-norm `directions` v, fd estimating d f(point + t v)/dt at 0
    with steps t = steps * ||point||.

    point is one sample with its batch axis ([1, ...]); f maps k points concatenated along it to k
    scores. Per direction: central differences D(h) at each step, and the Richardson estimate
    (4 D(h/2) - D(h)) / 3 of the consecutive pair whose two central differences agree best (the pair
    least hurt by float32 rounding at small steps and by curvature or switch crossings at large
    ones); the choice never looks at g."""
    norm = float(np.linalg.norm(gradient)) or 1.0
    steps = tuple(h * float(np.linalg.norm(point)) for h in steps)
    error = noise = 0.0
    for v in directions:
        v = v / np.linalg.norm(v)
        points = [point + sign * h * v for h in steps for sign in (1.0, -1.0)]
        scores = np.asarray(f(np.concatenate(points).astype(np.float32)), dtype=np.float64).reshape(len(steps), 2)
        central = (scores[:, 0] - scores[:, 1]) / (2 * np.asarray(steps))
        # float32 spacing of the scores over the step: two equal central differences (the score did
        # not move at all) are no evidence of agreement below it
        resolution = float(np.spacing(np.abs(scores).max().astype(np.float32))) / np.asarray(steps)
        disagreement = np.maximum(np.abs(np.diff(central)), resolution[1:])
        best = int(np.argmin(disagreement))
        fd = (4 * central[best + 1] - central[best]) / 3
        error = max(error, abs(fd - float(np.vdot(gradient, v))) / norm)
        noise = max(noise, float(disagreement[best]) / norm)
    return Directional(error, noise)


def check_directions(gradient: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """One direction along the gradient, two random ones."""
    rng = np.random.default_rng(seed)
    return [gradient.astype(np.float64), *(rng.standard_normal(gradient.shape) for _ in range(2))]


def autograd_error(name: str, x: np.ndarray, target: int, gradient: np.ndarray) -> float:
    """||g - torch's|| / ||torch's||: the same model (seed, eval mode) differentiated by torch autograd,
    an oracle that needs no step (the finite differences cannot resolve a gradient that is tiny
    against its logit's float32 rounding)."""
    import torch

    model, _ = build_model(name)
    image = torch.from_numpy(x).requires_grad_()
    model(image)[0, target].backward()
    expected = image.grad.numpy().astype(np.float64)
    return float(np.linalg.norm(gradient - expected) / (np.linalg.norm(expected) or 1.0))


def _session(model_or_path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model_or_path if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                providers=["CPUExecutionProvider"])


def _cut_at(plain, layer: str, output: str):
    """The plain graph from (layer tensor, image) to `output`: the layer becomes an input."""
    import onnx
    from onnx.utils import Extractor

    image = [i.name for i in plain.graph.input if i.name not in {t.name for t in plain.graph.initializer}]
    return Extractor(onnx.shape_inference.infer_shapes(plain)).extract_model([layer, *image], [output])


def check_gradients(name: str, plain_path: Path, camrt_path: Path, size: int, threads: int) -> dict:
    """The written file's vanilla input gradient and default layer gradient against finite differences
    of the plain file (only onnx and onnxruntime), the input gradient also against torch autograd;
    none of it is camrt's validation."""
    import onnx

    from tests.exporters.models import photos

    plain = onnx.load(str(plain_path))
    meta = {p.key: p.value for p in onnx.load(str(camrt_path), load_external_data=False).metadata_props}
    image, layer = meta["camrt.input"], meta["camrt.default_layer"]
    score = json.loads(meta["camrt.score"])["tensor"]
    output = plain.graph.output[0].name
    if score != output:
        return {"layer": layer, "note": f"score tensor {score!r} is not the plain output {output!r}"}
    x = photos(size)[:1]
    logits_of = _session(plain_path, threads)
    target = int(np.argmax(logits_of.run([output], {image: x})[0][0]))
    ours = _session(camrt_path, threads)
    input_grad, layer_grad, activation = ours.run(
        ["camrt/input_grad/vanilla", f"camrt/grad/{layer}", f"camrt/act/{layer}"],
        {image: x, "camrt/target": np.array([target], np.int64)})

    def score_of_image(points):
        return logits_of.run([output], {image: points})[0][:, target]

    by_input = directional_error(score_of_image, x, input_grad, check_directions(input_grad))
    result = {"layer": layer, "input_grad_error": by_input.error, "input_grad_fd_noise": by_input.noise,
              "autograd_error": autograd_error(name, x, target, input_grad)}
    if layer not in {n for node in plain.graph.node for n in node.output}:
        return {**result, "note": f"layer {layer!r} is not a tensor of the plain file"}
    cut = _cut_at(plain, layer, output)
    cut_inputs = {i.name for i in cut.graph.input}
    from_layer = _session(cut, threads)

    def score_of_layer(points):
        feeds = {layer: points}
        if image in cut_inputs:  # a path around the layer: the image stays fixed
            feeds[image] = np.repeat(x, len(points), axis=0)
        return from_layer.run([output], feeds)[0][:, target]

    by_layer = directional_error(score_of_layer, activation, layer_grad, check_directions(layer_grad))
    return {**result, "layer_grad_error": by_layer.error, "layer_grad_fd_noise": by_layer.noise}


# --- the sweep -------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    exporter: str
    result: str
    input_grad_error: float | None = None
    input_grad_fd_noise: float | None = None
    autograd_error: float | None = None
    layer_grad_error: float | None = None
    layer_grad_fd_noise: float | None = None
    layer: str | None = None
    torch_export_s: float | None = None
    camrt_export_s: float | None = None
    check_s: float | None = None
    exit_code: int | None = None
    note: str | None = None


def subprocess_env(threads: int) -> dict:
    """This checkout's runtime and exporters, and no other camrt plugin (hermetic `camrt export`)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "CAMRT_DISABLE_PLUGIN_AUTOLOAD": "1",
            "CAMRT_PLUGINS": "camrt_exporters.plugin",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "exporters"), os.environ.get("PYTHONPATH", "")])}


def sweep_one(name: str, exporter: str, args, env: dict, scratch: Path) -> Row:
    plain, exported = plain_file(name, exporter, args.timeout, args.skip_torch_export, env)
    if plain is None:
        return Row(name, exporter, f"no plain file: {exported['torch_error']}", torch_export_s=exported["torch_export_s"])
    out = scratch / f"{name}.{exporter}.camrt.onnx"
    done = camrt_export(plain, out, args.timeout, env)
    row = Row(name, exporter, "ok" if done["error"] is None else f"refused: {done['error']}",
              torch_export_s=exported["torch_export_s"], camrt_export_s=done["export_s"], exit_code=done["exit_code"])
    written = done["error"] is None
    if not written and done["error"].startswith(SELF_CHECK_REFUSAL):
        error = _call_here("export_unchecked", [str(plain), str(out)], out, args.timeout, env, "unchecked export")
        written = error is None
        row.note = "errors of the file written with camrt's self-check off" if written else f"unchecked export: {error}"
    if written:
        start = time.perf_counter()
        try:
            _, size = input_size(plain)
            checked = check_gradients(name, plain, out, size, args.threads)
        except Exception as exc:  # a check that cannot run is a row, not the end of the sweep
            row.note = f"gradient check failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            note = checked.pop("note", None)
            for key, value in checked.items():
                setattr(row, key, value)
            row.note = "; ".join(n for n in (row.note, note) if n) or None
        row.check_s = round(time.perf_counter() - start, 1)
        out.unlink()
    return row


def input_size(plain: Path) -> tuple[int, int]:
    import onnx

    dims = onnx.load(str(plain), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[2].dim_value, dims[3].dim_value


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def _fd(error: float | None, noise: float | None) -> str:
    return "" if error is None else f"{error:.1e} ({noise:.0e})"


def cause(result: str) -> str:
    """A refusal without the names and figures of one file (op types stay): the key that groups rows
    by construct."""
    message = result.removeprefix("refused: ").split("; it lies on the differentiated path")[0]
    if message.startswith(SELF_CHECK_REFUSAL):
        checked = [part.split(":")[0] for part in message.split("; ")[1:]]
        kinds = sorted({"input gradient" if name.startswith("camrt/input_grad/") else "layer gradient" for name in checked})
        return f"camrt's finite-difference self-check refuses the {' and the '.join(kinds)}"
    message = re.sub(r"(op type '[^']*')|'[^']*'", lambda match: match.group(1) or "'…'", message)
    return re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", message)


def refusal_groups(rows: list[Row]) -> dict[str, list[str]]:
    """cause -> the model/exporter rows it refuses, the most frequent cause first."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r.result != "ok":
            groups.setdefault(cause(r.result), []).append(f"{r.model}/{r.exporter}")
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| model | exporter | result | input grad: fd error (fd noise) | vs torch autograd | layer grad: fd error (fd noise) | layer | torch export s | camrt export s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = r.result.replace("|", "\\|") + (f" ({r.note})" if r.note else "")
        lines.append(f"| {r.model} | {r.exporter} | {result} | {_fd(r.input_grad_error, r.input_grad_fd_noise)} "
                     f"| {_fmt(r.autograd_error)} | {_fd(r.layer_grad_error, r.layer_grad_fd_noise)} "
                     f"| {r.layer or ''} | {r.torch_export_s or ''} | {r.camrt_export_s or ''} |")
    lines += ["", "Refusals by cause:", ""]
    lines += [f"- {key} ({len(hits)}): {', '.join(hits)}" for key, hits in refusal_groups(rows).items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated; default: all of MODELS")
    parser.add_argument("--exporters", default=",".join(EXPORTERS), help="legacy, dynamo or both")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per torch export and per camrt export")
    parser.add_argument("--skip-torch-export", action="store_true", help="use cached plain files only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default=f"{datetime.date.today().isoformat()}-onnx-sweep")
    args = parser.parse_args(argv)
    models, exporters = args.models.split(","), args.exporters.split(",")
    unknown = [m for m in models if m not in MODELS] + [e for e in exporters if e not in EXPORTERS]
    if unknown:
        parser.error(f"unknown model or exporter {unknown}; models: {', '.join(MODELS)}; exporters: {', '.join(EXPORTERS)}")
    env = subprocess_env(args.threads)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in models:
            for exporter in exporters:
                rows.append(sweep_one(name, exporter, args, env, Path(scratch)))
                print(json.dumps(asdict(rows[-1])), flush=True)
    ok = sum(r.result == "ok" for r in rows)
    seconds = {part: round(sum(getattr(r, part) or 0.0 for r in rows)) for part in ("torch_export_s", "camrt_export_s", "check_s")}
    header = (f"`camrt export` on plain ONNX files of torch's exporters (random weights): {ok}/{len(rows)} ok. "
              "Gradient errors: max |fd - <g, v>| / ||g|| over unit-norm directions (one along g, two random), "
              "central differences of the plain file's target logit (Richardson, best-conditioned step pair; "
              "fd noise: that pair's disagreement / ||g||, an error below it is not resolved); vs torch autograd: "
              "||g - g_torch|| / ||g_torch|| of the same random-weight model; "
              "on a self-check refusal, of the file written with camrt's self-check off. "
              f"Seconds, all rows: torch export {seconds['torch_export_s']} (when the cached files were written), "
              f"camrt export {seconds['camrt_export_s']}, independent check {seconds['check_s']}, "
              f"this run {time.perf_counter() - start:.0f}.")
    result = {"rows": [asdict(r) for r in rows], "versions": {**versions(), "timm": _version("timm")},
              "machine": machine(), "threads": args.threads, "total_s": round(time.perf_counter() - start, 1)}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    Path(args.results, f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.results, f"{args.name}.md").write_text(markdown(rows, header))
    print(markdown(rows, header))
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
