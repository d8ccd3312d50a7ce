"""Grad-CAM on one GPU: camrt (onnxruntime-gpu, heatmaps made on the device) vs pytorch-grad-cam and
a hand-written torch forward + autograd.grad, ResNet-50, batch 32 and 64. One self-contained script.

On the lent GPU machine (../shared/gpu/README.md: onnxruntime-gpu unpacked into $HOME/ortgpu;
pytorch-grad-cam 1.5.7 and ttach carried as wheels in .whl/, see NOTES-bench.md):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$HOME/ortgpu:$PWD:$PWD/exporters
    python3 -c "import onnxruntime as o; o.preload_dlls()" && python3 bench/gpu.py --out $OUT

Here (no GPU), to check that everything but CUDA itself runs: python bench/gpu.py --device cpu --smoke

What it does (about 3 minutes on an H100): builds ResNet-50 with fixed random weights (seed 0,
BatchNorm statistics calibrated as in tests/exporters/models.py), exports it with camrt's exporter
on the spot (layer4, vanilla rules: a ResNet-50 file is too big to carry), then times, median of
the repeats after warm-up, CUDA synchronised:
- torch inference (no_grad), the torch floor;
- pytorch-grad-cam GradCAM(target_layers=[layer4]), input on the GPU, heatmaps on the host;
- hand-written torch: forward, autograd.grad of the summed target logits to layer4, weights, ReLU,
  min-max, bilinear upsampling (align_corners=False), min-max on the GPU, heatmaps to the host;
- onnxruntime CUDA inference-only (the forward graph pruned from the camrt file), IOBinding with
  input and output on the GPU: the onnxruntime floor;
- camrt Grad-CAM end to end, `Explainer(..., device="cuda", device_postprocess=True).explain(x)`
  from a host batch to host heatmaps: the heatmaps are made inside the session (camrt.execution.heatmap_graph), only
  they come back;
- the same session with IOBinding (input already on the GPU, heatmaps copied to the host);
- camrt's default host path (activations and gradients to the host, numpy + OpenCV), for contrast.
TF32 is off everywhere (torch matmul and cuDNN; onnxruntime CUDA provider use_tf32=0) unless --tf32 (speed with
the frameworks' defaults; top-1 targets of a random-weight model can then differ). Parity: max
abs difference of the min-max heatmaps of every implementation vs pytorch-grad-cam's.
Writes gpu-<date>.json and gpu-<date>.md into --out (default $OUT, else bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from camrt.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parent.parent
LAYER = "layer4"


class TF32Off:
    """camrt plugin: the CUDA provider with TF32 off (parity with torch's float32)."""

    @hookimpl
    def choose_execution_providers(self, device, available):
        if device == "cuda":
            return [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
        return None


def timed(fn, sync, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
            "max_ms": round(max(times), 3), "repeats": repeats}


def minmax(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(-2, -1), keepdims=True)
    return (maps - low) / (maps.max(axis=(-2, -1), keepdims=True) - low + 1e-7)


def build_model(name: str):
    """torchvision `name`, fixed random weights (tests/exporters/models.py's recipe)."""
    sys.path.insert(0, str(ROOT))
    from tests.exporters.models import load

    return load(name)


def export(model, folder: Path) -> tuple[str, str, dict]:
    import onnx

    from camrt import contract
    from camrt.execution.subgraphs import subgraph
    from camrt_exporters.export import export_torch, write_model

    start = time.perf_counter()
    onnx_model, checks = export_torch(model.cpu(), layers=[LAYER], rules=[contract.RULE_VANILLA])
    exported_ir = onnx_model.ir_version
    # onnxruntime 1.31 reads IR <= 13 (onnx 1.23's make_model default is newer); the graph is float32
    # with standard ops, which IR 10 covers
    onnx_model.ir_version = min(exported_ir, 10)
    camrt_path = folder / "model.camrt.onnx"
    write_model(onnx_model, camrt_path)
    outputs = [o.name for o in onnx_model.graph.output if not o.name.startswith("camrt/")]
    forward_path = folder / "model.forward.onnx"
    write_model(subgraph(onnx_model, outputs[:1]), forward_path)
    info = {"export_s": round(time.perf_counter() - start, 1), "ir_version_exported": exported_ir,
            "ir_version": onnx_model.ir_version,
            "opset": [(o.domain, o.version) for o in onnx_model.opset_import],
            "validation_checks": len(checks), "file_mb": round(camrt_path.stat().st_size / 2**20, 1)}
    onnx.checker.check_model(str(camrt_path))
    return str(camrt_path), str(forward_path), info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="resnet18, batch 2, 2 repeats (a CPU check of the script)")
    parser.add_argument("--batches", default="32,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tf32", action="store_true",
                        help="leave TF32 on, as torch's cuDNN and onnxruntime do by default (speed; parity then ~1e-3)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    from camrt import Explainer, contract
    from camrt.plugins import get_plugin_manager

    if args.device == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"onnxruntime {ort.__version__} has no CUDA provider: {ort.get_available_providers()}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    if not args.tf32:
        get_plugin_manager().register(TF32Off(), name="bench-gpu-tf32-off")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    name = "resnet18" if args.smoke else "resnet50"
    batches = [2] if args.smoke else [int(b) for b in args.batches.split(",")]
    repeats = 2 if args.smoke else args.repeats

    log(f"building and exporting {name}")
    model = build_model(name)
    scratch = Path(tempfile.mkdtemp(prefix="camrt-gpu-"))
    camrt_path, forward_path, export_info = export(model, scratch)
    log(f"exported: {export_info}")
    model = model.to(device).eval()
    layer = model.layer4

    from pytorch_grad_cam import GradCAM

    pgc = GradCAM(model=model, target_layers=[layer])
    fused = Explainer(camrt_path, method="gradcam", device=args.device, device_postprocess=True)
    host = Explainer(camrt_path, method="gradcam", device=args.device)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ([("CUDAExecutionProvider", {"use_tf32": int(args.tf32)}), "CPUExecutionProvider"] if args.device == "cuda"
                 else ["CPUExecutionProvider"])
    plain = ort.InferenceSession(forward_path, options, providers=providers)
    ort_device = "cuda" if args.device == "cuda" else "cpu"

    def handwritten(xt):
        store = {}
        handle = layer.register_forward_hook(lambda m, a, o: store.__setitem__("a", o))
        try:
            logits = model(xt)
        finally:
            handle.remove()
        acts = store["a"]
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (grads,) = torch.autograd.grad(score, acts)
        with torch.no_grad():
            cam = torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
            low, high = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
            cam = F.interpolate((cam - low) / (high - low + 1e-7), size=xt.shape[2:], mode="bilinear",
                                align_corners=False)
            low, high = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
            return ((cam - low) / (high - low + 1e-7))[:, 0].cpu().numpy()

    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "model": name, "layer": LAYER, "smoke": args.smoke, "tf32": args.tf32, "cudnn_benchmark": True,
              "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()},
              "providers": fused.session.providers, "export": export_info, "batches": {}}
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        xt = torch.from_numpy(x).to(device)
        maps = {}
        rows = {}

        def torch_inference():
            with torch.no_grad():
                model(xt)

        rows["torch inference"] = timed(torch_inference, sync, repeats)
        rows["pytorch-grad-cam GradCAM"] = timed(lambda: maps.__setitem__("pgc", pgc(input_tensor=xt, targets=None)),
                                                 sync, repeats)
        rows["torch forward+autograd.grad+CAM"] = timed(lambda: maps.__setitem__("handwritten", handwritten(xt)),
                                                        sync, repeats)

        x_device = ort.OrtValue.ortvalue_from_numpy(x, ort_device, 0)
        binding = plain.io_binding()
        binding.bind_ortvalue_input(plain.get_inputs()[0].name, x_device)
        binding.bind_output(plain.get_outputs()[0].name, ort_device)
        rows["onnxruntime inference (IOBinding, on device)"] = timed(
            lambda: plain.run_with_iobinding(binding), lambda: None, repeats)

        rows["camrt Grad-CAM, heatmaps made on device (explain: host in, host out)"] = timed(
            lambda: maps.__setitem__("camrt fused", np.stack([e.heatmap for e in fused.explain(x)])),
            lambda: None, repeats)

        from camrt.execution import heatmap_graph as fused_graph

        session = fused._fused  # the session Explainer(device_postprocess=True) runs
        fused_binding = session.io_binding()
        fused_binding.bind_ortvalue_input(fused.info.input_name, x_device)
        fused_binding.bind_cpu_input(contract.TARGET_INPUT, np.full(batch, contract.TOP1_TARGET, dtype=np.int64))
        fused_binding.bind_cpu_input(fused_graph.SIZE_INPUT, np.array([224, 224], dtype=np.int64))
        fused_binding.bind_output(fused_graph.HEATMAP_OUTPUT, "cpu")

        def bound():
            session.run_with_iobinding(fused_binding)
            maps["camrt fused, IOBinding"] = fused_binding.copy_outputs_to_cpu()[0]

        rows["camrt Grad-CAM session, IOBinding (input on device, heatmaps to host)"] = timed(bound, lambda: None, repeats)
        rows["camrt Grad-CAM, host postprocessing (activations+gradients to host)"] = timed(
            lambda: maps.__setitem__("camrt host", np.stack([e.heatmap for e in host.explain(x)])),
            lambda: None, repeats)
        for row in rows.values():
            row["images_per_s"] = round(batch / row["median_ms"] * 1e3, 1)
        reference = minmax(maps["pgc"])
        parity = {key: float(np.abs(minmax(value) - reference).max()) for key, value in maps.items() if key != "pgc"}
        result["batches"][str(batch)] = {"timings": rows, "max_abs_diff_vs_pgc": parity}
        log(f"batch {batch}: " + ", ".join(f"{k}: {v['median_ms']:.2f} ms" for k, v in rows.items()))
        log(f"batch {batch} parity vs pytorch-grad-cam: {parity}")
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{result['date'][:10]}" + ("-tf32" if args.tf32 else "") + ("-smoke" if args.smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    log(f"wrote {out / stem}.json and .md")
    return 0


def markdown(result: dict) -> str:
    lines = [f"# camrt Grad-CAM on {result['device']} ({result['model']}, {result['layer']}), {result['date']}", "",
             f"fp32, TF32 {'on (defaults)' if result['tf32'] else 'off'}; torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}; "
             f"providers {result['providers']}; exported on the machine in {result['export']['export_s']} s "
             f"(IR {result['export']['ir_version']}).", ""]
    for batch, data in result["batches"].items():
        lines += [f"## Batch {batch}", "", "| implementation | median ms | min-max ms | images/s |", "|---|---|---|---|"]
        for key, row in data["timings"].items():
            lines.append(f"| {key} | {row['median_ms']:.2f} | {row['min_ms']:.2f}-{row['max_ms']:.2f} | {row['images_per_s']:.0f} |")
        pgc = data["timings"]["pytorch-grad-cam GradCAM"]["median_ms"]
        end_to_end = data["timings"]["camrt Grad-CAM, heatmaps made on device (explain: host in, host out)"]["median_ms"]
        lines += ["", f"camrt end to end vs pytorch-grad-cam: {pgc / end_to_end:.2f}x images/s.", "",
                  "Max abs difference of min-max heatmaps vs pytorch-grad-cam: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in data["max_abs_diff_vs_pgc"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
