"""The Spark recipe of docs/ray.md, run as written in pyspark's local mode: its records equal the
local CLI's (the same building block, camrt.ray.ExplainBatches, without Ray)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pyspark  # noqa: F401  (the test install has it: pip install ".[test]")
import pytest

from camrt.cli import build_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def spark_recipe() -> str:
    text = (ROOT / "docs" / "ray.md").read_text()
    section = text.split("## Spark", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


@pytest.fixture
def spark(monkeypatch):
    from pyspark.sql import SparkSession

    # Spark's Python workers: this interpreter, with camrt importable as the driver imports it
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    session = (SparkSession.builder.master("local[2]").appName("camrt-recipe")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate())
    yield session
    session.stop()


def test_the_spark_recipe_gives_the_local_clis_records(tiny, tmp_path, monkeypatch, spark):
    import cv2
    from click.testing import CliRunner

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        cv2.imwrite(str(photos / f"p{i:02d}.png"), rng.integers(0, 256, (20 + i, 28, 3), dtype=np.uint8))
    shutil.copy(tiny.path, tmp_path / "model.camrt.onnx")
    monkeypatch.chdir(tmp_path)
    namespace = {"spark": spark}
    exec(compile(spark_recipe(), "docs/ray.md", "exec"), namespace)  # noqa: S102 - our own docs
    got = {}
    for line in namespace["records"].collect():
        record = json.loads(line.record)
        got[record["input"]] = record
    local = CliRunner().invoke(build_cli(), ["explain", "model.camrt.onnx", "photos/", "-o", "local", "--quiet"])
    assert local.exit_code == 0, local.output
    want = {r["input"]: r for r in map(json.loads, local.stdout.splitlines())}
    assert got.keys() == want.keys() and len(got) == 12
    for name, record in want.items():
        mine = got[name]
        assert {k: v for k, v in mine.items() if k not in ("elapsed_ms", "heatmap", "overlay", "outputs")} == \
               {k: v for k, v in record.items() if k not in ("elapsed_ms", "heatmap", "overlay", "outputs")}
        np.testing.assert_allclose(np.load(mine["heatmap"]), np.load(record["heatmap"]), rtol=0, atol=1e-6)
