"""Start-up cost of the runtime: `import camrt` plus building the CLI, against the 0.3 s goal.

Each sample is a fresh interpreter (imports are cached within one), timed from inside, so the
interpreter's own start is not counted; `camrt --help` (plugin commands listed, as a user sees it)
is timed whole, with bare `python -c pass` beside it for the interpreter's share. Exit status 1
when the median of the first row misses the goal. Usage:
    python bench/import_time.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

GOAL_S = 0.3
PROBE = (
    "import time; start = time.perf_counter()\n"
    "import camrt, camrt.cli\n"
    "cli = camrt.cli.build_cli(); cli.list_commands(None)\n"
    "print(time.perf_counter() - start)\n"
)


def inside(repeats: int) -> list[float]:
    return [float(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(repeats)]


def whole(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = [
        ("import camrt + build the CLI (in-process)", inside(args.repeats)),
        ("camrt --help (whole process)", whole(["-m", "camrt", "--help"], args.repeats)),
        ("python -c pass (whole process)", whole(["-c", "pass"], args.repeats)),
    ]
    for name, times in rows:
        print(f"{name:45s} median {statistics.median(times) * 1e3:7.1f} ms  "
              f"min {min(times) * 1e3:7.1f}  max {max(times) * 1e3:7.1f}")
    median = statistics.median(rows[0][1])
    print(f"goal: < {GOAL_S * 1e3:.0f} ms for the first row: {'met' if median < GOAL_S else 'MISSED'}")
    return 0 if median < GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
