"""What does a seeded run (forward once, seed from its outputs, backward on the same activations) cost?

A seed that depends on the forward outputs (a segmentation class's argmax region, a box matched
against a detection head, a cosine similarity) needs the score before the backward pass can start.
Compared, per fetch set (a layer's activations and gradients; the vanilla input gradient):

- fused: one run of the file on the target path (the classifier case: no seed, the lower bound);
- forward + fused: a forward run to make the seed, then a full forward+backward run (what a single
  graph with a fed seed would cost: the forward twice);
- seeded: `ExplainSession.run_seeded` (the file cut at camrt/seed: the forward graph, which also
  returns the tensors the backward reads, then the backward graph), and its two parts.

Usage (a file exported with `camrt export ... --seed`):
    python bench/seeded_run.py MODEL.camrt.onnx [--batch 4] [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from camrt import contract
from camrt.execution.session import ExplainSession


def median_ms(rows: dict, repeats: int) -> dict[str, float]:
    """Median time of each function, run round-robin so that a varying machine load hits every row alike."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():
        fn()
    for _ in range(repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def target_path_seed(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The top-1 class channel (summed over any further axes): the seed of the fused run's target."""
    logits = outputs[contract.LOGITS_OUTPUT]
    per_class = logits.reshape(*logits.shape[:2], -1).sum(axis=2)
    seed = np.zeros_like(logits)
    seed[np.arange(len(logits)), per_class.argmax(axis=1)] = 1
    return seed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("camrt_file")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    session = ExplainSession(args.camrt_file, device="cpu", threads=args.threads)
    p = session.info.preprocessing
    x = np.random.default_rng(0).standard_normal((args.batch, p.channels, p.height, p.width)).astype(np.float32)
    targets = np.full(args.batch, contract.TOP1_TARGET)
    layer = session.info.default_layer
    fetch_sets = {f"layer {layer}": [contract.activation_output(layer), contract.gradient_output(layer)]}
    if contract.RULE_VANILLA in session.info.rule_sets:
        fetch_sets["input gradient"] = [contract.input_gradient_output(contract.RULE_VANILLA)]
    print(f"{args.camrt_file}: batch {args.batch}, {p.height}x{p.width}, {args.threads} threads, "
          f"median of {args.repeats} (ms)")
    for label, fetch in fetch_sets.items():
        plan = session.seeded_plan(fetch)
        graphs = plan.graphs
        forward_feeds = {session.info.input_name: x, contract.TARGET_INPUT: targets}
        forward_feeds = {i.name: forward_feeds[i.name] for i in plan.forward_session.get_inputs()}
        forward_names = [o.name for o in plan.forward_session.get_outputs()]
        values = dict(zip(forward_names, plan.forward_session.run(forward_names, forward_feeds)))
        values.update({k: v for k, v in forward_feeds.items()})
        backward_feeds = {contract.SEED_TENSOR: target_path_seed(values), **{b: values[b] for b in graphs.boundary}}
        rows = {
            "fused (target path)": lambda: session.run(x, targets, fetch),
            "forward + fused": lambda: (session.run(x, targets, [contract.LOGITS_OUTPUT]), session.run(x, targets, fetch)),
            "seeded (run_seeded)": lambda: session.run_seeded(x, target_path_seed, fetch),
            "  its forward graph": lambda: plan.forward_session.run(forward_names, forward_feeds),
            "  its backward graph": lambda: plan.backward_session.run(list(graphs.backward_fetch), backward_feeds),
        }
        boundary_mb = sum(values[b].nbytes for b in graphs.boundary) / 2**20
        print(f"fetch {label}: {len(graphs.boundary)} boundary tensors, {boundary_mb:.1f} MiB")
        for name, ms in median_ms(rows, args.repeats).items():
            print(f"  {name:24s} {ms:8.1f}")


if __name__ == "__main__":
    main()
