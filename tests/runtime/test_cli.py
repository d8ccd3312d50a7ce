"""`camrt explain / methods / inspect` through click's CliRunner; outputs checked against the library."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from camrt import contract
from camrt.cli import build_cli
from camrt.cli.explain import RECORDS_FILE
from camrt.errors import ExitCode
from camrt.execution.session import GRAPH_OPTIMIZATIONS
from camrt.explainer import Explainer
from camrt.hookspecs import hookimpl
from camrt.imaging.decode import load_image
from camrt.methods.gradcam import GradCAM
from tests.helpers import CLASSES, random_image, write_image


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(build_cli(), list(args), input=input, catch_exceptions=False)


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def inputs(tmp_path, rng):
    """Good images (two with the same stem in different folders) and three bad ones."""
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    good = [
        write_image(str(root / "a" / "cat.png"), random_image(rng, 20, 30)),
        write_image(str(root / "b" / "cat.png"), random_image(rng, 24, 24)),
        write_image(str(root / "b" / "dog.jpg"), random_image(rng, 50, 61)),
    ]
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "text.png").write_text("not an image at all")
    data = open(good[2], "rb").read()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "b" / "notes.txt").write_text("not picked up from a directory")
    bad = [str(root / "b" / n) for n in ("empty.png", "text.png", "truncated.jpg")]
    return root, good, bad


def _expected_overlay(heatmap: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """0.5 * JET(uint8(255 h)) + 0.5 * image, BGR, as pytorch-grad-cam's show_cam_on_image blends."""
    jet = cv2.applyColorMap(np.uint8(255 * heatmap), cv2.COLORMAP_JET).astype(np.float64)
    return 0.5 * jet + 0.5 * rgb[:, :, ::-1].astype(np.float64)


def test_explain_directory_with_bad_images(tiny, inputs, tmp_path):
    root, good, bad = inputs
    out = tmp_path / "out"
    result = run("explain", tiny.path, str(root), "-o", str(out), "--batch-size", "2", "--device", "cpu")
    assert result.exit_code == ExitCode.SOME_INPUTS_FAILED, result.output
    got = {r["input"]: r for r in records(result)}
    assert sorted(got) == sorted(good + bad)  # every input has a record, txt files are not inputs
    for path in bad:
        assert got[path]["status"] == "error" and path in got[path]["error"]
        assert got[path]["heatmap"] is None and got[path]["overlay"] is None
    explainer = Explainer(tiny.path, device="cpu")
    heatmaps = set()
    for path in good:
        record = got[path]
        assert record["status"] == "ok" and record["error"] is None
        assert record["method"] == "gradcam" and record["layer"] == "feat"
        rgb = load_image(path)
        expected = explainer.explain([rgb])[0]
        assert record["target"] == expected.target and record["label"] == expected.label
        assert record["score"] == pytest.approx(expected.score, rel=1e-5)
        assert record["probability"] == pytest.approx(expected.probability, rel=1e-5)
        assert (record["height"], record["width"]) == rgb.shape[:2] and record["elapsed_ms"] >= 0
        heatmap = np.load(record["heatmap"])
        assert heatmap.dtype == np.float32 and heatmap.shape == rgb.shape[:2]
        np.testing.assert_allclose(heatmap, expected.heatmap, atol=1e-6)
        overlay = cv2.imread(record["overlay"], cv2.IMREAD_UNCHANGED)
        assert np.abs(overlay - _expected_overlay(heatmap, rgb)).max() <= 1.0
        heatmaps.add(record["heatmap"])
    assert len(heatmaps) == 3  # a/cat.png and b/cat.png did not overwrite each other
    expected_files = {os.path.basename(p) for r in got.values() for p in (r["heatmap"], r["overlay"]) if p}
    assert set(os.listdir(out)) == expected_files  # nothing else: no temp files left behind


def test_all_ok_exit_zero_and_stdin_paths(tiny, inputs, tmp_path):
    _, good, _ = inputs
    out = tmp_path / "out"
    result = run("explain", tiny.path, "-", "-o", str(out), "--format", "npy,jsonl", "--target", "3",
                 "--graph-optimization", "none", input="\n".join(good) + "\n")
    assert result.exit_code == 0, result.output
    got = records(result)
    assert [r["input"] for r in got] == good
    assert all(r["target"] == 3 and r["overlay"] is None for r in got)
    logged = [json.loads(line) for line in (out / RECORDS_FILE).read_text().splitlines()]
    assert logged == got
    explainer = Explainer(tiny.path, device="cpu")
    for record in got:
        expected = explainer.explain([load_image(record["input"])], targets=[3])[0]
        # no graph optimisation against the library's default ("all"): rounding apart, the same maps
        np.testing.assert_allclose(np.load(record["heatmap"]), expected.heatmap, atol=1e-5)


def test_non_onnx_model_exits_3_with_one_line(tmp_path, inputs):
    model = tmp_path / "model.onnx"
    model.write_text("definitely not protobuf")
    result = run("explain", str(model), str(inputs[0]), "-o", str(tmp_path / "out"))
    assert result.exit_code == ExitCode.MODEL_ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an ONNX file" in lines[0] and str(model) in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


def test_unknown_contract_version_exits_3(make_model, inputs, tmp_path):
    model = make_model(metadata_overrides={contract.META_CONTRACT_VERSION: "7"})
    for args in (["explain", model.path, str(inputs[0]), "-o", str(tmp_path / "o")], ["inspect", model.path]):
        result = run(*args)
        assert result.exit_code == ExitCode.MODEL_ERROR
        assert "camrt export" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_usage_errors(tiny, inputs, tmp_path):
    out = str(tmp_path / "out")
    result = run("explain", tiny.path, str(inputs[0]), "-o", out, "--target", str(CLASSES))
    assert result.exit_code == ExitCode.USAGE_ERROR and "out of range" in result.stderr
    result = run("explain", tiny.path, str(inputs[0]), "-o", out, "--format", "gif")
    assert result.exit_code == ExitCode.USAGE_ERROR and "unknown output format 'gif'" in result.stderr
    result = run("explain", tiny.path, str(inputs[0]), "-o", out, "-m", "nope")
    assert result.exit_code == ExitCode.USAGE_ERROR and "registered methods:" in result.stderr
    assert "gradcam (aliases: grad-cam)" in result.stderr
    result = run("explain", tiny.path, str(inputs[0]), "-o", out, "-O", "power=2")
    assert result.exit_code == ExitCode.USAGE_ERROR and "no option(s) power" in result.stderr
    result = run("explain", tiny.path, "-", "-o", out, input="")
    assert result.exit_code == ExitCode.USAGE_ERROR and "no input images" in result.stderr
    result = run("explain", tiny.path, str(inputs[0]), "-o", out, "--graph-optimization", "fast")
    choices = ", ".join(f"'{level}'" for level in GRAPH_OPTIMIZATIONS)
    assert result.exit_code == ExitCode.USAGE_ERROR and f"'fast' is not one of {choices}" in result.stderr


def test_failing_renderer_leaves_no_temp_file(tiny, inputs, tmp_path, plugin):
    class Failing:
        @hookimpl
        def register_renderers(self, register):
            def write(path, heatmap, image, options):
                with open(path, "wb") as handle:
                    handle.write(b"half a file")
                raise OSError("disk full")

            register("broken", write, suffix=".broken.bin")

    plugin(Failing(), "test-failing-renderer")
    _, good, _ = inputs
    out = tmp_path / "out"
    result = run("explain", tiny.path, good[0], "-o", str(out), "--format", "npy,broken")
    assert result.exit_code == ExitCode.SOME_INPUTS_FAILED
    (record,) = records(result)
    assert record["status"] == "error" and "disk full" in record["error"] and "broken" in record["error"]
    assert os.listdir(out) == ["cat.heatmap.npy"]  # the finished npy stays; no partial or temp file


def test_output_dir_inside_input_dir_is_not_reexplained(tiny, tmp_path, rng):
    root = tmp_path / "imgs"
    root.mkdir()
    write_image(str(root / "one.png"), random_image(rng, 16, 16))
    result = run("explain", tiny.path, str(root), "-o", str(root / "zz-out"))
    assert result.exit_code == 0
    assert [r["input"] for r in records(result)] == [str(root / "one.png")]


def test_methods_json_and_table():
    result = run("methods", "--json")
    assert result.exit_code == 0
    (gradcam,) = [m for m in json.loads(result.stdout) if m["name"] == "gradcam"]
    assert gradcam["aliases"] == list(GradCAM.aliases)
    assert gradcam["requires"] == {"activations": True, "gradients": True, "input_gradient": None}
    assert gradcam["options"] == [{"name": "eigen_smooth", "type": "bool", "default": False},
                                  {"name": "aug_smooth", "type": "bool", "default": False}]
    assert gradcam["plugin"] == "camrt.methods.gradcam"
    table = run("methods").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "ALIASES", "REQUIRES"]
    assert ["gradcam", "grad-cam"] in [row.split()[:2] for row in table[1:]]


def test_inspect(tiny):
    result = run("inspect", tiny.path, "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["layers"] == ["feat", "conv"] and summary["rule_sets"] == ["vanilla", "guided"]
    assert summary["labels"] == CLASSES and summary["preprocessing"]["width"] == tiny.preprocessing.width
    text = run("inspect", tiny.path).stdout
    assert "layers:           feat, conv" in text


def test_version_and_help():
    from camrt import __version__

    assert run("--version").stdout.strip() == f"camrt {__version__}"
    help_text = run("--help").stdout
    for command in ("explain", "inspect", "methods"):
        assert command in help_text
