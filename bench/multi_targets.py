"""What do several class targets per image cost: one batched backward pass, or one run per rank?

For `--target topk:K` (class lists and thresholds run the same way) on a file exported with
`camrt export ... --seed`, compared per method:

- per rank: a forward run to rank the classes, then one fused forward+backward run of the file per
  rank (the path of files without a seed entry);
- stacked: `Explainer.explain_request`, one forward pass and one backward pass of the B x K one-hot
  seed rows (`camrt.seeded_explain.stacked_maps`).

Both include the method's maps and their postprocessing.

Usage:
    python bench/multi_targets.py MODEL.camrt.onnx [--k 5] [--batch 2] [--threads 2] [--repeats 5]
        [--methods gradcam,saliency]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from camrt import contract
from camrt.explainer import Explainer
from camrt.targets import ClassTarget, TopKRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.seeded_run import median_ms  # noqa: E402


def per_rank(explainer: Explainer, x: np.ndarray, k: int) -> list:
    """The class path: rank the classes with a forward run, then explain each rank with its own run."""
    logits = explainer.session.run(x, ClassTarget(), [contract.LOGITS_OUTPUT])[contract.LOGITS_OUTPUT]
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [explainer.explain(x, targets=ranked[:, rank].tolist()) for rank in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("camrt_file")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="gradcam,saliency")
    args = parser.parse_args()
    for method in args.methods.split(","):
        explainer = Explainer(args.camrt_file, method=method, device="cpu", threads=args.threads)
        p = explainer.info.preprocessing
        x = np.random.default_rng(0).standard_normal((args.batch, p.channels, p.height, p.width)).astype(np.float32)
        stacked = explainer.explain_request(x, TopKRequest(args.k))
        ranked = per_rank(explainer, x, args.k)
        worst = max(float(np.abs(stacked[i][r].heatmap - ranked[r][i].heatmap).max())
                    for i in range(args.batch) for r in range(args.k))
        times = median_ms({"per rank": lambda: per_rank(explainer, x, args.k),
                           "stacked": lambda: explainer.explain_request(x, TopKRequest(args.k))}, args.repeats)
        print(f"{args.camrt_file} {method}: batch {args.batch}, top-{args.k}, {p.height}x{p.width}, {args.threads} "
              f"threads, median of {args.repeats}: per rank {times['per rank']:.1f} ms, stacked "
              f"{times['stacked']:.1f} ms ({times['per rank'] / times['stacked']:.2f}x); maps differ by {worst:.1e}")


if __name__ == "__main__":
    main()
