"""Does fetching only some outputs of a camrt file cost only what they need?

Not in onnxruntime itself: it runs every node whatever a run fetches (ResNet-50, batch 8, 2 threads:
plain inference 239 ms, a camrt file with vanilla+guided input gradients 1280 ms for camrt/logits
alone). camrt's ExplainSession therefore runs one pruned subgraph per fetch set; the last row
measures that path. Usage:
    python bench/fetch_pruning.py FORWARD.onnx MODEL.camrt.onnx [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

from camrt import contract
from camrt.execution.session import ExplainSession


def median_ms(fn, repeats: int) -> tuple[float, float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("forward")
    parser.add_argument("camrt_file")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(args.forward, options, providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(args.camrt_file, options, providers=["CPUExecutionProvider"])
    name = plain.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    target = np.full(args.batch, contract.TOP1_TARGET, dtype=np.int64)
    grads = [o.name for o in full.get_outputs() if o.name.startswith(contract.GRADIENT_PREFIX)]
    rows = {
        "plain inference": lambda: plain.run(None, {name: x}),
        "camrt file, fetch camrt/logits": lambda: full.run([contract.LOGITS_OUTPUT], {name: x, contract.TARGET_INPUT: target}),
        "camrt file, fetch layer gradients": lambda: full.run(grads, {name: x, contract.TARGET_INPUT: target}),
    }
    pruned = ExplainSession(args.camrt_file, device="cpu", threads=args.threads)
    rows["ExplainSession (pruned), layer gradients"] = lambda: pruned.run(x, target, grads)
    for label, fn in rows.items():
        med, low, high = median_ms(fn, args.repeats)
        print(f"{label:38s} median {med:8.1f} ms  (min {low:.1f}, max {high:.1f}) batch {args.batch}, {args.threads} threads")


if __name__ == "__main__":
    main()
