"""The batch engine (`camrt.batch`) and `camrt eval` streaming.

Memory is checked by counting: the inputs (and Explainers) are fresh objects whose release is observed
(`weakref.finalize`), so "at most two chunks of decoded images are alive" is an exact count, not a
noisy memory reading (reference counting frees an image when its chunk is let go; no collector
run is awaited). A run that gathered its inputs first (as `camrt eval` did) keeps all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from camrt.batch import ExplainRun, SpooledPaths, iter_inputs
from camrt.errors import InputError, UsageError
from camrt.explainer import Explainer
from camrt.targets import TopKRequest
from tests.helpers import random_image, write_image

REPO = Path(__file__).resolve().parents[2]


class LiveImages:
    """Makes images and counts how many of them are still referenced (the most at any time)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.alive, self.most, self.made = rng, 0, 0, 0

    def _released(self) -> None:
        self.alive -= 1

    def make(self) -> np.ndarray:
        image = random_image(self.rng, 14, 18)
        weakref.finalize(image, self._released)
        self.alive += 1
        self.made += 1
        self.most = max(self.most, self.alive)
        return image


def _pull_counted(items: Iterator, pulled: list[int]) -> Iterator:
    for item in items:
        pulled.append(1)
        yield item


def test_eval_holds_two_chunks_of_images_and_one_explainer(tiny, rng, monkeypatch):
    """48 inputs, 4 per chunk, 2 methods: each method reads the inputs afresh; while chunk c+1 is
    read, chunk c is still bound (the caller's loop variable), so at most 2 x 4 images are alive
    (before streaming: all 48), and one method's Explainer at a time. One record per input and
    method, methods outermost; the summary is the mean of the records' fields."""
    from camrt.batch.evaluation import Evaluation

    images, explainers = LiveImages(rng), LiveImages(rng)
    make_explainer = Evaluation._explainer

    def counted_explainer(self, method):
        explainer = make_explainer(self, method)
        weakref.finalize(explainer, explainers._released)
        explainers.alive += 1
        explainers.most = max(explainers.most, explainers.alive)
        return explainer

    monkeypatch.setattr(Evaluation, "_explainer", counted_explainer)

    def inputs():
        return ((f"img{i}.png", images.make() if i % 7 else InputError(f"cannot read img{i}.png")) for i in range(48))

    evaluation = Evaluation(tiny.path, ["gradcam", "saliency"], ["deletion", "confidence"],
                            metric_options={"deletion": {"steps": 3}}, images_per_batch=4, device="cpu")
    try:
        records = list(evaluation.run(inputs))
        with pytest.raises(UsageError, match="an iterator can be read only once: give a list, or a function"):
            next(evaluation.run(inputs()))
    finally:
        evaluation.close()
    assert images.made == 2 * 41 and images.most <= 8, images.most
    assert explainers.most == 1
    assert [(r["input"], r["method"]) for r in records] == [
        (f"img{i}.png", method) for method in ("gradcam", "saliency") for i in range(48)]
    assert [r["input"] for r in records if r["status"] != "ok"] == 2 * [f"img{i}.png" for i in range(0, 48, 7)]
    summary = evaluation.summary()
    for method in ("gradcam", "saliency"):
        ok = [r for r in records if r["method"] == method and r["status"] == "ok"]
        assert summary[method]["images"] == len(ok) == 41
        for field in ("deletion_auc", "average_drop", "confidence_change"):
            assert summary[method][field] == pytest.approx(np.mean([r[field] for r in ok]), rel=1e-12)


def test_eval_command_streams_its_inputs_from_stdin(tiny, rng, tmp_path, monkeypatch):
    """`camrt eval` over 40 paths on stdin with 2 methods (the decoder stubbed with counted images):
    the paths are read once and replayed for the second method, at most two chunks of decoded
    images are alive, one record per input and method, an unreadable input an error record."""
    from camrt.cli import build_cli
    from camrt.imaging import decode

    images = LiveImages(rng)

    def load_image(path):
        if path.endswith("13.png"):
            raise InputError(f"{path}: not an image")
        return images.make()

    monkeypatch.setattr(decode, "load_image", load_image)
    paths = [f"img{i:02d}.png" for i in range(40)]
    result = CliRunner().invoke(build_cli(), ["eval", tiny.path, "-", "-m", "gradcam,saliency", "--metric",
                                              "confidence", "--images-per-batch", "5", "--device", "cpu",
                                              "-o", str(tmp_path)], input="\n".join(paths) + "\n")
    assert result.exit_code == 1, result.output  # one input failed
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["method"], r["input"]) for r in records] == [(m, p) for m in ("gradcam", "saliency") for p in paths]
    assert [r["input"] for r in records if r["status"] == "error"] == ["img13.png"] * 2
    assert images.made == 2 * 39 and images.most <= 10, images.most
    logged = [json.loads(line) for line in (tmp_path / "eval-records.jsonl").read_text().splitlines()]
    assert logged == records


def test_eval_figures_of_every_method_across_chunks(tiny, rng, tmp_path):
    """--plot with 2 methods over 3 chunks: each readable image's figures show both methods, drawn
    as plot_curves / plot_overlays draw the curves of the records and the Explainers' heatmaps."""
    from camrt.cli import build_cli
    from camrt.metrics.plot import plot_curves, plot_overlays

    arrays = [random_image(rng, 12 + i, 16) for i in range(5)]
    paths = [write_image(str(tmp_path / f"p{i}.png"), image) for i, image in enumerate(arrays)]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(build_cli(), [
        "eval", tiny.path, *paths[:2], str(tmp_path / "bad.png"), *paths[2:], "-m", "gradcam,saliency", "--metric",
        "deletion,insertion", "-P", "deletion.steps=3", "-P", "insertion.steps=3", "--images-per-batch", "2",
        "--device", "cpu", "-o", str(out), "--plot"])
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"p{i}.{kind}.png" for i in range(5)
                                                               for kind in ("curves", "methods"))
    for i, (path, image) in enumerate(zip(paths, arrays)):
        mine = {r["method"]: r for r in records if r["input"] == path}
        curves = {m: {kind: (r[f"{kind}_curve"]["fraction"], r[f"{kind}_curve"]["score"])
                      for kind in ("deletion", "insertion")} for m, r in mine.items()}
        plot_curves(str(tmp_path / "curves.png"), curves, title=f"p{i}")
        maps = {}
        for method in ("gradcam", "saliency"):
            explainer = Explainer(tiny.path, method=method, device="cpu")
            maps[method] = explainer.explain(explainer.prepare([image])[0])[0].heatmap
        plot_overlays(str(tmp_path / "methods.png"), image, maps, title=f"p{i}")
        for kind in ("curves", "methods"):
            np.testing.assert_array_equal(cv2.imread(str(out / f"p{i}.{kind}.png")),
                                          cv2.imread(str(tmp_path / f"{kind}.png")))


def test_eval_a_metric_failing_for_one_image_costs_only_that_metric_of_that_image(tiny, rng, monkeypatch):
    """Deletion raises InputError (as a model's NaN does) whenever image "bad" is in its batch: that
    image's deletion is None with the reason in ``metric_errors``, its confidence stands, and every
    other image's results equal those of an evaluation without it."""
    from camrt.batch.evaluation import Evaluation
    from camrt.metrics.deletion import DeletionAUC

    original = DeletionAUC.evaluate

    def failing(self, batch):
        if "bad" in batch.names:
            raise InputError("the model produced NaN or inf (row 0: camrt/logits)")
        return original(self, batch)

    images = {name: random_image(rng, 14, 18) for name in ("a", "bad", "b", "c")}
    runs = []
    for names, patched in ((list(images), True), (["a", "b", "c"], False)):
        if patched:
            monkeypatch.setattr(DeletionAUC, "evaluate", failing)
        evaluation = Evaluation(tiny.path, ["gradcam"], ["deletion", "confidence"],
                                metric_options={"deletion": {"steps": 3}}, images_per_batch=4, device="cpu")
        try:
            runs.append({r["input"]: r for r in evaluation.run([(n, images[n]) for n in names])})
        finally:
            evaluation.close()
        monkeypatch.setattr(DeletionAUC, "evaluate", original)
    evaluated, without = runs
    bad = evaluated["bad"]
    assert bad["status"] == "ok" and bad["deletion_auc"] is None and bad["average_drop"] is not None
    assert bad["metric_errors"] == {"deletion": "the model produced NaN or inf (row 0: camrt/logits)"}
    for name in ("a", "b", "c"):
        assert "metric_errors" not in evaluated[name]
        for field in ("deletion_auc", "average_drop", "score"):
            assert evaluated[name][field] == pytest.approx(without[name][field], rel=1e-6), (name, field)


def test_spooled_paths_replay_what_the_first_pass_read():
    pulled: list[int] = []
    names = ["a.png", "dir with space/ü.jpg", "new\nline.png"]
    with SpooledPaths(_pull_counted(iter(names), pulled)) as paths:
        first = iter(paths)
        assert next(first) == "a.png" and len(pulled) == 1  # lazily
        assert list(first) == names[1:]
        assert list(paths) == names and list(paths) == names and len(pulled) == 3


def test_randomization_builds_its_stage_files_once_per_method(tiny, rng, monkeypatch):
    """The randomized Explainers are made once per method and stage, not again for every chunk."""
    from camrt.batch.evaluation import Evaluation

    made = []
    original = Evaluation._reexplainer

    def counting(self, explainer):
        make = original(self, explainer)
        return lambda path: made.append((explainer.method.name, os.path.basename(path))) or make(path)

    monkeypatch.setattr(Evaluation, "_reexplainer", counting)
    evaluation = Evaluation(tiny.path, ["gradcam", "saliency"], ["randomization"],
                            metric_options={"randomization": {"stages": 2}}, images_per_batch=2, device="cpu")
    try:
        records = list(evaluation.run([(f"img{i}", random_image(rng, 12, 16)) for i in range(6)]))
    finally:
        evaluation.close()
    assert len(records) == 12 and all(r["randomization_spearman"] is not None for r in records)
    assert sorted(made) == sorted((method, f"randomized-{depth}.onnx") for method in ("gradcam", "saliency")
                                  for depth in (1, 2))


def test_explain_run_pulls_inputs_one_chunk_at_a_time(tiny, rng, tmp_path):
    images = [write_image(str(tmp_path / f"in{i}.png"), random_image(rng, 12, 16)) for i in range(7)]
    pulled: list[int] = []
    run = ExplainRun(Explainer(tiny.path, device="cpu"))
    chunks = run.run(_pull_counted(iter(images), pulled), batch_size=3)
    first = next(chunks)
    assert len(first) == 3 and len(pulled) == 3  # nothing read ahead of the chunk
    assert [len(chunk) for chunk in chunks] == [3, 1] and len(pulled) == 7


def test_explain_images_equals_explaining_the_files(tiny, rng, tmp_path):
    """Decoded images (as a data-parallel framework hands them over) give the records and heatmaps
    that the same images read from lossless files give, and those heatmaps are the Explainer's."""
    from camrt.plugins.registry import build_renderer_registry

    explainer = Explainer(tiny.path, device="cpu")
    npy = build_renderer_registry().get("npy")
    arrays = [random_image(rng, 12 + i, 16) for i in range(3)]
    paths = [write_image(str(tmp_path / f"p{i}.png"), image) for i, image in enumerate(arrays)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    from_files = ExplainRun(explainer, TopKRequest(2), [npy], str(tmp_path / "a")).explain_chunk(
        [*paths, str(tmp_path / "missing.png")])
    from_arrays = ExplainRun(explainer, TopKRequest(2), [npy], str(tmp_path / "b")).explain_images(
        [*zip(paths, arrays), (str(tmp_path / "missing.png"), InputError("missing.png: no such file"))])

    def comparable(record):
        return {k: v for k, v in record.items() if k not in ("elapsed_ms", "heatmap", "outputs", "error")}

    assert [comparable(r) for r in from_files] == [comparable(r) for r in from_arrays]
    assert [r["status"] for r in from_arrays] == ["ok"] * 6 + ["error"]
    assert "missing.png" in from_files[-1]["error"] and "missing.png" in from_arrays[-1]["error"]
    expected = explainer.explain_top_k(arrays, 2)
    for k, record in enumerate(from_arrays[:6]):
        result = expected[k // 2][k % 2]
        assert record["rank"] == k % 2 + 1 and record["target"] == result.target
        np.testing.assert_array_equal(np.load(record["heatmap"]), result.heatmap)
        np.testing.assert_array_equal(np.load(from_files[k]["heatmap"]), result.heatmap)
    # records only, each with its heatmap (an error record with None)
    paired = ExplainRun(explainer, TopKRequest(2)).explain_images_with_heatmaps(
        [*zip(paths, arrays), ("missing.png", InputError("missing.png: no such file")),
         ("gray.png", np.zeros((8, 8), np.uint8))])
    assert [comparable(r) for r, _ in paired[:6]] == [comparable(r) for r in from_arrays[:6]]
    assert [(r["status"], h) for r, h in paired[6:]] == [("error", None), ("error", None)]
    assert paired[7][0]["error"] == "gray.png: expected an HWC uint8 RGB array, got uint8 (8, 8)"
    for k, (record, heatmap) in enumerate(paired[:6]):
        assert record["heatmap"] is None and record["outputs"] == {}
        np.testing.assert_array_equal(heatmap, expected[k // 2][k % 2].heatmap)


def test_iter_inputs_is_lazy_and_warns_through_the_callback(tmp_path):
    (tmp_path / "d").mkdir()
    write_image(str(tmp_path / "d" / "x.png"), np.zeros((4, 4, 3), np.uint8))
    warnings: list[str] = []
    found = iter_inputs([str(tmp_path / "d"), str(tmp_path / "none-*.png")], warn=warnings.append)
    assert next(found) == str(tmp_path / "d" / "x.png") and warnings == []
    assert list(found) == [] and warnings == [f"no files match {tmp_path / 'none-*.png'}"]


def test_docs_python_examples_run(tiny, rng, tmp_path, monkeypatch, capsys):
    """The examples of "Using the batch engine from Python" (docs/pipelines.md) run as printed: the
    first explains photos/ (top-2) into out/ and, run again, resumes (the log appended to, every
    explained input's records skipped, the unreadable one tried again); the second explains an
    in-memory frame, as the Explainer does. evaluation.md's Python example runs on the same photos."""
    text = (REPO / "docs" / "pipelines.md").read_text()
    section = text[text.index("## Using the batch engine from Python"):]
    blocks = [block.split("```")[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "sub/c.png"):
        write_image(str(tmp_path / "photos" / name), random_image(rng, 20, 24))
    (tmp_path / "photos" / "broken.png").write_bytes(b"not an image")
    os.symlink(tiny.path, tmp_path / "model.camrt.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "pipelines.md", "exec"), {})  # noqa: S102 - our own docs
    log = (tmp_path / "out" / "records.jsonl").read_text()
    records = [json.loads(line) for line in log.splitlines()]
    assert [(r["input"], r.get("rank")) for r in records] == [
        ("photos/a.png", 1), ("photos/a.png", 2), ("photos/broken.png", None),
        ("photos/sub/b.jpg", 1), ("photos/sub/b.jpg", 2), ("photos/sub/c.png", 1), ("photos/sub/c.png", 2)]
    assert "photos/broken.png" in capsys.readouterr().out
    ok = [r for r in records if r["status"] == "ok"]
    assert all(os.path.isfile(r["heatmap"]) and os.path.isfile(r["overlay"]) for r in ok)
    exec(compile(blocks[0], "pipelines.md", "exec"), {})  # noqa: S102 - resumes
    again = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert again[:len(records)] == records
    assert [r.get("skipped") for r in again[len(records):]] == [True, True, None, True, True, True, True]
    assert "photos/broken.png" in capsys.readouterr().out  # a failed input is tried again
    exec(compile(blocks[1], "pipelines.md", "exec"), {})  # noqa: S102
    target, score = capsys.readouterr().out.split()
    frame_result = Explainer(tiny.path, device="cpu").explain([np.zeros((48, 64, 3), np.uint8)])[0]
    assert int(target) == frame_result.target and float(score) == pytest.approx(frame_result.score)
    # and evaluation.md's: Evaluation over photos/ (3 readable images), two methods
    text = (REPO / "docs" / "evaluation.md").read_text()
    block = next(b.split("```")[0] for b in text.split("```python\n")[1:] if "SpooledPaths" in b)
    namespace: dict = {}
    exec(compile(block, "evaluation.md", "exec"), namespace)  # noqa: S102
    summary = namespace["evaluation"].summary()
    assert [summary[m]["images"] for m in ("gradcam", "saliency")] == [3, 3]


def test_library_modules_load_no_cli():
    """The batch engine, the evaluation and the plugin machinery (registries built, so every
    built-in plugin is imported) load neither camrt.cli nor click."""
    probe = ("import sys\n"
             "import camrt.batch, camrt.batch.evaluation\n"
             "from camrt.plugins.registry import build_method_registry, build_metric_registry, build_renderer_registry\n"
             "build_method_registry(); build_metric_registry(); build_renderer_registry()\n"
             "print(sorted(m for m in sys.modules if m == 'click' or m.startswith(('click.', 'camrt.cli'))))")
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env=dict(os.environ, CAMRT_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert output.stdout.strip() == "[]"
