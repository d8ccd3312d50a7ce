"""`camrt export`'s help examples (docs/cli/export.txt) run, and every option they use lands in the
file: checked with `camrt inspect` and, for --weights, against the torch model holding those weights."""

from __future__ import annotations

import json
import shlex

import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner

from camrt import contract
from camrt.cli import build_cli
from camrt.execution.session import ExplainSession
from tests.helpers import tiny_onnx
from tests.runtime.cli_docs import DOCS, examples


@pytest.fixture
def cli(exporters_plugin):
    return build_cli()


def test_export_help_examples_run(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    squeezenet = torchvision.models.squeezenet1_1(weights=None).eval()
    torch.save(squeezenet.state_dict(), tmp_path / "squeezenet.pth")
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(1000)))
    onnx.save(tiny_onnx()[0], str(tmp_path / "plain.onnx"))
    lines = examples((DOCS / "export.txt").read_text())
    assert len(lines) == 3
    for line in lines:
        result = CliRunner().invoke(cli, shlex.split(line)[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{line}\n{result.output}"

    def inspect(path: str) -> dict:
        return json.loads(CliRunner().invoke(cli, ["inspect", path, "--json"], catch_exceptions=False).stdout)

    r18 = inspect("r18.camrt.onnx")
    assert r18["layers"] == ["layer4", "layer3"] and r18["rule_sets"] == ["vanilla", "guided"]
    sq = inspect("sq.camrt.onnx")
    assert (sq["preprocessing"]["height"], sq["preprocessing"]["width"]) == (64, 64) and sq["labels"] == 1000
    plain = inspect("plain.camrt.onnx")
    p = plain["preprocessing"]
    assert p["mean"] == [0.5] * 3 and p["std"] == [0.5] * 3 and p["channel_order"] == "bgr"
    # --weights: the file computes the logits of the torch model holding those weights.
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    session = ExplainSession("sq.camrt.onnx", device="cpu")
    logits = session.run(x, [-1, -1], [contract.LOGITS_OUTPUT])[contract.LOGITS_OUTPUT]
    with torch.no_grad():
        expected = squeezenet(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_torch_only_options_on_an_onnx_source_are_refused(cli, tmp_path):
    onnx.save(tiny_onnx()[0], str(tmp_path / "plain.onnx"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "plain.onnx"), "--opset", "18", "--weights",
                                      str(weights), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "--weights and --opset apply to torch sources" in result.stderr
    assert not (tmp_path / "x.onnx").exists()
