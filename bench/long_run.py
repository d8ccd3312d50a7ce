"""A long `camrt explain` run: is resident memory flat after warm-up, and is every input accounted for?

Writes N small PNG images (every `--bad-every`-th one damaged on purpose), runs
`python -m camrt explain MODEL FOLDER -o OUT` in a child process, samples the child's resident set
size (/proc/PID/status VmRSS, Linux) while it runs against the number of JSON lines it has printed,
and checks that each input appears in exactly one JSON line (ok, or an error naming it).

    python bench/long_run.py                      # 10,000 images, the tiny test model
    python bench/long_run.py --images 300 --model some.camrt.onnx

Prints one JSON object: the RSS after warm-up, at the end and at its highest after warm-up, the
growth after warm-up and its least-squares slope per 1,000 images. Exit status 1 when the
accounting fails or the growth after warm-up exceeds --max-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LongRun:
    images: int
    bad: int
    records: int
    ok: int
    errors: int
    accounted: bool  # every input in exactly one record, the damaged ones as errors naming them
    wall_s: float
    warmup_images: int
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_max_after_warmup_mb: float
    growth_after_warmup_mb: float
    slope_mb_per_1000_images: float
    samples: list[tuple[int, float]] = field(default_factory=list)  # (records so far, RSS MB)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def write_inputs(folder: Path, count: int, bad_every: int, height: int, width: int, seed: int = 0) -> tuple[list[str], set[str]]:
    """`count` PNG files (distinct random images); every `bad_every`-th one cut in half."""
    import cv2

    rng = np.random.default_rng(seed)
    paths, bad = [], set()
    for i in range(count):
        path = folder / f"img{i:06d}.png"
        ok, data = cv2.imencode(".png", rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        data = data.tobytes()
        if bad_every and i % bad_every == bad_every - 1:
            data = data[: len(data) // 2]
            bad.add(str(path))
        path.write_bytes(data)
        paths.append(str(path))
    return paths, bad


def tiny_model(folder: Path) -> str:
    """A copy of the test suite's golden tiny camrt file."""
    sys.path.insert(0, str(REPO))
    from tests.helpers import copy_golden, golden_variant

    return copy_golden(golden_variant(), folder / "tiny.camrt.onnx").path


def run(model: str, images: int = 10_000, batch_size: int = 8, bad_every: int = 50, warmup_fraction: float = 0.2,
        interval_s: float = 0.1, formats: str = "png,npy", size: tuple[int, int] = (24, 32), workdir: str | None = None) -> LongRun:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder, out = Path(tmp) / "in", Path(tmp) / "out"
        folder.mkdir()
        paths, bad = write_inputs(folder, images, bad_every, *size)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "exporters"),
                                                            os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "camrt", "explain", model, str(folder), "-o", str(out), "--device", "cpu",
                   "--threads", "1", "--batch-size", str(batch_size), "--format", formats]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
        reader.start()
        samples: list[tuple[int, float]] = []
        while child.poll() is None:
            value = rss_mb(child.pid)
            if value is not None:
                samples.append((len(lines), value))
            time.sleep(interval_s)
        reader.join()
        stderr = child.stderr.read()
        wall = time.perf_counter() - started
    records = [json.loads(line) for line in lines if line.strip()]
    seen = [r["input"] for r in records]
    errors = {r["input"]: r["error"] for r in records if r["status"] != "ok"}
    accounted = (sorted(seen) == sorted(paths) and set(errors) == bad
                 and all(path in message for path, message in errors.items()))
    if child.returncode not in (0, 1) or not samples:
        raise RuntimeError(f"camrt explain exited with {child.returncode}: {stderr.strip()[-2000:]}")
    warmup = int(images * warmup_fraction)
    after = [(n, mb) for n, mb in samples if n >= warmup] or samples[-1:]
    start_mb = after[0][1]
    counts = np.array([n for n, _ in after], dtype=float)
    values = np.array([mb for _, mb in after])
    slope = float(np.polyfit(counts, values, 1)[0] * 1000) if len(after) > 2 and np.ptp(counts) > 0 else 0.0
    return LongRun(
        images=images, bad=len(bad), records=len(records), ok=len(records) - len(errors), errors=len(errors),
        accounted=accounted, wall_s=round(wall, 1), warmup_images=warmup,
        rss_after_warmup_mb=round(start_mb, 1), rss_end_mb=round(samples[-1][1], 1),
        rss_max_after_warmup_mb=round(float(values.max()), 1),
        growth_after_warmup_mb=round(float(values.max()) - start_mb, 1), slope_mb_per_1000_images=round(slope, 3),
        samples=samples,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="camrt file (default: the test suite's tiny model, built now)")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bad-every", type=int, default=50, help="damage every N-th image (0: none)")
    parser.add_argument("--format", default="png,npy")
    parser.add_argument("--max-growth-mb", type=float, default=16.0)
    parser.add_argument("--samples", action="store_true", help="include every (records, RSS) sample")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        result = run(model, images=args.images, batch_size=args.batch_size, bad_every=args.bad_every,
                     formats=args.format)
    summary = asdict(result)
    if not args.samples:
        summary.pop("samples")
    print(json.dumps(summary, indent=2))
    if not result.accounted or result.growth_after_warmup_mb > args.max_growth_mb:
        sys.exit(1)


if __name__ == "__main__":
    main()
