"""Several targets per input on a file without a seed entry (the class path, one run per rank):
class lists (--target 3,1) and multi-label thresholds (--target above:T, above:sigmoid:P).

Oracles: the tiny model's float64 numpy forward pass (which classes, in which order) and CAM's
closed form on its GAP + linear head (Grad-CAM's map there, up to a positive factor)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from camrt import postprocess
from camrt.cli import build_cli
from camrt.errors import UsageError
from camrt.explainer import Explainer
from camrt.imaging.preprocess import preprocess
from camrt.target_parsing import parse_target, parse_targets
from camrt.targets import ClassRequest, TargetListRequest, ThresholdRequest
from tests.helpers import CLASSES, HEIGHT, WIDTH, numpy_forward, random_image, write_image


def _cam(tiny, feat: np.ndarray, category: int) -> np.ndarray:
    cam = np.einsum("k,khw->hw", tiny.w2[category].astype(np.float64), feat)
    return postprocess.finalize([cam], (HEIGHT, WIDTH))


def _cli(*args: str):
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def test_parse_class_lists_and_thresholds():
    listed = parse_target("3, 1")
    assert listed == TargetListRequest((ClassRequest(3), ClassRequest(1))) and listed.ranks == [1, 2]
    assert [listed.output_tag(rank) for rank in listed.ranks] == ["class3", "class1"]
    assert parse_targets(["3", "1"]) == listed
    assert parse_target("above:0.5") == ThresholdRequest(0.5) and parse_target("above:-2").threshold == -2
    assert parse_target("above:sigmoid:0.7") == ThresholdRequest(0.7, sigmoid=True)
    assert ThresholdRequest(0.5).ranks is None


@pytest.mark.parametrize(("text", "message"), [
    ("3,,1", r"--target 3,,1: a class list takes class indices >= 0 separated by commas; '' is not one"),
    ("3,x", r"--target 3,x: a class list takes class indices >= 0 separated by commas; 'x' is not one"),
    ("2,-1", r"'-1' is not one"),
    ("2,4,2", r"--target 2,4,2: class 2 is listed twice"),
    ("above:high", r"--target above:T \(a score\) or above:sigmoid:P \(0 < P < 1\) needs a number, got 'above:high'"),
    ("above:sigmoid:1.5", r"got 'above:sigmoid:1.5'"),
    ("above:nan", r"got 'above:nan'"),
])
def test_malformed_lists_and_thresholds_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_target(text)


def test_repeated_targets_must_each_be_one_target():
    with pytest.raises(UsageError, match=r"--target topk:2 makes several maps per input; repeat --target only"):
        parse_targets(["3", "topk:2"])
    with pytest.raises(UsageError, match=r"--target 3 is given twice"):
        parse_targets(["3", "1", "3"])
    with pytest.raises(UsageError, match=r"^--target 7 is out of range: m.onnx has 5 classes \(0\.\.4\)$"):
        parse_target("1,7").check(CLASSES, "m.onnx")


def test_class_list_explains_each_class_in_order(tiny, rng):
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(3)]
    explained = Explainer(tiny.path, device="cpu").explain_request(images, parse_target("4,0,2"))
    forward = numpy_forward(tiny, preprocess(images, tiny.preprocessing))
    for i, results in enumerate(explained):
        assert [r.target for r in results] == [4, 0, 2]
        for r in results:
            assert r.score == pytest.approx(forward["logits"][i, r.target], rel=1e-5, abs=1e-6)
            np.testing.assert_allclose(r.heatmap, _cam(tiny, forward["feat"][i], r.target), atol=1e-5)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_threshold_explains_every_class_above_it_best_first(tiny, rng, sigmoid):
    """Each image gets the classes whose logit (or its sigmoid) is above the threshold, by falling
    logit; an image with none gets an empty list."""
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(4)]
    logits = numpy_forward(tiny, preprocess(images, tiny.preprocessing))["logits"]
    threshold = float(np.median(logits))
    wanted = [[int(c) for c in np.argsort(-row) if row[c] > threshold] for row in logits]
    given = 1 / (1 + np.exp(-threshold)) if sigmoid else threshold
    explained = Explainer(tiny.path, device="cpu").explain_request(images, ThresholdRequest(given, sigmoid))
    assert [[r.target for r in results] for results in explained] == wanted
    assert sum(map(len, wanted)) > len(images) // 2  # the case is not trivial
    none = ThresholdRequest(float(logits.max()) + 1.0)
    assert Explainer(tiny.path, device="cpu").explain_request(images, none) == [[], [], [], []]


def test_cli_threshold_records_files_and_the_no_class_record(tiny, tmp_path, rng):
    """--target above:T: one record per class above T (rank, class, score, threshold fields) with its
    heatmap file; an image with no class above T gets an error record saying so; a rerun with
    --skip-existing skips the finished image and redoes the failed one."""
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(2)]
    logits = numpy_forward(tiny, preprocess(images, tiny.preprocessing))
    low, high = sorted(range(2), key=lambda i: logits["logits"][i].max())
    threshold = float(logits["logits"][low].max())  # nothing of `low` is strictly above it
    wanted = [int(c) for c in np.argsort(-logits["logits"][high]) if logits["logits"][high, c] > threshold]
    assert wanted
    paths = [write_image(str(tmp_path / f"img{i}.png"), image) for i, image in enumerate(images)]
    out = tmp_path / "out"
    args = ["explain", tiny.path, *paths, "--target", f"above:{threshold!r}", "--format", "npy,jsonl", "-o", str(out),
            "-q"]
    result = _cli(*args)
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [r for r in records if r["status"] == "error"]
    ok = [r for r in records if r["status"] == "ok"]
    assert [r["input"] for r in failed] == [paths[low]] and "rank" not in failed[0]
    assert failed[0]["error"] == (f"no class has a score above {threshold:g} (--target above:{threshold:g}): "
                                  "nothing to explain")
    assert [(r["rank"], r["target"]) for r in ok] == list(enumerate(wanted, start=1))
    for r in ok:
        assert r["input"] == paths[high] and r["threshold"] == threshold and r["threshold_of"] == "score"
        assert r["heatmap"].endswith(f"img{high}.top{r['rank']}.heatmap.npy")
        assert r["score"] == pytest.approx(logits["logits"][high, r["target"]], rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(np.load(r["heatmap"]), _cam(tiny, logits["feat"][high], r["target"]), atol=1e-5)
    again = [json.loads(line) for line in _cli(*args, "--skip-existing").stdout.splitlines()]
    assert [r.get("skipped", False) for r in again if r["status"] == "ok"] == [True] * len(wanted)
    assert [r["input"] for r in again if r["status"] == "error"] == [paths[low]]


def test_cli_class_list_names_files_by_class(tiny, tmp_path, rng):
    image = random_image(rng, HEIGHT, WIDTH)
    path = write_image(str(tmp_path / "img.png"), image)
    feat = numpy_forward(tiny, preprocess([image], tiny.preprocessing))["feat"][0]
    result = _cli("explain", tiny.path, path, "--target", "3,1", "--format", "npy", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["rank"], r["target"], r["label"]) for r in records] == [(1, 3, "class-3"), (2, 1, "class-1")]
    for r in records:
        assert r["heatmap"] == str(tmp_path / "out" / f"img.class{r['target']}.heatmap.npy")
        np.testing.assert_allclose(np.load(r["heatmap"]), _cam(tiny, feat, r["target"]), atol=1e-5)
    repeated = _cli("explain", tiny.path, path, "--target", "3", "--target", "1", "--format", "npy", "-o",
                    str(tmp_path / "again"), "-q")
    assert [json.loads(line)["target"] for line in repeated.stdout.splitlines()] == [3, 1]
    refused = CliRunner().invoke(build_cli(), ["explain", tiny.path, path, "--target", "3,9"])
    assert refused.exit_code == 2 and "--target 9 is out of range" in refused.output
