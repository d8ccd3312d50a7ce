"""Edge formats side by side in one run: int8 (QDQ) and float16 explanations against float32 ones.

    python bench/edge.py                        # ResNet-50, MobileNetV3-Large, EfficientNet-Lite0; ~15 min on 2 cores
    python bench/edge.py --models resnet18 --repeats 3 --results /tmp/edge    # a quick look

Run from the repository root with the runtime and the exporters importable
(`PYTHONPATH=$PWD:$PWD/exporters`) and onnxconverter-common installed. For each model it:

1. makes the edge files as an edge user would (tests/exporters/edge_models.py): the float32 ONNX file,
   its QDQ int8 quantization (onnxruntime `quantize_static`, per-channel weights, calibrated on
   scikit-image's photographs) and its float16 conversion (onnxconverter-common), then camrt files of
   each: Grad-CAM only (`--rules ""`), with input gradients (vanilla, guided) and the same `--compact`;
   all cached in bench/.cache/edge/;
2. times, in this process and with the same thread count: plain onnxruntime inference of the float32
   and int8 files (the floor) and camrt's Grad-CAM and saliency of every format (`Explainer.explain` on a
   preprocessed NCHW batch), at batch 1 (median latency) and batch 8 (images/s), after a warm-up;
3. compares the int8 and float16 Grad-CAM heatmaps with the float32 file's on the photographs
   (Pearson, max abs difference of the [0, 1] maps; EfficientNet-Lite0 has real ImageNet weights, the
   torchvision models fixed random ones);
4. measures the footprint: file sizes, the peak resident memory of one `camrt explain` process per
   method family (Grad-CAM: CAM methods; saliency: input gradients; Score-CAM on its 64 top channels:
   perturbation) and its wall time from a cold start (Python, imports, session creation, one image);
5. writes <results>/<name>.json and .md (docs/edge.md quotes the tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache" / "edge"
sys.path.insert(0, str(ROOT))

#: model -> (mean, std, scale) of its preprocessing (EfficientNet-Lite0: (x - 127) / 128 on 0..255).
MODELS = {
    "resnet50": None,
    "mobilenet_v3_large": None,
    "efficientnet_lite0": ((127.0,) * 3, (128.0,) * 3, 1.0),
    "resnet18": None,
}
FORMATS = ("fp32", "int8", "fp16")
#: camrt file variants: name -> (rule sets, compact)
VARIANTS = {"gradcam": ((), False), "full": (("vanilla", "guided"), False), "compact": (("vanilla", "guided"), True)}
#: method family -> (method, the file variant it needs)
FAMILIES = {"gradcam": ("gradcam", "gradcam"), "saliency": ("saliency", "full"), "scorecam": ("scorecam", "gradcam")}
BATCH = 8
#: Score-CAM scores the 64 channels of largest variance (the exact method scores all 2048 of ResNet-50's
#: last layer, minutes on a small CPU; the memory is the same).
FAMILY_OPTIONS = {"scorecam": ("-O", "top_channels=64")}
#: Runs `camrt` with the given arguments, then prints the process's peak resident memory (VmHWM, kB) to
#: stderr: that of its own address space (a child's ru_maxrss starts at its parent's, this script's GBs).
_PEAK_RSS_LAUNCHER = """
import sys
from camrt.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    if done.code:
        raise
finally:
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(peak.split()[0], peak.split()[1], file=sys.stderr)
"""


def _preprocessing(name: str):
    from camrt import contract

    custom = MODELS[name]
    if custom is None:
        return contract.Preprocessing(224, 224)
    mean, std, scale = custom
    return contract.Preprocessing(224, 224, mean=mean, std=std, scale=scale)


def _photos(name: str) -> np.ndarray:
    from tests.exporters import edge_models

    p = _preprocessing(name)
    return edge_models.photo_batch(224, p.mean, p.std, p.scale)


def make_files(name: str, log, refusals: dict[str, str]) -> dict[str, Path]:
    """The plain files (fp32, int8, fp16) and the camrt files (<format>.<variant>) of `name`, cached;
    self-check refusals recorded in `refusals` (see _export)."""
    from camrt_exporters.export import write_model
    from tests.exporters import edge_models, models

    folder = CACHE / name
    folder.mkdir(parents=True, exist_ok=True)
    files = {"fp32": folder / "fp32.onnx", "int8": folder / "int8.onnx", "fp16": folder / "fp16.onnx"}
    if not files["fp32"].exists():
        model = models.load(name)
        edge_models.export_float(model, files["fp32"])
    if not files["int8"].exists():
        edge_models.quantize_qdq(files["fp32"], files["int8"], _photos(name))
    if not files["fp16"].exists():
        edge_models.convert_float16(files["fp32"], files["fp16"])
    for fmt in FORMATS:
        for variant, (rules, compact) in VARIANTS.items():
            path = folder / f"{fmt}.{variant}.camrt.onnx"
            if not path.exists():
                log(f"export {name} {fmt} {variant}")
                write_model(_export(files[fmt], rules, compact, _preprocessing(name), refusals, f"{fmt}.{variant}"),
                            path)
            files[f"{fmt}.{variant}"] = path
    return files


def _export(source: Path, rules, compact: bool, preprocessing, refusals: dict[str, str], key: str):
    """export_onnx; a file its self-check refuses is made anyway, for timing only, and the refusal recorded
    in `refusals` (the report prints it): random-weight ResNet-50's float32 input gradient measures 2.8e-2
    against the 1e-2 finite-difference tolerance, on main as well."""
    from camrt_exporters import export
    from camrt_exporters.errors import ValidationError

    try:
        return export.export_onnx(source, rules=rules, compact=compact, preprocessing=preprocessing)[0]
    except ValidationError as exc:
        refusals[key] = str(exc).replace("\n", " ")
    checking = export.validate_finite_differences
    export.validate_finite_differences = lambda *args: []  # the refusal is recorded above
    try:
        return export.export_onnx(source, rules=rules, compact=compact, preprocessing=preprocessing)[0]
    finally:
        export.validate_finite_differences = checking


def _timed(run, batch: np.ndarray, repeats: int) -> dict[str, float]:
    """Median latency (ms) at batch 1 and images/s at batch BATCH, after one warm-up call each."""
    single, full = batch[:1], np.concatenate([batch] * (BATCH // len(batch) + 1))[:BATCH]
    results = {}
    for key, x in (("latency_ms", single), ("images_per_s", full)):
        run(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results[key] = median * 1000 if key == "latency_ms" else len(x) / median
    return results


def speed(name: str, files: dict[str, Path], threads: int, repeats: int) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    from camrt import Explainer

    x = _photos(name)
    rows = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for fmt in ("fp32", "int8", "fp16"):
        session = ort.InferenceSession(str(files[fmt]), options, providers=["CPUExecutionProvider"])
        dtype = np.float16 if fmt == "fp16" else np.float32
        rows[f"onnxruntime inference {fmt}"] = _timed(lambda b, session=session, dtype=dtype: session.run(None, {"input": b.astype(dtype)}), x, repeats)
    for method, variant in (("gradcam", "gradcam"), ("saliency", "full"), ("saliency", "compact")):
        for fmt in FORMATS:
            explainer = Explainer(files[f"{fmt}.{variant}"], method=method, device="cpu", threads=threads)
            rows[f"camrt {method} {fmt}{' --compact' if variant == 'compact' else ''}"] = _timed(explainer.explain, x,
                                                                                                  repeats)
    return rows


def agreement(name: str, files: dict[str, Path], threads: int) -> dict[str, dict[str, float]]:
    """Grad-CAM heatmaps of the int8 and float16 files against the float32 file's on the photographs, all of
    the float32 file's top-1 class; and how many top-1 classes the int8/float16 file shares with it."""
    from camrt import Explainer

    x = _photos(name)

    def explain(fmt: str, targets=None):
        return Explainer(files[f"{fmt}.gradcam"], method="gradcam", device="cpu", threads=threads).explain(x, targets)

    reference = explain("fp32")
    float_targets = [e.target for e in reference]
    rows = {}
    for fmt in ("int8", "fp16"):
        own_top1 = [e.target for e in explain(fmt)]
        maps = np.stack([e.heatmap for e in explain(fmt, float_targets)])  # the float model's class, explained
        float_maps = np.stack([e.heatmap for e in reference])
        rows[fmt] = {"pearson": float(np.corrcoef(maps.ravel(), float_maps.ravel())[0, 1]),
                     "max_abs": float(np.abs(maps - float_maps).max()),
                     "same_top1": sum(a == b for a, b in zip(own_top1, float_targets)), "images": len(x)}
    return rows


def footprint(name: str, files: dict[str, Path], threads: int, photo: Path) -> dict[str, dict[str, float]]:
    """File sizes (MB) and, per method family, one cold `camrt explain` process: peak RSS (MB) and wall s."""
    rows: dict[str, dict[str, float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for fmt in FORMATS:
        row = {"model_mb": files[fmt].stat().st_size / 1e6}
        row.update({f"{variant}_file_mb": files[f"{fmt}.{variant}"].stat().st_size / 1e6 for variant in VARIANTS})
        for family, (method, variant) in FAMILIES.items():
            out = CACHE / "explain-out"
            start = time.perf_counter()
            args = ["explain", str(files[f"{fmt}.{variant}"]), str(photo), "-m", method, "--threads", str(threads),
                    "-o", str(out), *FAMILY_OPTIONS.get(family, ())]
            result = subprocess.run([sys.executable, "-c", _PEAK_RSS_LAUNCHER, *args], env=env, text=True,
                                    capture_output=True, check=False)
            wall = time.perf_counter() - start
            if result.returncode:
                raise RuntimeError(f"camrt {' '.join(args)} failed: {result.stderr[-500:]}")
            row[f"{family}_rss_mb"] = float(result.stderr.strip().splitlines()[-1].split()[1]) / 1024
            row[f"{family}_cold_s"] = wall
        rows[fmt] = row
    return rows


def _photo_file() -> Path:
    import cv2
    import skimage.data

    path = CACHE / "chelsea.png"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR))
    return path


def markdown(report: dict) -> str:
    lines = [f"# Edge formats: int8 (QDQ) and float16 against float32 ({report['date']})", "",
             f"Machine: {report['machine']}; onnxruntime {report['onnxruntime']}, {report['threads']} thread(s), "
             f"{report['repeats']} repeats (medians). Produced by `python bench/edge.py`.", ""]
    refused = [f"- {name} {key}: {why}" for name, rows in report["self_check_refusals"].items()
               for key, why in rows.items()]
    if refused:
        lines += ["Files the export self-check refused (made anyway for these measurements; exports made "
                  "before the cache was filled are not listed):", "", *refused, ""]
    lines += ["## Speed", "", "| model | what | batch 1 latency (ms) | batch 8 (images/s) |", "|---|---|---:|---:|"]
    for name, rows in report["speed"].items():
        for what, row in rows.items():
            lines.append(f"| {name} | {what} | {row['latency_ms']:.1f} | {row['images_per_s']:.1f} |")
    lines += ["", "## Grad-CAM agreement with the float32 file (photographs, the float32 top-1 class explained)", "",
              "| model | format | Pearson | max abs | same top-1 |", "|---|---|---:|---:|---:|"]
    for name, rows in report["agreement"].items():
        for fmt, row in rows.items():
            lines.append(f"| {name} | {fmt} | {row['pearson']:.4f} | {row['max_abs']:.3f} | "
                         f"{row['same_top1']}/{row['images']} |")
    lines += ["", "## Footprint", "",
              "Sizes in MB; peak resident memory (VmHWM, MB) and cold-start wall time (s) of one `camrt explain` "
              "process on one photograph, per method family (Score-CAM: `-O top_channels=64`).", "",
              "| model | format | model file | Grad-CAM file | + input gradients | + input gradients --compact | "
              "Grad-CAM RSS / cold s | saliency RSS / cold s | Score-CAM RSS / cold s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in report["footprint"].items():
        for fmt, r in rows.items():
            lines.append(f"| {name} | {fmt} | {r['model_mb']:.1f} | {r['gradcam_file_mb']:.1f} | {r['full_file_mb']:.1f} | "
                         f"{r['compact_file_mb']:.1f} | {r['gradcam_rss_mb']:.0f} / {r['gradcam_cold_s']:.2f} | "
                         f"{r['saliency_rss_mb']:.0f} / {r['saliency_cold_s']:.2f} | "
                         f"{r['scorecam_rss_mb']:.0f} / {r['scorecam_cold_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,mobilenet_v3_large,efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default=f"{datetime.date.today().isoformat()}-edge")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats,
              "speed": {}, "agreement": {}, "footprint": {}, "self_check_refusals": {}}
    photo = _photo_file()
    for name in args.models.split(","):
        report["self_check_refusals"][name] = {}
        files = make_files(name, log, report["self_check_refusals"][name])
        log(f"{name}: speed")
        report["speed"][name] = speed(name, files, args.threads, args.repeats)
        log(f"{name}: agreement")
        report["agreement"][name] = agreement(name, files, args.threads)
        log(f"{name}: footprint")
        report["footprint"][name] = footprint(name, files, args.threads, photo)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (results / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
