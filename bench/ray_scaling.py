"""camrt on Ray Data against the local CLI, side by side in one run: images/s and overhead.

The same folder of photographs (scikit-image's chelsea, coffee, astronaut, rocket, ... resized to
224x224, repeated to --images) is explained by Grad-CAM with (a) the local `camrt explain` (one
process, --threads per actor x actors), (b) `camrt ray-explain --actors 1` and (c) `--actors N`,
each actor with --threads onnxruntime threads, on a local Ray cluster of this machine's cores. Wall
time includes reading the images and writing overlay + heatmap files; Ray's start-up (ray.init) is
reported apart. Usage:
    python bench/ray_scaling.py [--model resnet18] [--images 96] [--actors 2] [--threads 1] [--out bench/results/NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "exporters")]

from bench.run import MODELS, machine, prepare_model, versions  # noqa: E402


def photo_folder(folder: Path, count: int) -> None:
    import cv2
    from skimage import data

    names = ("chelsea", "coffee", "astronaut", "rocket", "cat", "immunohistochemistry")
    photos = [cv2.resize(getattr(data, name)(), (224, 224)) for name in names]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"photo_{i:05d}.jpg"), cv2.cvtColor(photos[i % len(photos)], cv2.COLOR_RGB2BGR))


def local_cli(model: str, photos: Path, outdir: Path, threads: int) -> float:
    from click.testing import CliRunner

    from camrt.cli import build_cli

    start = time.perf_counter()
    result = CliRunner().invoke(build_cli(), ["explain", model, str(photos), "-o", str(outdir), "--quiet",
                                              "--threads", str(threads), "--batch-size", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return time.perf_counter() - start


def on_ray(model: str, photos: Path, outdir: Path, actors: int, threads: int) -> float:
    from camrt.ray import explain_with_ray

    start = time.perf_counter()
    counts = explain_with_ray(model, [str(photos)], str(outdir), actors=actors, batch_size=8, threads=threads,
                              device="cpu")
    assert counts["failed"] == 0, counts
    return time.perf_counter() - start


class MeasuredBatches:
    """ExplainBatches that also reports its actor's peak resident memory (MB) per batch."""

    def __init__(self, **kwargs):
        from camrt.ray import ExplainBatches

        self.explain = ExplainBatches(**kwargs)

    def __call__(self, batch):
        import resource

        import numpy as np

        out = self.explain(batch)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"status": out["status"], "peak_mb": np.full(len(out["status"]), peak_mb)}


def actor_peak_memory(model: str, photos: Path, outdir: Path, threads: int) -> float:
    """The largest peak RSS of one actor explaining the folder (MB)."""
    import ray

    from camrt.ray import input_rows

    rows = input_rows([str(photos)])
    dataset = ray.data.from_items(rows).map_batches(
        MeasuredBatches, batch_size=8, batch_format="numpy", concurrency=1,
        fn_constructor_kwargs={"model": model, "outdir": str(outdir), "threads": threads, "device": "cpu"})
    return float(max(row["peak_mb"] for row in dataset.take_all()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write NAME.md and NAME.json")
    args = parser.parse_args(argv)
    import ray

    model = prepare_model(args.model, ROOT / "bench" / ".cache")["camrt"]
    work = Path(tempfile.mkdtemp(prefix="camrt-ray-bench-"))
    try:
        photo_folder(work / "photos", args.images)
        rows = {}
        seconds = local_cli(model, work / "photos", work / "local1", args.threads)
        rows["local CLI, 1 process"] = seconds
        seconds = local_cli(model, work / "photos", work / "localN", args.threads * args.actors)
        rows[f"local CLI, {args.threads * args.actors} threads"] = seconds
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "exporters"), os.environ.get("PYTHONPATH", "")])
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - start
        on_ray(model, work / "photos", work / "warmup", 1, args.threads)  # actor start-up, imports: not counted
        rows["ray, 1 actor"] = on_ray(model, work / "photos", work / "ray1", 1, args.threads)
        rows[f"ray, {args.actors} actors"] = on_ray(model, work / "photos", work / "rayN", args.actors, args.threads)
        peak_mb = actor_peak_memory(model, work / "photos", work / "memory", args.threads)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows["local CLI, 1 process"]
    lines = [f"# Ray scaling: {args.model} Grad-CAM, {args.images} images 224x224, {args.threads} thread(s) per "
             "actor", "", f"Ray start-up (ray.init, not counted below): {startup:.1f} s; one actor's peak resident memory: "
             f"{peak_mb:.0f} MB", "",
             "| run | wall s | images/s | vs local CLI, 1 process |", "|---|---|---|---|"]
    for name, seconds in rows.items():
        lines.append(f"| {name} | {seconds:.2f} | {args.images / seconds:.1f} | {base / seconds:.2f}x |")
    report = {"model": args.model, "images": args.images, "threads": args.threads, "actors": args.actors,
              "ray_startup_s": startup, "actor_peak_mb": peak_mb, "wall_s": rows, "machine": machine(), "versions": versions()}
    text = "\n".join(lines) + f"\n\nmachine: {report['machine']}\n"
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
