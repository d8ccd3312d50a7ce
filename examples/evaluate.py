"""Evaluate every built-in method on EfficientNet-Lite0 (real ImageNet weights) over real photographs.

Build side (torch, once): `camrt export` writes the contract file with the vanilla, guided and
deconvnet input-gradient rule sets (and the LRP composites' when plugins/camrt-lrp is installed). Evaluation side (onnxruntime only): `camrt eval` runs every
method the file serves and scores its heatmaps with the faithfulness metrics and the randomization
sanity check; the summary becomes a Markdown table (OUT/results.md).

Photographs: scikit-image's chelsea, coffee, astronaut, rocket and matplotlib's grace_hopper.jpg
(all shipped with the packages: no download).

    python examples/evaluate.py --out eval-out            # the README's settings
    python examples/evaluate.py --out eval-out --quick    # three photographs, fewer steps
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: The settings of the README's table (chosen to finish in ~10 minutes on a busy 2-core machine).
METRIC_OPTIONS = ("deletion.steps=10", "insertion.steps=10", "road.percentiles=30,70", "randomization.stages=1")
#: Fewer samples for the methods that run one backward pass per sample.
METHOD_OPTIONS = ("smoothgrad.n_samples=8", "integrated-gradients.steps=8")
METRICS = "deletion,insertion,confidence,road,randomization"


def photographs(folder: Path, quick: bool) -> list[Path]:
    import cv2
    import matplotlib.cbook
    import numpy as np
    import skimage.data

    images = {name: getattr(skimage.data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")}
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        images["grace_hopper"] = cv2.cvtColor(cv2.imdecode(
            np.frombuffer(handle.read(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if quick:
        images = {k: images[k] for k in ("chelsea", "coffee", "grace_hopper")}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb in images.items():
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def rule_sets() -> list[str]:
    """vanilla, guided, deconvnet, and the LRP composites when plugins/camrt-lrp is installed."""
    from camrt_exporters.export import rule_sets as registered

    return ["vanilla", "guided", "deconvnet", *(name for name in registered() if name.startswith("lrp-"))]


def served_methods(camrt: list[str], model: Path) -> list[str]:
    """The registered methods that `model` serves, as `camrt inspect` reports them."""
    summary = json.loads(subprocess.run([*camrt, "inspect", str(model), "--json"], check=True, capture_output=True,
                                        text=True).stdout)
    return [plan["method"] for plan in summary["method_plans"] if plan["serves"]]


def markdown(summary: dict, fields: list[str], arrows: dict[str, str]) -> str:
    header = "| method | " + " | ".join(f"{f} {arrows[f]}" for f in fields) + " |"
    lines = [header, "|---|" + "---|" * len(fields)]
    for method, row in summary.items():
        cells = ["-" if row.get(f) is None else f"{row[f]:.3f}" for f in fields]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval-out", help="output folder")
    parser.add_argument("--model", default=None, help="an EfficientNet-Lite0 camrt file exported as below (skips the export)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every one the file serves)")
    parser.add_argument("--quick", action="store_true", help="three photographs, 8 steps, no ROAD")
    args = parser.parse_args()
    out = Path(args.out)
    camrt = [sys.executable, "-m", "camrt"]
    model = Path(args.model) if args.model else out / "efficientnet_lite0.camrt.onnx"
    if not model.exists():
        command = [*camrt, "export", "camrt_exporters.zoo:efficientnet_lite0", "--scale", "1", "--mean", "127",
                   "--std", "128", "--labels", "imagenet", "--rules", ",".join(rule_sets()), "-o", str(model)]
        print("$", " ".join(command), file=sys.stderr)
        if subprocess.run(command).returncode:
            return 1
    from camrt.plugins.registry import build_method_registry, build_metric_registry

    methods = args.methods or ",".join(served_methods(camrt, model))
    chosen = {build_method_registry().get(m).name for m in methods.split(",")}
    method_options = [o for o in METHOD_OPTIONS if o.split(".")[0] in chosen]
    metrics, options = METRICS, list(METRIC_OPTIONS)
    if args.quick:
        metrics = "deletion,insertion,confidence,randomization"
        options = ["deletion.steps=8", "insertion.steps=8", "randomization.stages=1"]
    inputs = photographs(out / "photos", args.quick)
    command = [*camrt, "eval", str(model), *map(str, inputs), "-m", methods, "--metric", metrics,
               *[item for option in options for item in ("-P", option)],
               *[item for option in method_options for item in ("-O", option)], "-o", str(out / "eval"), "--plot",
               "--threads", "2"]
    print("$", " ".join(command), file=sys.stderr)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if done.returncode:
        return done.returncode
    summary = json.loads((out / "eval" / "eval-summary.json").read_text())
    registry = build_metric_registry()
    arrows = {}
    for name in metrics.split(","):
        for field, better in registry.get(name).fields.items():
            arrows[field] = "↑" if better == "higher" else "↓"
    table = markdown(summary, list(arrows), arrows)
    text = (f"{table}\n\nEfficientNet-Lite0 (real ImageNet weights), {len(inputs)} photographs "
            f"({', '.join(p.stem for p in inputs)}), scores: softmax probability of the top-1 class; "
            f"metric options: {' '.join(options)}; method options: {' '.join(method_options) or '-'}; "
            f"{elapsed / 60:.1f} min.\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
