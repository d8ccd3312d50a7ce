"""Is `camrt eval`'s memory flat in the number of inputs?

Writes N small PNG images (distinct random pixels), runs `camrt eval MODEL FOLDER` in a fresh child
process for each N and reports the child's peak resident set size (getrusage ru_maxrss) and, in a
second child with tracemalloc on, the peak of memory allocated through Python (numpy arrays
included). Streaming means the peaks at 200 and 2,000 images are the same, give or take noise;
the code before streaming (decode every input, then score) grows with N. Each run must print one
record per image (one method), or the script stops.

    python bench/eval_memory.py                                  # 200 and 2,000 images, the tiny test model
    python bench/eval_memory.py --counts 200,2000 --code /path/to/another/checkout   # compare a version
    python bench/eval_memory.py --out bench/results/NAME         # NAME.json and NAME.md

--code: the camrt checkout the child imports (default: this one), to measure an earlier version
on the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from bench.long_run import tiny_model, write_inputs  # noqa: E402

#: Run in the child: `camrt eval` in-process, then its peaks as one JSON line on stderr.
CHILD = """
import json, resource, sys, time, tracemalloc
if sys.argv[1] == "tracemalloc":
    tracemalloc.start()
import camrt
print("CAMRT " + camrt.__file__, file=sys.stderr)
from camrt.cli import main
start, code = time.perf_counter(), 0
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else None
print("PEAKS " + json.dumps({"exit": code, "wall_s": time.perf_counter() - start,
                             "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             "tracemalloc_peak_mb": None if peak is None else peak / 2**20}), file=sys.stderr)
"""


def measure(code: Path, model: str, folder: str, args: list[str], tracemalloc: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(code / "exporters")]))
    # `python -c` puts the working directory first on sys.path: run where no camrt is
    workdir = os.path.dirname(folder)
    command = [sys.executable, "-c", CHILD, "tracemalloc" if tracemalloc else "plain",
               "eval", model, folder, "--device", "cpu", "--threads", "1", *args]
    child = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir)
    lines = [line for line in child.stderr.splitlines() if line.startswith("PEAKS ")]
    if not lines:
        raise RuntimeError(f"camrt eval failed: {child.stderr.strip()[-2000:]}")
    peaks = json.loads(lines[-1][len("PEAKS "):])
    if peaks["exit"] not in (0, None):
        raise RuntimeError(f"camrt eval exited with {peaks['exit']}: {child.stderr.strip()[-2000:]}")
    peaks["camrt"] = next(line for line in child.stderr.splitlines() if line.startswith("CAMRT "))[len("CAMRT "):]
    peaks["records"] = sum(1 for line in child.stdout.splitlines() if line.startswith("{"))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="camrt file (default: the test suite's golden tiny model)")
    parser.add_argument("--counts", default="200,2000", help="comma-separated numbers of images")
    parser.add_argument("--size", default="64x64", help="HEIGHTxWIDTH of the generated images")
    parser.add_argument("--code", default=str(REPO), help="the camrt checkout to measure (default: this one)")
    parser.add_argument("--eval-args", default="-m gradcam --metric deletion,confidence -P deletion.steps=4",
                        help="camrt eval's options (one method)")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        for count in (int(c) for c in args.counts.split(",")):
            folder = Path(tmp) / f"in{count}"
            folder.mkdir()
            write_inputs(folder, count, 0, height, width)
            plain = measure(Path(args.code), model, str(folder), args.eval_args.split(), tracemalloc=False)
            traced = measure(Path(args.code), model, str(folder), args.eval_args.split(), tracemalloc=True)
            if plain["records"] != count or traced["records"] != count:
                raise RuntimeError(f"{count} images gave {plain['records']} and {traced['records']} records")
            if not plain["camrt"].startswith(str(Path(args.code).resolve())):
                raise RuntimeError(f"the child imported {plain['camrt']}, not the code in {args.code}")
            rows.append({"images": count, "maxrss_mb": round(plain["maxrss_mb"], 1),
                         "tracemalloc_peak_mb": round(traced["tracemalloc_peak_mb"], 2),
                         "wall_s": round(plain["wall_s"], 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"code": str(Path(args.code).resolve()), "model": args.model or "tests/fixtures/golden tiny model (12x16 input)",
              "image_size": [height, width], "eval_args": args.eval_args, "rows": rows,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
        table = ["| images | peak RSS (MB) | tracemalloc peak (MB) | wall (s) |", "|---|---|---|---|"]
        table += [f"| {r['images']} | {r['maxrss_mb']} | {r['tracemalloc_peak_mb']} | {r['wall_s']} |" for r in rows]
        Path(f"{args.out}.md").write_text(f"`camrt eval {args.eval_args}` on {height}x{width} PNG images, "
                                          f"code: {result['code']}\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
