"""The CLI's help texts are checked in (docs/cli/) and the examples in them run.

`camrt export`'s examples need torch; they run in tests/exporters/test_export_cli.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from camrt.cli import build_cli
from camrt.imaging.decode import load_image
from tests.helpers import random_image, tiny_onnx, write_image

from .cli_docs import DOCS, examples, help_texts


def test_help_texts_are_checked_in(exporter, exporters_plugin):
    texts = help_texts()
    assert {"camrt", "explain", "inspect", "methods", "export"} <= set(texts)
    for name, text in texts.items():
        path = DOCS / f"{name}.txt"
        assert path.exists(), f"{path} missing: run `python -m tests.runtime.cli_docs`"
        assert path.read_text() == text, f"{path} is stale: run `python -m tests.runtime.cli_docs`"
    assert sorted(p.stem for p in DOCS.glob("*.txt")) == sorted(texts)  # no doc of a removed command
    for name, text in texts.items():  # as a user types them
        assert text.startswith(f"Usage: camrt {'' if name == 'camrt' else name + ' '}"), text.splitlines()[0]


@pytest.fixture
def workspace(tiny, tmp_path, monkeypatch, rng):
    """The files the examples name: model.camrt.onnx, plain.onnx, photo.jpg, photos/ (nested)."""
    shutil.copy(tiny.path, tmp_path / "model.camrt.onnx")
    onnx.save(tiny_onnx()[0], str(tmp_path / "plain.onnx"))
    write_image(str(tmp_path / "photo.jpg"), random_image(rng, 30, 40))
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    write_image(str(tmp_path / "photos" / "a.jpg"), random_image(rng, 24, 20))
    write_image(str(tmp_path / "photos" / "b.png"), random_image(rng, 16, 16))
    write_image(str(tmp_path / "photos" / "sub" / "c.jpg"), random_image(rng, 18, 26))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_example(line: str, workspace):
    """One example line, in-process; a `producer | camrt ...` pipeline gets the producer's output
    (run by the shell) on stdin."""
    stdin = None
    if "|" in line:
        producer, line = (part.strip() for part in line.rsplit("|", 1))
        stdin = subprocess.run(producer, shell=True, cwd=workspace, capture_output=True, text=True,
                               check=True).stdout
        assert stdin.strip(), producer
    args = shlex.split(line)
    assert args[0] == "camrt"
    return CliRunner().invoke(build_cli(), args[1:], input=stdin, catch_exceptions=False)


def test_runtime_examples_run(workspace):
    ran = 0
    for command in ("camrt", "explain", "inspect", "methods", "eval", "metrics", "plugins"):
        for line in examples((DOCS / f"{command}.txt").read_text()):
            result = _run_example(line, workspace)
            assert result.exit_code == 0, f"{line}\n{result.output}"
            ran += 1
            if " explain " not in f" {line} ":
                assert result.stdout.strip(), line
                continue
            args = shlex.split(line.rsplit("|", 1)[-1])
            log = args[args.index("--jsonl") + 1] if "--jsonl" in args else None
            lines = (workspace / log).read_text() if log else result.stdout
            records = [json.loads(r) for r in lines.splitlines() if r.strip()]
            assert records, line
            for record in records:
                assert record["status"] == "ok", (line, record)
                heatmap = np.load(record["heatmap"])
                assert heatmap.shape == load_image(record["input"]).shape[:2]
                assert heatmap.min() >= 0 and heatmap.max() <= 1
    assert ran >= 8
