"""onnxruntime's graph optimisation level: speed against closeness to float64, side by side.

For each model and level ("all", onnxruntime's default with its NCHWc CPU kernels, and "extended"
without them), camrt's XGrad-CAM on three photographs (scikit-image's chelsea, coffee, astronaut at
224x224, (x - 127) / 128): the median wall time of `Explainer.explain` (batch 3) and the largest
max |difference| of min-max heatmaps against pytorch-grad-cam 1.5.7 in float32 and against
pytorch-grad-cam on a float64 copy of the model (the truth), next to pytorch-grad-cam float32's own
distance to it. XGrad-CAM divides by channel sums, which cancel on signed layers (EfficientNet-Lite0's
`_bn1`): the case where rounding shows. Usage:
    python bench/graph_optimization.py [--threads 2] [--repeats 10] [--models M,...] [--out bench/results/NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "exporters")]

from bench.run import MODELS, machine, minmax, prepare_model, versions  # noqa: E402

LEVELS = ("all", "extended")
METHOD = "xgradcam"
TARGETS = [285, 967, 450]


def reference_maps(model, layer: str, x: np.ndarray) -> np.ndarray:
    import torch
    from pytorch_grad_cam import XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt_exporters.torch_frontend import parse_layer

    module = dict(model.named_modules())[parse_layer(model, layer).module]
    with XGradCAM(model=model, target_layers=[module]) as cam:
        return cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in TARGETS])


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(minmax(a) - minmax(b)).max())


def main() -> int:
    import torch

    from camrt import Explainer
    from tests.exporters.models import load, photos

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default="efficientnet_lite0,resnet50,mobilenet_v3_large")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--cache", default=str(ROOT / "bench" / ".cache"), help="exported models (bench/run.py's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = photos()
    rows = []
    for name in args.models.split(","):
        layer = MODELS[name]
        path = prepare_model(name, Path(args.cache))["camrt"]
        model = load(name)  # the weights the cached file was exported from (fixed seed / real weights)
        reference = reference_maps(model, layer, x)
        truth = reference_maps(copy.deepcopy(model).double(), layer, x.astype(np.float64))
        reference_error = max(max_diff(r, t) for r, t in zip(reference, truth))
        for level in LEVELS:
            explainer = Explainer(path, method=METHOD, threads=args.threads, graph_optimization=level)
            explainer.explain(x, targets=TARGETS)  # warm-up: session creation
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                results = explainer.explain(x, targets=TARGETS)
                times.append((time.perf_counter() - start) * 1e3)
            ours = [r.heatmap for r in results]
            rows.append({"model": name, "layer": layer, "level": level, "median_ms": statistics.median(times),
                         "vs_pytorch_grad_cam": max(max_diff(o, r) for o, r in zip(ours, reference)),
                         "vs_float64": max(max_diff(o, t) for o, t in zip(ours, truth)),
                         "pytorch_grad_cam_vs_float64": reference_error})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"XGrad-CAM, batch 3 (photographs), {args.threads} threads, median of {args.repeats}; "
             "max |diff| of min-max heatmaps", "",
             "| model | layer | graph_optimization | median ms | vs pytorch-grad-cam | vs float64 | pytorch-grad-cam vs float64 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['layer']} | {r['level']} | {r['median_ms']:.0f} | {r['vs_pytorch_grad_cam']:.2e} "
              f"| {r['vs_float64']:.2e} | {r['pytorch_grad_cam_vs_float64']:.2e} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        result = {"rows": rows, "versions": versions(), "machine": machine(), "threads": args.threads}
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
