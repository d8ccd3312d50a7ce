"""The benchmark harnesses run (never a speed assertion): bench/run.py's smoke configuration,
bench/gpu.py's CPU mode and bench/graph_optimization.py on resnet18.

Oracle of each run: the heatmaps of the anchors in the same run. camrt's Grad-CAM maps (host and
in-session postprocessing) must equal pytorch-grad-cam 1.5.7's within 1e-4, its saliency maps
Captum's (a few pixels move where onnxruntime and torch flip a ReLU switch: mean abs diff <= 1e-3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("torchcam")
pytest.importorskip("captum")


def _run(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "exporters"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_smoke_config_writes_results_and_camrt_agrees_with_the_anchors(tmp_path):
    _run(["bench/run.py", "--config", "smoke", "--results", str(tmp_path), "--cache", str(tmp_path / "cache"),
          "--machine", "test"])
    (result_file,) = tmp_path.glob("*-test-smoke.json")
    result = json.loads(result_file.read_text())
    assert result["threads"] == 2 and result["versions"]["grad-cam"] == "1.5.7"
    impls = {(r["impl"], r["method"]) for r in result["records"]}
    assert impls == {("ort", "inference"), ("camrt", "gradcam"), ("camrt-fused", "gradcam"), ("pgc", "gradcam"),
                     ("torchcam", "gradcam"), ("camrt", "saliency"), ("captum", "saliency")}
    for record in result["records"]:
        assert record["peak_rss_mb"] > 50
        assert [row["batch"] for row in record["rows"]] == [1, 2]
        for row in record["rows"]:
            assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
    agreement = {(a["impl"], a["method"], a["batch"]): a for a in result["agreement"]}
    for batch in (1, 2):
        for impl in ("camrt", "camrt-fused", "torchcam"):
            assert agreement[(impl, "gradcam", batch)]["max_abs_diff"] <= 1e-4, agreement[(impl, "gradcam", batch)]
        assert agreement[("camrt", "saliency", batch)]["mean_abs_diff"] <= 1e-3
    ratios = {(r["impl"], r["method"], r["batch"]) for r in result["ratios"] if "vs_inference" in r and "speedup_vs_pgc" in r}
    assert ("camrt", "gradcam", 2) in ratios
    startup = result["startup"]
    assert startup["import_camrt_median_s"] > 0 and startup["cold_one_image"]["ratio"] > 0
    markdown = result_file.with_suffix(".md").read_text()
    assert "Heatmap agreement" in markdown and "pgc" in markdown


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path):
    _run(["bench/gpu.py", "--device", "cpu", "--smoke", "--out", str(tmp_path)])
    (result_file,) = tmp_path.glob("gpu-*-smoke.json")
    batch = json.loads(result_file.read_text())["batches"]["2"]
    assert len(batch["timings"]) == 7
    for name, diff in batch["max_abs_diff_vs_pgc"].items():
        assert diff <= 1e-4, (name, diff)


def test_graph_optimization_bench_runs_and_both_levels_agree_with_float64(tmp_path):
    """Oracle: pytorch-grad-cam on a float64 copy of the model, in the same run."""
    out = tmp_path / "graph-optimization"
    _run(["bench/graph_optimization.py", "--models", "resnet18", "--repeats", "1", "--cache", str(tmp_path / "cache"),
          "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [row["level"] for row in rows] == ["all", "extended"]
    for row in rows:
        assert row["median_ms"] > 0
        assert row["vs_float64"] <= 1e-4 and row["vs_pytorch_grad_cam"] <= 1e-4, row
    assert "| resnet18 | layer4 | extended |" in out.with_suffix(".md").read_text()
