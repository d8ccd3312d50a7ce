"""`camrt explain` in production: the issue's acceptance cases (200 images with 5 bad ones, an
interrupted run resumed with --skip-existing, CLI = Python API), targets, outputs and options.

Oracles: the Python API on the same batches (the CLI must equal it exactly), the tiny model's numpy
forward pass (class ranking, softmax), OpenCV's colormaps (overlays), and the bytes and mtimes of
files written before an interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from camrt import contract
from camrt.batch import RECORD_FIELDS, open_log
from camrt.cli import build_cli
from camrt.cli.explain import RECORDS_FILE
from camrt.errors import ExitCode
from camrt.explainer import Explainer
from camrt.imaging.decode import load_image
from camrt.imaging.preprocess import preprocess
from tests.helpers import CLASSES, numpy_forward, random_image, write_image

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(build_cli(), list(args), input=input, catch_exceptions=False)


def records_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- 200 images, 5 of them bad ---------------------------------------------------------------


@pytest.fixture
def two_hundred(tmp_path, rng):
    """195 good small images (PNG and JPEG, nested folders) and the issue's five special files."""
    root = tmp_path / "in"
    for folder in ("a", "b/c"):
        (root / folder).mkdir(parents=True)
    good = []
    for i in range(195):
        folder = ("a", "b", "b/c")[i % 3]
        ext = ".png" if i % 2 else ".jpg"
        good.append(write_image(str(root / folder / f"img{i:03d}{ext}"),
                                random_image(rng, 12 + i % 9, 14 + i % 7)))
    jpeg = open(good[0], "rb").read()
    (root / "a" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "b" / "text.png").write_text("this is a text file, not a PNG\n")
    rgb16 = rng.integers(0, 65536, (15, 17, 3), dtype=np.uint16)
    assert cv2.imwrite(str(root / "b" / "deep16.png"), rgb16[:, :, ::-1])
    rgba = np.dstack([random_image(rng, 13, 19), rng.integers(0, 256, (13, 19), dtype=np.uint8)])
    assert cv2.imwrite(str(root / "b" / "alpha.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    (root / "b" / "readme.txt").write_text("not an image extension: not an input")
    bad = {str(root / "a" / "truncated.jpg"): "truncated", str(root / "a" / "zero.png"): "zero-byte",
           str(root / "b" / "text.png"): "cannot decode"}
    working = {str(root / "b" / "deep16.png"): (rgb16 >> 8).astype(np.uint8), str(root / "b" / "alpha.png"): rgba[:, :, :3]}
    return root, good, bad, working


def test_two_hundred_images_five_bad(tiny, two_hundred, tmp_path):
    root, good, bad, working = two_hundred
    out = tmp_path / "out"
    result = run("explain", tiny.path, str(root), "-o", str(out), "--batch-size", "16", "--device", "cpu")
    assert result.exit_code == ExitCode.SOME_INPUTS_FAILED
    records = records_of(result.stdout)
    assert len(records) == 200
    assert all(list(r)[: len(RECORD_FIELDS)] == list(RECORD_FIELDS) for r in records)
    by_input = {r["input"]: r for r in records}
    assert set(by_input) == set(good) | set(bad) | set(working)  # nothing skipped, the .txt not taken
    assert sum(r["status"] == "ok" for r in records) == 197
    for path, reason in bad.items():
        record = by_input[path]
        assert record["status"] == "error" and path in record["error"] and reason in record["error"]
        assert record["heatmap"] is None and record["overlay"] is None and record["target"] is None
    explainer = Explainer(tiny.path, device="cpu")
    for record in records:
        if record["status"] != "ok":
            continue
        assert record["error"] is None and record["method"] == "gradcam" and record["layer"] == "feat"
        heatmap = np.load(record["heatmap"])
        overlay = cv2.imread(record["overlay"], cv2.IMREAD_UNCHANGED)
        assert heatmap.shape == overlay.shape[:2] == (record["height"], record["width"])
    for path, rgb in working.items():  # 16-bit: the high byte; RGBA: the colour channels
        expected = explainer.explain([rgb])[0]
        np.testing.assert_array_equal(np.load(by_input[path]["heatmap"]), expected.heatmap)
        assert by_input[path]["target"] == expected.target


# --- an interrupted run, resumed --------------------------------------------------------------


def _digest(path: str) -> tuple[int, str]:
    return os.stat(path).st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_skip_existing_resumes_a_killed_run(tiny, tmp_path, rng):
    root = tmp_path / "in"
    root.mkdir()
    paths = [write_image(str(root / f"p{i:03d}.png"), random_image(rng, 14, 18)) for i in range(60)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "camrt", "explain", tiny.path, "-", "-o", str(out), "--batch-size", "1",
               "--format", "png,npy,jsonl", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    # Stream the paths as a pipeline would, a few ahead of the records, and kill it midway.
    ahead = 4
    for path in paths[:ahead]:
        process.stdin.write(path + "\n")
    process.stdin.flush()
    seen = 0
    while seen < 25:
        assert process.stdout.readline(), "camrt explain ended early"
        seen += 1
        process.stdin.write(paths[seen + ahead - 1] + "\n")
        process.stdin.flush()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    logged = {r["input"] for r in records_of((out / RECORDS_FILE).read_text()) if r["status"] == "ok"}
    done_before = {}  # done: files written and the record logged (a kill can fall between the two)
    for path in paths:
        stem = out / Path(path).stem
        files = [f"{stem}.heatmap.npy", f"{stem}.overlay.png"]
        if all(os.path.exists(f) for f in files) and path in logged:
            done_before[path] = {f: _digest(f) for f in files}
    assert 20 <= len(done_before) < len(paths)
    time.sleep(0.05)  # a rewrite would get a later mtime

    result = run("explain", tiny.path, str(root), "-o", str(out), "--batch-size", "7", "--skip-existing",
                 "--format", "png,npy,jsonl", "--device", "cpu")
    assert result.exit_code == 0, result.output
    resumed = records_of(result.stdout)
    assert [r["input"] for r in resumed] == paths
    assert {r["input"] for r in resumed if r.get("skipped")} == set(done_before)
    first = {r["input"]: r for r in records_of((out / RECORDS_FILE).read_text())[: len(logged)]}
    for record in resumed:  # a skipped input's record is the one logged before (this run's elapsed_ms)
        if record.get("skipped"):
            same = {k: v for k, v in record.items() if k not in ("skipped", "elapsed_ms")}
            assert same == {k: v for k, v in first[record["input"]].items() if k != "elapsed_ms"}
    for path, files in done_before.items():
        for f, digest in files.items():
            assert _digest(f) == digest, f"{f} was rewritten"
    explainer = Explainer(tiny.path, device="cpu")
    for record in resumed:
        assert record["status"] == "ok"
        expected = explainer.explain([load_image(record["input"])])[0]
        np.testing.assert_allclose(np.load(record["heatmap"]), expected.heatmap, atol=1e-6)
        assert cv2.imread(record["overlay"]).shape[:2] == expected.heatmap.shape
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary files left
    log = records_of((out / RECORDS_FILE).read_text())  # the first run's records, then the resumed run's
    explained = {r["input"] for r in log if r["status"] == "ok" and not r.get("skipped")}
    assert explained == set(paths)


def test_resumed_log_drops_an_unfinished_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"input": "a"}\n{"input": "b", "sta')
    with open_log(str(path), resume=True) as log:
        log.write('{"input": "b"}\n')
    assert records_of(path.read_text()) == [{"input": "a"}, {"input": "b"}]
    with open_log(str(path), resume=False) as log:
        pass
    assert path.read_text() == ""


# --- CLI = Python API; targets ----------------------------------------------------------------


@pytest.fixture
def six(tmp_path, rng):
    root = tmp_path / "six"
    root.mkdir()
    return [write_image(str(root / f"s{i}.png"), random_image(rng, 10 + 3 * i, 21 - i)) for i in range(6)]


def test_cli_equals_python_api_exactly(tiny, six, tmp_path):
    result = run("explain", tiny.path, *six, "-o", str(tmp_path / "out"), "--batch-size", "3", "--device", "cpu")
    assert result.exit_code == 0
    records = records_of(result.stdout)
    explainer = Explainer(tiny.path, device="cpu")
    expected = [r for batch in (six[:3], six[3:]) for r in explainer.explain([load_image(p) for p in batch])]
    for record, result in zip(records, expected, strict=True):
        np.testing.assert_array_equal(np.load(record["heatmap"]), result.heatmap)
        assert {k: record[k] for k in result.record()} == result.record()


def test_top_k_records_and_files(tiny, six, tmp_path):
    out = tmp_path / "out"
    result = run("explain", tiny.path, *six[:4], "-o", str(out), "--target", "topk:3", "--device", "cpu")
    assert result.exit_code == 0
    records = records_of(result.stdout)
    assert len(records) == 12
    images = [load_image(p) for p in six[:4]]
    logits = numpy_forward(tiny, preprocess(images, tiny.preprocessing))["logits"]
    explainer = Explainer(tiny.path, device="cpu")
    files = set()
    for i, path in enumerate(six[:4]):
        mine = [r for r in records if r["input"] == path]
        assert [r["rank"] for r in mine] == [1, 2, 3]
        assert [r["target"] for r in mine] == np.argsort(-logits[i])[:3].tolist()
        assert [r["score"] for r in mine] == pytest.approx(np.sort(logits[i])[::-1][:3], rel=1e-4, abs=1e-5)
        for r in mine:
            np.testing.assert_allclose(np.load(r["heatmap"]),
                                       explainer.explain([images[i]], targets=[r["target"]])[0].heatmap, atol=1e-6)
            files.update([r["heatmap"], r["overlay"]])
    assert len(files) == 24 and all(os.path.exists(f) for f in files)
    result = run("explain", tiny.path, six[0], "-o", str(out), "--target", f"topk:{CLASSES + 1}")
    assert result.exit_code == ExitCode.USAGE_ERROR and "out of range" in result.stderr


def test_softmax_flag_gives_probabilities(make_model, six, tmp_path):
    model = make_model(metadata_overrides={
        contract.META_SCORE: '{"tensor": "logits", "output": "probs", "softmax": false}'})
    args = ["explain", model.path, six[0], "-o", str(tmp_path / "out"), "--format", "npy"]
    assert records_of(run(*args).stdout)[0]["probability"] is None
    (record,) = records_of(run(*args, "--softmax").stdout)
    logits = numpy_forward(model, preprocess([load_image(six[0])], model.preprocessing))["logits"][0]
    assert record["probability"] == pytest.approx(_softmax(logits)[record["target"]], rel=1e-5)


# --- inputs and options -------------------------------------------------------------------------


def test_globs_jsonl_file_and_colormap(tiny, tmp_path, rng, monkeypatch):
    root = tmp_path / "g"
    (root / "deep" / "er").mkdir(parents=True)
    jpgs = [write_image(str(root / "x.jpg"), random_image(rng, 16, 16)),
            write_image(str(root / "deep" / "er" / "y.jpg"), random_image(rng, 20, 12))]
    write_image(str(root / "deep" / "z.png"), random_image(rng, 16, 16))
    monkeypatch.chdir(tmp_path)
    result = run("explain", tiny.path, "g/**/*.jpg", "-o", "out", "--jsonl", "records.jsonl",
                 "--colormap", "turbo", "--alpha", "0.3")
    assert result.exit_code == 0 and result.stdout == ""
    records = records_of((tmp_path / "records.jsonl").read_text())
    assert sorted(os.path.abspath(r["input"]) for r in records) == sorted(jpgs)
    for record in records:
        heatmap, rgb = np.load(record["heatmap"]), load_image(record["input"])
        colored = cv2.applyColorMap(np.uint8(255 * heatmap), cv2.COLORMAP_TURBO).astype(np.float64)
        expected = 0.3 * colored + 0.7 * rgb[:, :, ::-1]
        assert np.abs(cv2.imread(record["overlay"]) - expected).max() <= 1.0
    result = run("explain", tiny.path, "g/*.jpg", "-o", "out", "--colormap", "rainbowish")
    assert result.exit_code == ExitCode.USAGE_ERROR and "turbo" in result.stderr
    result = run("explain", tiny.path, "g/*.gif", "-o", "out")
    assert result.exit_code == ExitCode.USAGE_ERROR and "no files match g/*.gif" in result.stderr


def test_fail_fast_stops_after_the_failing_batch(tiny, tmp_path, rng):
    root = tmp_path / "ff"
    root.mkdir()
    for i in range(10):
        write_image(str(root / f"i{i}.png"), random_image(rng, 12, 12))
    (root / "i3.png").write_bytes(b"")
    result = run("explain", tiny.path, str(root), "-o", str(tmp_path / "out"), "--batch-size", "2", "--fail-fast")
    assert result.exit_code == ExitCode.SOME_INPUTS_FAILED
    records = records_of(result.stdout)
    assert [Path(r["input"]).name for r in records] == ["i0.png", "i1.png", "i2.png", "i3.png"]
    assert "--fail-fast" in result.stderr
    assert "--fail-fast" not in run("explain", tiny.path, str(root), "-o", str(tmp_path / "o2"), "--fail-fast",
                                    "--batch-size", "2", "-q").stderr


def _stderr_on_a_terminal(args: list[str]) -> str:
    """Run `python -m camrt` with stderr on a pseudo-terminal; what it wrote there."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "camrt", *args], stdout=subprocess.DEVNULL,
                               stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        try:
            data = os.read(master, 4096) if ready else b""
        except OSError:  # the child closed the terminal
            data = b""
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert process.wait(timeout=60) == 0
    return b"".join(chunks).decode()


def test_progress_only_on_a_terminal(tiny, six, tmp_path):
    args = ["explain", tiny.path, str(Path(six[0]).parent), "-o", str(tmp_path / "out"), "--batch-size", "4"]
    shown = _stderr_on_a_terminal(args)
    assert "6/6 inputs, 0 failed" in shown and "[" + "#" * 30 + "]" in shown
    assert _stderr_on_a_terminal([*args, "--quiet"]) == ""
    assert run(*args).stderr == ""  # not a terminal: no progress


def test_device_cuda(tiny, six, tmp_path):
    """Without a CUDA provider (this machine's onnxruntime): a usage error saying what to install.
    With one: the same records as on the CPU, heatmaps within 1e-4."""
    import onnxruntime

    args = ["explain", tiny.path, *six, "--format", "npy"]
    cuda = run(*args, "-o", str(tmp_path / "cuda"), "--device", "cuda")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert cuda.exit_code == ExitCode.USAGE_ERROR
        assert "onnxruntime-gpu" in cuda.stderr and "--device cpu" in cuda.stderr
        return
    cpu = run(*args, "-o", str(tmp_path / "cpu"), "--device", "cpu")
    assert cuda.exit_code == cpu.exit_code == 0
    for a, b in zip(records_of(cuda.stdout), records_of(cpu.stdout), strict=True):
        assert a["target"] == b["target"]
        np.testing.assert_allclose(np.load(a["heatmap"]), np.load(b["heatmap"]), atol=1e-4)


def test_a_crashing_method_exits_4_not_1(tiny, six, tmp_path, plugin, capsys):
    """A bug is not "some inputs failed": exit code 4 (ExitCode.INTERNAL_ERROR) with the traceback."""
    from camrt.cli import main
    from camrt.hookspecs import hookimpl
    from camrt.methods.gradcam import GradCAM

    class Crashing(GradCAM):
        name = "test-crashing"
        aliases = ()

        def explain(self, outputs, *, layer):
            raise RuntimeError("bug on purpose")

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Crashing)

    plugin(Plugin(), "test-crashing-plugin")
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", tiny.path, six[0], "-m", "test-crashing", "-o", str(tmp_path / "out")])
    assert exit_info.value.code == ExitCode.INTERNAL_ERROR == 4
    err = capsys.readouterr().err
    assert "RuntimeError: bug on purpose" in err and "camrt: internal error" in err
