"""camrt eval's metrics without torch: closed forms on toy ONNX models, scipy's Spearman, the pointing
game's geometry, the randomized file's gradients against finite differences, the figures read back,
the registry and the command."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from camrt import contract
from camrt.errors import PluginError, UsageError
from camrt.execution.context import ExplainContext
from camrt.execution.session import ExplainSession
from camrt.hookspecs import hookimpl
from camrt.metrics.base import EvalBatch, Metric
from tests.helpers import TOY_HEIGHT, TOY_WIDTH, initializers, random_image, toy_model, write_image

H, W = TOY_HEIGHT, TOY_WIDTH


def _batch(session: ExplainSession, x: np.ndarray, heatmaps: np.ndarray, targets, **kwargs) -> EvalBatch:
    targets = np.asarray(targets, dtype=np.int64)
    return EvalBatch(x, heatmaps.astype(np.float32), targets, ExplainContext(session, x, targets), **kwargs)


def test_uniform_map_deletion_curve_is_linear_on_a_mean_model(tmp_path):
    """logit = mean of the pixels, image constant c, zeros baseline: deleting any k of N positions
    leaves c (N - k) / N, so the curve is the line c (1 - fraction) and the AUC is c / 2."""
    from camrt.metrics.deletion import DeletionAUC

    n = 3 * H * W
    path = toy_model("toy-mean", tmp_path)  # weights 1 / n, biases 0
    assert np.array_equal(initializers(path)["w"], np.full((2, n), 1 / n, np.float32))
    c = 0.8
    x = np.full((1, 3, H, W), c, np.float32)
    session = ExplainSession(path, device="cpu")
    (result,) = DeletionAUC(steps=7).evaluate(_batch(session, x, np.full((1, H, W), 0.5), [0], score="logit"))
    fractions = np.array(result["deletion_curve"]["fraction"])
    # ceil(48 / 7) = 7 positions per step: 0, 7, ..., 42, 48
    np.testing.assert_allclose(fractions, [*(np.arange(0, 48, 7) / 48), 1.0])
    np.testing.assert_allclose(result["deletion_curve"]["score"], c * (1 - fractions), rtol=1e-5, atol=1e-6)  # float32 weights 1/48
    assert result["deletion_auc"] == pytest.approx(c / 2, rel=1e-5)


@pytest.mark.parametrize("baseline", ["zeros", "mean"])
def test_deletion_and_insertion_curves_on_a_linear_model(tmp_path, baseline):
    """A uniform map ranks positions in raster order (a stable sort): after k positions the logit of
    class t is b_t + sum over positions p of w_t[:, p] . (x[:, p] if kept else baseline[:, p]),
    summed by hand with cumulative sums; the AUC is the trapezoidal rule over the fractions."""
    from camrt.metrics.deletion import DeletionAUC, InsertionAUC

    rng = np.random.default_rng(0)
    n = H * W
    path = toy_model("toy-linear", tmp_path)
    w, b = initializers(path)["w"], initializers(path)["b"]
    x = rng.normal(size=(2, 3, H, W)).astype(np.float32)
    session = ExplainSession(path, device="cpu")
    targets = [2, 0]
    batch = _batch(session, x, np.ones((2, H, W)), targets, score="logit", batch_size=5)
    deletion = DeletionAUC(steps=5, baseline=baseline).evaluate(batch)
    insertion = InsertionAUC(steps=5, baseline=baseline).evaluate(batch)
    counts = np.array([0, 10, 20, 30, 40, 48])
    for i, t in enumerate(targets):
        xi = x[i].reshape(3, n).astype(np.float64)
        base = np.zeros_like(xi) if baseline == "zeros" else np.repeat(xi.mean(axis=1, keepdims=True), n, 1)
        wt = w[t].reshape(3, n)
        gain = np.r_[0, np.cumsum((wt * (xi - base)).sum(axis=0))]  # sum over the first k positions
        full, empty = b[t] + (wt * xi).sum(), b[t] + (wt * base).sum()
        expected_deletion = full - gain[counts]
        expected_insertion = empty + gain[counts]
        np.testing.assert_allclose(deletion[i]["deletion_curve"]["score"], expected_deletion, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(insertion[i]["insertion_curve"]["score"], expected_insertion, rtol=1e-4, atol=1e-4)
        f = counts / 48
        area = ((expected_deletion[1:] + expected_deletion[:-1]) / 2 * np.diff(f)).sum()
        assert deletion[i]["deletion_auc"] == pytest.approx(area, rel=1e-4, abs=1e-4)


def test_blur_baseline_is_opencv_gaussian_of_each_channel():
    import cv2

    from camrt.metrics.deletion import CurveOptions, baseline_inputs

    x = np.random.default_rng(1).normal(size=(2, 3, 20, 24)).astype(np.float32)
    blurred = baseline_inputs(x, CurveOptions(baseline="blur", blur_kernel=5, blur_sigma=2.0))
    np.testing.assert_allclose(blurred[1, 2], cv2.GaussianBlur(x[1, 2], (5, 5), 2.0), rtol=1e-6)
    assert not np.allclose(blurred, x)


def test_spearman_matches_scipy_with_ties():
    import scipy.stats as scipy_stats

    from camrt.metrics.randomization import spearman

    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, (16, 16)).astype(np.float32)  # many ties
    b = a + rng.normal(0, 2, a.shape)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.ravel(), b.ravel()).statistic, rel=1e-10)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, np.zeros_like(a)) is None


def test_randomized_file_keeps_gradients_consistent(tmp_path):
    """After cascading randomization of every layer, the weights differ and the randomized file's
    input gradient equals central finite differences of its own forward pass (the derived backward
    constants were replaced too)."""
    import onnx
    from onnx import numpy_helper

    from camrt.metrics.randomization import Cascade

    path = toy_model("toy-convmm", tmp_path)
    cascade = Cascade(path)
    assert [n.op_type for n in cascade.layers] == ["MatMul", "Conv"]
    (randomized,) = cascade.write_stages([2], str(tmp_path), seed=0)
    before = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(randomized).graph.initializer}
    assert all(not np.array_equal(before[n], after[n]) for n in ("cw", "cb", "fw", "fb"))
    changed_derived = [n for n in before if n not in ("cw", "cb", "fw", "fb") and before[n].size in (162, 24)
                       and not np.array_equal(before[n], after[n])]
    assert len(changed_derived) == 2  # the flipped kernel and the transposed matrix

    session = ExplainSession(randomized, device="cpu")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, H, W)).astype(np.float32)
    grad_name = contract.input_gradient_output("vanilla")
    grad = session.run(x, [1], [grad_name])[grad_name].astype(np.float64)
    for _ in range(3):
        d = rng.normal(size=x.shape).astype(np.float32)
        eps = 1e-2
        logits = session.run(np.concatenate([x + eps * d, x - eps * d]), [1, 1], [contract.LOGITS_OUTPUT])[
            contract.LOGITS_OUTPUT].astype(np.float64)
        finite = (logits[0, 1] - logits[1, 1]) / (2 * eps)
        assert (grad * d).sum() == pytest.approx(finite, rel=2e-2, abs=1e-4)


def test_unknown_derived_transform_is_refused(tmp_path):
    """A backward-only constant that holds a weight's values in an order camrt cannot explain."""
    import onnx
    from onnx import numpy_helper

    from camrt.errors import ModelError
    from camrt.metrics.randomization import Cascade

    path = toy_model("toy-convmm", tmp_path)
    model = onnx.load(path)
    fw = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "fw")
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if init.name != "fw" and value.size == fw.size and np.array_equal(np.sort(value, None), np.sort(fw, None)):
            init.CopyFrom(numpy_helper.from_array(np.roll(value.ravel(), 1).reshape(value.shape), init.name))
    onnx.save(model, tmp_path / "odd.onnx")
    with pytest.raises(ModelError, match="unknown.*'fw'|'fw'.*transform"):
        Cascade(str(tmp_path / "odd.onnx")).write_stages([1], str(tmp_path), seed=0)


def test_a_constant_derived_from_a_weight_by_an_unknown_rule_is_refused_for_the_methods_reading_it(tmp_path):
    """A rule set that keeps a weight's positive part (LRP's z+) as a constant of the gradient graph: the
    randomized file would keep the original weights there. The cascade refuses it for the outputs that
    read it, naming the constant and the weight, and not for the outputs that do not."""
    import onnx
    from onnx import helper, numpy_helper

    from camrt.errors import ModelError
    from camrt.metrics.randomization import Cascade

    path = toy_model("toy-convmm", tmp_path)
    model = onnx.load(path)
    cw = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "cw")
    model.graph.initializer.append(numpy_helper.from_array(np.maximum(cw, 0), "positive_cw"))
    model.graph.node.append(helper.make_node("ReduceSum", ["positive_cw"], ["rule_output"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("rule_output", onnx.TensorProto.FLOAT, []))
    odd = str(tmp_path / "positive.onnx")
    onnx.save(model, odd)
    with pytest.raises(ModelError, match="reads 'positive_cw', shaped like the weights 'cw'.*cannot run for this method"):
        Cascade(odd, [contract.LOGITS_OUTPUT, "rule_output"]).write_stages([2], str(tmp_path), seed=0)
    gradient = contract.input_gradient_output("vanilla")
    (randomized,) = Cascade(odd, [contract.LOGITS_OUTPUT, gradient]).write_stages([2], str(tmp_path), seed=0)
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(randomized).graph.initializer}
    assert not np.array_equal(after["cw"], cw)


class Sobel:
    """An edge detector posing as a method: the Sobel gradient magnitude of the input (ignores weights)."""

    @staticmethod
    def method_class():
        import cv2

        from camrt.methods.base import Method

        class SobelEdges(Method):
            """Sobel edge magnitude of the input (a test plugin that ignores the model)."""

            name = "test-sobel"
            relu = False

            def explain(self, outputs, *, layer):
                gray = outputs.inputs.mean(axis=1)
                return np.stack([np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)) for g in gray])

        return SobelEdges

    @hookimpl
    def register_methods(self, register):
        register(self.method_class())


def test_randomization_cli_edge_detector_stays_gradcam_moves(tmp_path, plugin):
    """The edge detector's maps are identical after randomization (Spearman 1); Grad-CAM's are not."""
    from click.testing import CliRunner

    from camrt.cli import build_cli

    plugin(Sobel(), "test-sobel")
    path = toy_model("toy-convmm", tmp_path)
    rng = np.random.default_rng(2)
    images = [write_image(str(tmp_path / f"im{i}.png"), random_image(rng, H * 4, W * 4)) for i in range(2)]
    result = CliRunner().invoke(
        build_cli(), ["eval", path, *images, "-m", "test-sobel,gradcam", "--metric", "randomization",
                      "-P", "randomization.stages=2"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["method"], r["input"]) for r in records] == [(m, i) for m in ("test-sobel", "gradcam") for i in images]
    for r in records:
        assert [s["layers"] for s in r["randomization_cascade"]] == [1, 2]
        if r["method"] == "test-sobel":
            assert r["randomization_spearman"] == pytest.approx(1.0)
        else:
            assert r["randomization_spearman"] is None or r["randomization_spearman"] < 0.9
    assert "randomization_spearman" in result.stderr  # the summary table


def test_pointing_game_geometry_and_box_files(tmp_path):
    """Heatmap maximum at model pixel (row 2, col 5) of 6x8 -> image pixel centre ((5.5)*4-0.5,
    (2.5)*4-0.5) = (21.5, 9.5) in a 24x32 image; hits within `tolerance` of a box only."""
    from camrt.metrics.pointing import PointingGame, load_boxes, max_point

    heatmap = np.zeros((H, W), np.float32)
    heatmap[2, 5] = 1.0
    assert max_point(heatmap, (24, 32)) == (21.5, 9.5)
    (tmp_path / "b.json").write_text(json.dumps({
        "a.png": [[0, 0, 5, 5], {"box": [20, 8, 22, 10], "class": 7}],
        "dir/b.png": [[0, 0, 10, 9]],  # 21.5 - 10 = 11.5, 9.5 - 9 = 0.5: distance 11.51
    }))
    (tmp_path / "b.csv").write_text("image,x0,y0,x1,y1,class\na.png,20,8,22,10,cat\n")
    assert load_boxes(str(tmp_path / "b.csv"))["a.png"][0].label == "cat"

    class Labels:
        info = type("Info", (), {"labels": [f"l{i}" for i in range(7)] + ["cat"]})()

    def run(boxes, names, targets, tolerance=15.0):
        x = np.zeros((len(names), 3, H, W), np.float32)
        batch = EvalBatch(x, np.stack([heatmap] * len(names)), np.array(targets), None, names=names,
                          images=[np.zeros((24, 32, 3), np.uint8)] * len(names), explainer=Labels())
        return [r["pointing_game"] for r in PointingGame(boxes=boxes, tolerance=tolerance).evaluate(batch)]

    boxes = str(tmp_path / "b.json")
    assert run(boxes, ["a.png", "a.png", "other/dir/b.png", "dir/b.png"], [7, 3, 0, 0], tolerance=5) == [1.0, 0.0, None, 0.0]
    assert run(boxes, ["dir/b.png"], [0], tolerance=11.6) == [1.0]
    assert run(str(tmp_path / "b.csv"), ["a.png", "a.png"], [7, 3]) == [1.0, None]  # the class by label
    (tmp_path / "bad.csv").write_text("image,x0,y0\n")
    with pytest.raises(UsageError, match="lacks x1, y1"):
        load_boxes(str(tmp_path / "bad.csv"))


def test_curve_figure_pixels_are_where_the_values_say(tmp_path):
    import cv2

    from camrt.metrics.plot import PANEL_HEIGHT, PANEL_WIDTH, CurvePanel, colour, plot_curves, score_range

    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    curves = {"a": {"deletion": (fractions, [0.9, 0.6, 0.4, 0.2, 0.1]), "insertion": (fractions, [0.1, 0.5, 0.7, 0.8, 0.9])},
              "b": {"deletion": (fractions, [0.05, 0.1, 0.15, 0.25, 0.3])}}  # 8+ pixels from "a" at every point checked
    path = str(tmp_path / "curves.png")
    plot_curves(path, curves)
    image = cv2.imread(path)
    assert image.shape == (PANEL_HEIGHT, 2 * PANEL_WIDTH, 3)
    assert image.std() > 10  # not blank
    low, high = score_range(curves)
    for m, (name, per_kind) in enumerate(curves.items()):
        for k, kind in enumerate(("deletion", "insertion")):
            if kind not in per_kind:
                continue
            panel = CurvePanel(low, high, x0=k * PANEL_WIDTH)
            for f in (0.0, 0.125, 0.375, 0.625, 0.875, 1.0):  # vertices and points between them
                x, y = panel.pixel(f, np.interp(f, *per_kind[kind]))
                pixel = image[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).astype(int)
                assert (np.abs(pixel - colour(m)).sum(axis=1) < 60).any(), (name, kind, f)


def test_overlay_figure_has_one_tile_per_method(tmp_path):
    import cv2

    from camrt.metrics.plot import TILE, plot_overlays

    image = random_image(np.random.default_rng(0), 40, 60)
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (6, 1))
    plot_overlays(str(tmp_path / "o.png"), image, {"m1": ramp, "m2": ramp[:, ::-1]})
    read = cv2.imread(str(tmp_path / "o.png"))
    assert read.shape == (TILE + 22, 3 * TILE, 3)
    m1, m2 = read[22:, TILE:2 * TILE].astype(int), read[22:, 2 * TILE:].astype(int)
    # JET: the hot end is red (BGR channel 2 high, channel 0 low): right side for m1, left for m2
    assert m1[:, -20:, 2].mean() - m1[:, -20:, 0].mean() > m1[:, :20, 2].mean() - m1[:, :20, 0].mean() + 50
    assert m2[:, :20, 2].mean() - m2[:, :20, 0].mean() > m2[:, -20:, 2].mean() - m2[:, -20:, 0].mean() + 50


class _Dup(Metric):
    name = "dup"
    aliases = ("deletion-auc",)

    def evaluate(self, batch):
        return [{} for _ in range(len(batch))]


def test_metric_registry_duplicates_and_unknown_names(plugin):
    from camrt.plugins.registry import build_metric_registry

    registry = build_metric_registry()
    assert registry.plugin_of("road") == "camrt.metrics.road" and registry.get("Deletion-AUC").name == "deletion"
    with pytest.raises(PluginError, match=r"unknown metric 'nope'; registered metrics: confidence .*road"):
        registry.get("nope")

    class Plugin:
        @hookimpl
        def register_metrics(self, register):
            register(_Dup)

    plugin(Plugin(), "test-dup")
    registry = build_metric_registry()  # the clashing plugin is left out and recorded, the rest load
    assert re.search(r"'test-dup'.*'deletion-auc'.*'camrt.metrics.deletion'.*registered metrics",
                     registry.failures["test-dup"])
    assert registry.plugin_of("deletion") == "camrt.metrics.deletion"
    with pytest.raises(PluginError, match=r"unknown metric 'nope'.*failed to register: .*'test-dup'"):
        registry.get("nope")


def test_metric_options_are_checked():
    from camrt.metrics.deletion import DeletionAUC
    from camrt.metrics.road import ROAD

    assert ROAD(percentiles="20,40").options.percentiles == (20, 40)
    assert DeletionAUC(steps="7").options.steps == 7
    with pytest.raises(UsageError, match="metric 'deletion' has no option.*valid options: baseline"):
        DeletionAUC(step=3)
    with pytest.raises(UsageError, match="baseline must be one of zeros, blur, mean"):
        DeletionAUC(baseline="noise")
    with pytest.raises(UsageError, match="percentiles must be integers in 1..99"):
        ROAD(percentiles="0,50")


def test_eval_command_records_summary_files_and_bad_input(tiny, tmp_path):
    from click.testing import CliRunner

    from camrt.cli import build_cli

    rng = np.random.default_rng(4)
    good = write_image(str(tmp_path / "good.png"), random_image(rng, 24, 32))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "boxes.csv").write_text("image,x0,y0,x1,y1\ngood.png,0,0,31,23\n")  # the whole image: a hit
    out = tmp_path / "out"
    result = CliRunner().invoke(build_cli(), [
        "eval", tiny.path, good, str(tmp_path / "bad.png"), "-m", "gradcam,saliency", "--metric",
        "deletion,insertion,confidence", "-P", "deletion.steps=4", "-P", "insertion.steps=4", "-o", str(out), "--plot",
        "--boxes", str(tmp_path / "boxes.csv")])
    assert result.exit_code == 1, result.stderr  # one input could not be read
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["method"], r["status"]) for r in records] == [
        ("gradcam", "ok"), ("gradcam", "error"), ("saliency", "ok"), ("saliency", "error")]
    assert len(records[0]["deletion_curve"]["score"]) == 5 and records[0]["score_type"] == "probability"
    assert records[0]["pointing_game"] == 1.0  # --boxes adds the pointing game
    assert "bad.png" in records[1]["error"]
    summary = json.loads((out / "eval-summary.json").read_text())
    assert summary["gradcam"]["images"] == 1
    assert summary["gradcam"]["deletion_auc"] == pytest.approx(records[0]["deletion_auc"])
    assert (out / "good.curves.png").exists() and (out / "good.methods.png").exists()
    assert "deletion_auc" in result.stderr
    bad = CliRunner().invoke(build_cli(), ["eval", tiny.path, good, "--metric", "nope"])
    assert bad.exit_code == 2 and "registered metrics:" in bad.stderr
    # without onnxruntime's graph optimisations: the same scores, rounding apart
    plain = CliRunner().invoke(build_cli(), ["eval", tiny.path, good, "-m", "gradcam", "--metric", "deletion",
                                             "-P", "deletion.steps=4", "--graph-optimization", "none"])
    assert plain.exit_code == 0, plain.stderr
    assert json.loads(plain.stdout.splitlines()[0])["deletion_auc"] == pytest.approx(records[0]["deletion_auc"], rel=1e-5)
