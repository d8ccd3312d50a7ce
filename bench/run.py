"""camrt against the anchors, side by side in one run: speed, memory, start-up, and map agreement.

    python bench/run.py --config full     # 25-40 min on a 2-core machine; --config smoke: < 60 s
    python bench/run.py --config full --threads 2 --results bench/results

Run from the repository root with the runtime and the exporters importable
(`PYTHONPATH=$PWD:$PWD/exporters`, or both installed) and pytorch-grad-cam 1.5.7, torchcam and
Captum installed. What it does:

1. exports each model once with camrt's exporter (cached in bench/.cache/: the contract file, the
   forward-only graph pruned from it, the torch weights);
2. runs every (implementation, model, method) in its own subprocess, so that each peak resident
   memory (ru_maxrss) is that implementation's alone; each times every batch size after a warm-up
   (median images/s and the min-max spread over the repeats) and saves its last heatmaps;
3. compares each implementation's min-max-normalised heatmaps with pytorch-grad-cam's (Captum's for
   the input-gradient methods): the max abs difference is the oracle check of the run;
4. measures `import camrt`, a cold one-image `camrt explain` against a minimal onnxruntime script,
   and Score-CAM's top-channel variant's faithfulness cost against the exact map;
5. writes <results>/<date>-<machine>.json and .md (the Markdown tables docs/benchmarks.md quotes).

Implementations: camrt (`Explainer.explain` on an NCHW batch, heatmaps at 224), pgc
(pytorch-grad-cam 1.5.7), torchcam (its methods that exist: Grad-CAM, Grad-CAM++, Score-CAM; its
low-resolution maps upsampled by camrt.postprocess inside the timing), captum (saliency and guided
backprop: pytorch-grad-cam has no saliency, and its guided backprop explains one image per call),
ort (onnxruntime inference of the same model: the floor). Every process gets the same thread count
(onnxruntime intra-op threads, torch.set_num_threads, OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

#: model -> (tests/exporters/models.py name, explained layer). The layers are pytorch-grad-cam's
#: usual choice: the last feature map (EfficientNet-Lite0: the head's BatchNorm, because its head
#: activation `_swish` is a module called several times, which pytorch-grad-cam cannot hook).
MODELS = {
    "resnet50": "layer4",
    "mobilenet_v3_large": "features",
    "efficientnet_lite0": "_bn1",
    "resnet18": "layer4",
}

#: method -> implementations that have it (the first anchor listed is the oracle of the run).
METHODS = {
    "gradcam": ("camrt", "camrt-fused", "pgc", "torchcam"),
    "gradcam++": ("camrt", "pgc", "torchcam"),
    "scorecam": ("camrt", "pgc", "torchcam"),
    "ablationcam": ("camrt", "pgc"),
    "saliency": ("camrt", "captum"),
    "guided-backprop": ("camrt", "captum"),
}
ORACLE = {"saliency": "captum", "guided-backprop": "captum"}  # others: pgc
#: methods whose camrt maps are expected to equal the oracle's (docs/methods.md); Score-CAM follows
#: the paper's pixel-centre mask upsampling where pytorch-grad-cam uses align_corners=True.
PARITY_EXPECTED = {"gradcam", "gradcam++", "ablationcam", "saliency", "guided-backprop"}
#: extra passes per image: one pass per channel; measured at batch 1 only, one timed run.
HEAVY = {"scorecam", "ablationcam"}

CONFIGS = {
    "smoke": {
        "models": ["resnet18"],
        "batches": [1, 2],
        "methods": ["gradcam", "saliency"],
        "heavy_models": [],
        "scorecam_top": [],
        "repeats": 2,
        "budget_s": 2.0,
        "startup_repeats": 1,
    },
    # the targets' cases on ResNet-50 only (about 15 minutes on 2 quiet cores)
    "core": {
        "models": ["resnet50"],
        "batches": [1, 8],
        "methods": ["gradcam", "gradcam++", "saliency", "scorecam"],
        "heavy_models": ["resnet50"],
        "scorecam_top": [256],
        "repeats": 5,
        "budget_s": 10.0,
        "startup_repeats": 3,
    },
    "full": {
        "models": ["resnet50", "mobilenet_v3_large", "efficientnet_lite0"],
        "batches": [1, 8, 32],
        "methods": ["gradcam", "gradcam++", "saliency", "guided-backprop", "ablationcam", "scorecam"],
        # heavy methods (one pass per channel: 2048 for ResNet-50's layer4) run at batch 1, on
        # ResNet-50 only, to keep the run near 25 minutes on 2 cores
        "heavy_models": ["resnet50"],
        "scorecam_top": [64, 256],
        "repeats": 5,
        "budget_s": 10.0,
        "startup_repeats": 3,
    },
}
#: torchcam's Score-CAM on ResNet-50 costs as much as pytorch-grad-cam's (2048 passes per image);
#: it is left out of the full run to bound its time (pytorch-grad-cam is the anchor of the target).
SKIP = {("torchcam", "scorecam", "resnet50")}
PASS_BATCH = 32  # masked inputs / ablated copies per extra pass, the same for every implementation
INPUT_SIZE = 224


# --- preparing the models (in a subprocess of its own: torch + exporter) ---------------------


def prepare_model(name: str, cache: Path) -> dict[str, str]:
    """Export `name` once: contract file, forward-only graph, torch state dict (cached)."""
    paths = {"camrt": cache / f"{name}.camrt.onnx", "forward": cache / f"{name}.forward.onnx",
             "weights": cache / f"{name}.pt"}
    if not all(p.exists() for p in paths.values()):
        cache.mkdir(parents=True, exist_ok=True)
        code = ("import sys; sys.path[:0] = [sys.argv[1]]; from bench.run import _export; "
                "_export(sys.argv[2], sys.argv[3])")
        subprocess.run([sys.executable, "-c", code, str(ROOT), name, str(cache)], check=True, env=_env(2))
    return {k: str(v) for k, v in paths.items()}


def _export(name: str, cache: str) -> None:
    import onnx
    import torch

    from camrt import contract
    from camrt.execution.subgraphs import subgraph
    from camrt_exporters.export import export_torch, write_model
    from tests.exporters.models import load

    model = load(name)
    onnx_model, _ = export_torch(model, layers=[MODELS[name]], rules=[contract.RULE_VANILLA, contract.RULE_GUIDED],
                                 source_name=name)
    cache_dir = Path(cache)
    write_model(onnx_model, cache_dir / f"{name}.camrt.onnx")
    model_outputs = [o.name for o in onnx_model.graph.output if not o.name.startswith("camrt/")]
    forward = subgraph(onnx_model, model_outputs[:1])  # the model's own logits: no target input, no gradients
    onnx.checker.check_model(forward)
    write_model(forward, cache_dir / f"{name}.forward.onnx")
    torch.save(model.state_dict(), cache_dir / f"{name}.pt")


# --- the worker: one implementation, one model, one method, all batch sizes ---------------


def _env(threads: int) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "exporters"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
            "CAMRT_DISABLE_PLUGIN_AUTOLOAD": os.environ.get("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "1")}


def inputs(batch: int) -> np.ndarray:
    """The same preprocessed batch for every implementation (fixed seed)."""
    return np.random.default_rng(batch).standard_normal((batch, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)


def minmax(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(-2, -1), keepdims=True)
    return (maps - low) / (maps.max(axis=(-2, -1), keepdims=True) - low + 1e-7)


def _torch_model(spec: dict):
    import torch

    from camrt_exporters.torch_frontend import load_model
    from tests.exporters.models import ARCHITECTURES

    model = load_model(ARCHITECTURES[spec["model"]][0])
    model.load_state_dict(torch.load(spec["paths"]["weights"], map_location="cpu", weights_only=True))
    return model.eval()


def _explain_fn(spec: dict):
    """A function batch [B, 3, H, W] -> heatmaps [B, H, W] for the worker's implementation."""
    impl, method, threads, layer = spec["impl"], spec["method"], spec["threads"], spec["layer"]
    if impl == "ort":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(spec["paths"]["forward"], options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def inference(x):  # no heatmaps: the floor
            session.run(None, {name: x})

        return inference
    if impl in ("camrt", "camrt-fused"):
        from camrt import Explainer

        explainer = Explainer(spec["paths"]["camrt"], method=method, device="cpu", threads=threads,
                              layer=layer if method not in ("saliency", "guided-backprop") else None,
                              device_postprocess=impl == "camrt-fused", **spec.get("options", {}))
        return lambda x: np.stack([e.heatmap for e in explainer.explain(x)])

    import torch

    torch.set_num_threads(threads)
    model = _torch_model(spec)
    module = dict(model.named_modules())[layer]
    if impl == "pgc":
        import pytorch_grad_cam as pgc

        cls = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "scorecam": pgc.ScoreCAM,
               "ablationcam": pgc.AblationCAM}[method]
        kwargs = {"batch_size": PASS_BATCH} if method == "ablationcam" else {}
        cam = cls(model=model, target_layers=[module], **kwargs)
        cam.batch_size = PASS_BATCH  # Score-CAM reads it (default 16)
        return lambda x: cam(input_tensor=torch.from_numpy(x), targets=None)
    if impl == "torchcam":
        import torchcam.methods as tc

        from camrt.postprocess import finalize

        cls = {"gradcam": tc.GradCAM, "gradcam++": tc.GradCAMpp, "scorecam": tc.ScoreCAM}[method]
        kwargs = {"batch_size": PASS_BATCH} if method == "scorecam" else {}
        extractor = cls(model, target_layer=layer, **kwargs)

        def torchcam_explain(x):
            xt = torch.from_numpy(x)
            with torch.set_grad_enabled(method != "scorecam"):
                scores = model(xt)
            maps = extractor(scores.argmax(1).tolist(), scores)[0].detach().numpy()
            return np.stack([finalize([m], x.shape[2:]) for m in maps])

        return torchcam_explain
    if impl == "captum":
        import captum.attr as ca

        attribution = ca.Saliency(model) if method == "saliency" else ca.GuidedBackprop(model)

        def captum_explain(x):
            xt = torch.from_numpy(x)
            with torch.no_grad():
                targets = model(xt).argmax(1)
            grads = attribution.attribute(xt, target=targets).detach().numpy()
            return minmax(np.abs(grads).max(axis=1))

        return captum_explain
    raise ValueError(f"unknown implementation {impl!r}")


def worker(spec: dict) -> dict:
    """Time one implementation on each batch size; save its last heatmaps; report peak RSS."""
    start = time.perf_counter()
    explain = _explain_fn(spec)
    setup_s = time.perf_counter() - start
    rows = []
    for batch in spec["batches"]:
        x = inputs(batch)
        for _ in range(spec["warmup"]):
            explain(x)
        times, maps = [], None
        spent = time.perf_counter()
        while len(times) < spec["repeats"] and (len(times) < spec["min_repeats"]
                                                 or time.perf_counter() - spent < spec["budget_s"]):
            begin = time.perf_counter()
            maps = explain(x)
            times.append(time.perf_counter() - begin)
        if maps is not None:
            np.save(Path(spec["maps_dir"]) / f"{spec['key']}-b{batch}.npy", minmax(maps))
        median = statistics.median(times)
        rows.append({"batch": batch, "times_ms": [round(t * 1e3, 2) for t in times],
                     "median_ms": round(median * 1e3, 2), "images_per_s": round(batch / median, 3),
                     "images_per_s_min": round(batch / max(times), 3),
                     "images_per_s_max": round(batch / min(times), 3)})
    return {"setup_s": round(setup_s, 2), "rows": rows,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_worker(spec: dict, threads: int) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__)), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=_env(threads))
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec['key']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- start-up costs --------------------------------------------------------------------------

MINIMAL_ORT = """
import sys, time
import cv2, numpy as np, onnxruntime as ort
image = cv2.cvtColor(cv2.imread(sys.argv[2]), cv2.COLOR_BGR2RGB)
x = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
x = ((x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)).astype(np.float32).transpose(2, 0, 1)[None]
options = ort.SessionOptions(); options.intra_op_num_threads = int(sys.argv[3])
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(int(session.run(None, {session.get_inputs()[0].name: x})[0].argmax()))
"""


def _wall(command: list[str], threads: int, repeats: int, env_extra: dict | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**_env(threads), **(env_extra or {})})
        times.append(round(time.perf_counter() - start, 3))
    return times


def startup(paths: dict, threads: int, repeats: int, scratch: Path) -> dict:
    """`import camrt` time (in-process), and a cold one-image `camrt explain` vs the minimal ORT script."""
    import cv2

    probe = "import time; t = time.perf_counter(); import camrt; print(time.perf_counter() - t)"
    imports = [float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                                    env=_env(threads)).stdout) for _ in range(max(repeats, 3))]
    image = scratch / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    script = scratch / "minimal_ort.py"
    script.write_text(MINIMAL_ORT)
    explain = [sys.executable, "-m", "camrt", "explain", paths["camrt"], str(image), "-o", str(scratch / "out"),
               "--device", "cpu", "--threads", str(threads)]
    plain = [sys.executable, str(script), paths["forward"], str(image), str(threads)]
    cold = {
        "camrt_explain_s": _wall(explain, threads, repeats),
        "camrt_explain_plugins_autoloaded_s": _wall(explain, threads, repeats, {"CAMRT_DISABLE_PLUGIN_AUTOLOAD": "0"}),
        "minimal_ort_s": _wall(plain, threads, repeats),
        "python_startup_s": _wall([sys.executable, "-c", "pass"], threads, repeats),
    }
    cold["ratio"] = round(statistics.median(cold["camrt_explain_s"]) / statistics.median(cold["minimal_ort_s"]), 3)
    return {"import_camrt_s": [round(t, 4) for t in imports],
            "import_camrt_median_s": round(statistics.median(imports), 4), "cold_one_image": cold}


# --- Score-CAM's top-channel variant: what it costs in faithfulness -----------------------


def deletion_score(session, x: np.ndarray, heatmap: np.ndarray, target: int, steps: int = 16) -> float:
    """Deletion (Petsiuk et al. 2018, RISE, sec. 4.1): remove pixels most-salient first (set to 0, the
    mean of the normalised input) in `steps` equal steps; the mean softmax probability of the target
    over the steps (lower: the map found what matters)."""
    order = np.argsort(-heatmap.ravel(), kind="stable")
    per_step = int(np.ceil(order.size / steps))
    batch = np.repeat(x[None], steps + 1, axis=0)
    for step in range(1, steps + 1):
        flat = batch[step].reshape(x.shape[0], -1)
        flat[:, order[:step * per_step]] = 0.0
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    curve = probabilities[:, target]
    return float(((curve[:-1] + curve[1:]) / 2).mean())


def faithfulness(forward_path: str, exact: np.ndarray, fast: np.ndarray, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(forward_path, options, providers=["CPUExecutionProvider"])
    x = inputs(1)[0]
    target = int(session.run(None, {session.get_inputs()[0].name: x[None]})[0].argmax())
    a, b = exact[0].ravel().astype(np.float64), fast[0].ravel().astype(np.float64)
    return {
        "pearson_vs_exact": round(float(np.corrcoef(a, b)[0, 1]), 4),
        "relative_l2_vs_exact": round(float(np.linalg.norm(b - a) / np.linalg.norm(a)), 4),
        "max_abs_vs_exact": round(float(np.abs(b - a).max()), 4),
        "deletion_exact": round(deletion_score(session, x, exact[0], target), 5),
        "deletion_fast": round(deletion_score(session, x, fast[0], target), 5),
    }


# --- the run ---------------------------------------------------------------------------------


def plan(config: dict, paths: dict[str, dict], threads: int, maps_dir: Path) -> list[dict]:
    specs = []
    for model in config["models"]:
        base = {"model": model, "layer": MODELS[model], "paths": paths[model], "threads": threads,
                "maps_dir": str(maps_dir), "warmup": 1, "repeats": config["repeats"], "min_repeats": 2,
                "budget_s": config["budget_s"]}
        specs.append({**base, "impl": "ort", "method": "inference", "batches": config["batches"]})
        for method in config["methods"]:
            heavy = method in HEAVY
            if heavy and model not in config["heavy_models"]:
                continue
            batches = [1] if heavy else config["batches"]
            timing = {"warmup": 0, "repeats": 1, "min_repeats": 1} if heavy else {}
            for impl in METHODS[method]:
                if (impl, method, model) in SKIP:
                    continue
                options = {"batch_size": PASS_BATCH} if heavy and impl == "camrt" else {}
                specs.append({**base, **timing, "impl": impl, "method": method, "batches": batches,
                              "options": options, "variant": ""})
            if method == "scorecam":
                for top in config["scorecam_top"]:
                    specs.append({**base, **timing, "impl": "camrt", "method": method, "batches": batches,
                                  "options": {"batch_size": PASS_BATCH, "top_channels": top},
                                  "variant": f"top_channels={top}"})
    for spec in specs:
        spec.setdefault("variant", "")
        spec["key"] = "-".join(filter(None, [spec["impl"], spec["model"], spec["method"],
                                             spec["variant"].replace("=", "")]))
    return specs


def compare(records: list[dict], maps_dir: Path) -> list[dict]:
    """Max abs difference of min-max maps: each implementation vs the method's oracle, per batch."""
    found = []
    for rec in records:
        if rec["impl"] == "ort":
            continue
        oracle = ORACLE.get(rec["method"], "pgc")
        if rec["impl"] == oracle:
            continue
        for row in rec["rows"]:
            own = maps_dir / f"{rec['key']}-b{row['batch']}.npy"
            ref = maps_dir / f"{oracle}-{rec['model']}-{rec['method']}-b{row['batch']}.npy"
            if not ref.exists():
                continue
            diff = np.abs(np.load(own) - np.load(ref))
            found.append({"impl": rec["impl"], "variant": rec["variant"], "model": rec["model"],
                          "method": rec["method"], "batch": row["batch"], "oracle": oracle,
                          "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                          "parity_expected": rec["method"] in PARITY_EXPECTED and not rec["variant"]
                          and rec["impl"].startswith("camrt")})
    return found


def summarise(records: list[dict]) -> dict:
    """Ratios: camrt vs each anchor (images/s), camrt time / inference-only time."""
    by = {(r["impl"], r["model"], r["method"], r["variant"], row["batch"]): row for r in records for row in r["rows"]}
    ratios = []
    for (impl, model, method, variant, batch), row in by.items():
        if not impl.startswith("camrt"):
            continue
        entry = {"impl": impl, "model": model, "method": method, "variant": variant, "batch": batch,
                 "camrt_ms": row["median_ms"]}
        floor = by.get(("ort", model, "inference", "", batch))
        if floor:
            entry["vs_inference"] = round(row["median_ms"] / floor["median_ms"], 3)
        for anchor in ("pgc", "torchcam", "captum"):
            other = by.get((anchor, model, method, "", batch))
            if other:
                entry[f"speedup_vs_{anchor}"] = round(row["images_per_s"] / other["images_per_s"], 2)
        ratios.append(entry)
    return {"ratios": ratios}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("camrt", "numpy", "onnx", "onnxruntime", "opencv-python-headless", "torch", "torchvision",
                 "grad-cam", "torchcam", "captum"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(),
            "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="smoke")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(BENCH / "results"), help="folder for the JSON and Markdown")
    parser.add_argument("--cache", default=str(BENCH / ".cache"), help="folder for the exported models")
    parser.add_argument("--machine", default=None, help="machine name in the file name (default: the hostname)")
    parser.add_argument("--render", metavar="JSON", help="write the Markdown of a results file (a .partial.json too)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.render:
        result = json.loads(Path(args.render).read_text())
        result.setdefault("agreement", [])
        result.update(summarise(result["records"]))
        Path(args.render).with_suffix(".md").write_text(markdown(result))
        return 0
    config = CONFIGS[args.config]
    started = time.perf_counter()
    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)
    cache = Path(args.cache)
    paths = {}
    for model in config["models"]:
        log(f"preparing {model}")
        paths[model] = prepare_model(model, cache)
    result = {"config": args.config, "threads": args.threads, "input_size": INPUT_SIZE,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(), "pass_batch": PASS_BATCH,
              "skipped": [list(s) for s in SKIP], "records": []}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date'][:10]}-{args.machine or socket.gethostname()}" + ("" if args.config == "full" else f"-{args.config}")
    partial = out / f"{stem}.partial.json"
    with tempfile.TemporaryDirectory(prefix="camrt-bench-") as scratch:
        maps_dir = Path(scratch)
        for spec in plan(config, paths, args.threads, maps_dir):
            log(f"{spec['key']} batches {spec['batches']}")
            measured = run_worker(spec, args.threads)
            result["records"].append({k: spec[k] for k in ("impl", "model", "method", "variant", "key", "options")
                                      if k in spec} | measured)
            partial.write_text(json.dumps(result, indent=1) + "\n")  # a long run that dies keeps its figures
        result["agreement"] = compare(result["records"], maps_dir)
        result.update(summarise(result["records"]))
        exact = [r for r in result["records"] if r["method"] == "scorecam" and r["impl"] == "camrt"]
        result["scorecam_variants"] = []
        for rec in exact:
            if not rec["variant"]:
                continue
            base = maps_dir / f"camrt-{rec['model']}-scorecam-b1.npy"
            fast = maps_dir / f"{rec['key']}-b1.npy"
            exact_rec = next(r for r in exact if r["model"] == rec["model"] and not r["variant"])
            result["scorecam_variants"].append({
                "model": rec["model"], "variant": rec["variant"],
                "speedup_vs_exact": round(exact_rec["rows"][0]["median_ms"] / rec["rows"][0]["median_ms"], 2),
                **faithfulness(paths[rec["model"]]["forward"], np.load(base), np.load(fast), args.threads)})
        log("start-up costs")
        result["startup"] = startup(paths[config["models"][0]], args.threads, config["startup_repeats"], Path(scratch))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    partial.unlink(missing_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    log(f"wrote {out / stem}.json and .md")
    return 0


def _fmt(value, digits=1):
    return "" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The tables docs/benchmarks.md quotes."""
    m, v = result["machine"], result["versions"]
    lines = [
        f"# camrt benchmark ({result['config']}), {result['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['hostname']}); load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_end', []))}. Threads: {result['threads']} per "
        f"process. Input {result['input_size']}x{result['input_size']}, float32, CPU.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        f"Extra passes (Score-CAM, Ablation-CAM) run {result['pass_batch']} inputs at a time in every "
        "implementation; they are timed once at batch 1, without warm-up.",
        "",
        "## Images/s (median after warm-up; min-max over the repeats) and peak RSS of the process",
        "",
        "| model | method | impl | batch | images/s | min-max | median ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in result["records"]:
        impl = rec["impl"] + (f" ({rec['variant']})" if rec.get("variant") else "")
        for row in rec["rows"]:
            lines.append(f"| {rec['model']} | {rec['method']} | {impl} | {row['batch']} | {row['images_per_s']:.2f} | "
                         f"{row['images_per_s_min']:.2f}-{row['images_per_s_max']:.2f} | {row['median_ms']:.1f} | "
                         f"{rec['peak_rss_mb']:.0f} |")
    lines += ["", "## camrt against the anchors and the inference floor", "",
              "| model | method | impl | batch | camrt ms | / inference-only | x pgc | x torchcam | x captum |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["ratios"]:
        name = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(f"| {r['model']} | {name} | {r['impl']} | {r['batch']} | {r['camrt_ms']:.1f} | {_fmt(r.get('vs_inference'), 2)} | "
                     f"{_fmt(r.get('speedup_vs_pgc'), 2)} | {_fmt(r.get('speedup_vs_torchcam'), 2)} | "
                     f"{_fmt(r.get('speedup_vs_captum'), 2)} |")
    lines += ["", "## Heatmap agreement (max abs difference of min-max maps vs the oracle)", "",
              "| model | method | impl | batch | oracle | max abs | mean abs | parity expected |", "|---|---|---|---|---|---|---|---|"]
    for a in result["agreement"]:
        impl = a["impl"] + (f" ({a['variant']})" if a["variant"] else "")
        lines.append(f"| {a['model']} | {a['method']} | {impl} | {a['batch']} | {a['oracle']} | {a['max_abs_diff']:.2e} | "
                     f"{a['mean_abs_diff']:.2e} | {'yes' if a['parity_expected'] else 'no'} |")
    if result.get("scorecam_variants"):
        lines += ["", "## Score-CAM top-channel variant: speed and faithfulness cost (batch 1)", "",
                  "| model | variant | x exact | Pearson vs exact | rel. L2 vs exact | deletion exact | deletion variant |",
                  "|---|---|---|---|---|---|---|"]
        for s in result["scorecam_variants"]:
            lines.append(f"| {s['model']} | {s['variant']} | {s['speedup_vs_exact']:.2f} | {s['pearson_vs_exact']:.4f} | "
                         f"{s['relative_l2_vs_exact']:.4f} | {s['deletion_exact']:.4f} | {s['deletion_fast']:.4f} |")
        lines.append("")
        lines.append("Deletion: mean target probability while the most salient pixels are removed in 16 steps "
                     "(lower is better).")
    if "startup" not in result:
        return "\n".join(lines + ["", "(partial run: no start-up figures)", ""])
    st = result["startup"]
    cold = st["cold_one_image"]
    med = statistics.median
    lines += ["", "## Start-up", "",
              f"- `import camrt`: {st['import_camrt_median_s'] * 1e3:.0f} ms (median of {len(st['import_camrt_s'])}).",
              f"- cold one-image `camrt explain` ({result['config']} model {result['records'][0]['model']}): "
              f"{med(cold['camrt_explain_s']):.2f} s (entry-point plugins autoloaded: "
              f"{med(cold['camrt_explain_plugins_autoloaded_s']):.2f} s); minimal onnxruntime script: "
              f"{med(cold['minimal_ort_s']):.2f} s; ratio {cold['ratio']:.2f}; bare `python -c pass`: "
              f"{med(cold['python_startup_s']):.2f} s.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
