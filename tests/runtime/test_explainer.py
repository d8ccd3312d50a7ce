"""Grad-CAM through the Explainer, against closed forms computed with numpy from the model's weights."""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
import pytest

from camrt import contract, postprocess
from camrt.errors import InputError, ModelError, UsageError
from camrt.explainer import Explainer
from camrt.imaging.preprocess import preprocess
from camrt.methods.base import GraphOutputs, Method, Requirements
from camrt.methods.gradcam import GradCAM
from tests.helpers import CLASSES, HEIGHT, LABELS, WIDTH, numpy_forward, random_image


def _cam(model, feat: np.ndarray, target: int) -> np.ndarray:
    """CAM (Zhou et al. 2016) on the GAP+FC head: sum_k W[c, k] A^k."""
    return np.einsum("k,khw->hw", model.w2[target].astype(np.float64), feat)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_gradcam_equals_cam_on_gap_fc_head(tiny, rng):
    """Grad-CAM = CAM / (h*w) on a GAP+FC head: the raw maps up to that factor, the heatmaps within 1e-5."""
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(4)]
    targets = [0, 3, -1, 4]
    explainer = Explainer(tiny.path, method="gradcam", device="cpu")
    x = preprocess(images, tiny.preprocessing)
    forward = numpy_forward(tiny, x)
    values = explainer.session.run(x, targets, explainer.fetch)
    raw = GradCAM().explain(GraphOutputs(values, x), layer="feat")
    h, w = forward["feat"].shape[2:]
    results = explainer.explain(images, targets)
    for i, result in enumerate(results):
        target = targets[i] if targets[i] >= 0 else int(forward["logits"][i].argmax())
        cam = _cam(tiny, forward["feat"][i], target)
        np.testing.assert_allclose(raw[i] * (h * w), cam, rtol=1e-4, atol=1e-5)
        # After ReLU and min-max (pytorch-grad-cam's epsilon 1e-7), Grad-CAM and CAM agree.
        positive = np.maximum(cam, 0) / (h * w)
        oracle = (positive - positive.min()) / (positive.max() - positive.min() + 1e-7)
        np.testing.assert_allclose(postprocess.normalize(np.maximum(raw[i], 0)), oracle, atol=1e-5)
        expected = postprocess.finalize([cam], (HEIGHT, WIDTH))  # postprocessing has its own oracles
        assert result.heatmap.shape == (HEIGHT, WIDTH)
        np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
        assert result.target == target
        assert result.label == LABELS[target]
        assert result.score == pytest.approx(forward["logits"][i, target], rel=1e-4, abs=1e-5)
        assert result.probability == pytest.approx(_softmax(forward["logits"][i])[target], rel=1e-4)
        assert result.layer == "feat" and result.method == "gradcam"


def test_top1_is_argmax_of_logits(tiny, rng):
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(6)]
    logits = numpy_forward(tiny, preprocess(images, tiny.preprocessing))["logits"]
    results = Explainer(tiny.path, device="cpu").explain(images)
    assert [r.target for r in results] == logits.argmax(axis=1).tolist()


def test_heatmap_at_original_resolution(tiny, rng):
    """An image of another size: the heatmap has its size and is the CAM of the resized input, upsampled."""
    image = random_image(rng, 45, 37)
    explainer = Explainer(tiny.path, device="cpu", layer="feat")
    result = explainer.explain([image], targets=[2])[0]
    feat = numpy_forward(tiny, preprocess([image], tiny.preprocessing))["feat"][0]
    expected = postprocess.finalize([_cam(tiny, feat, 2)], (45, 37))
    assert result.heatmap.shape == (45, 37) and result.heatmap.dtype == np.float32
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    assert result.heatmap.max() == pytest.approx(1.0, abs=1e-6) and result.heatmap.min() == 0.0


def test_nchw_input_gives_model_size_heatmaps(tiny, rng):
    x = rng.normal(size=(3, 3, HEIGHT, WIDTH)).astype(np.float32)
    results = Explainer(tiny.path, device="cpu").explain(x, targets=1)
    feat = numpy_forward(tiny, x)["feat"]
    for i, result in enumerate(results):
        assert result.target == 1
        expected = postprocess.finalize([_cam(tiny, feat[i], 1)], (HEIGHT, WIDTH))
        np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)


def test_multi_layer_fusion(tiny, rng):
    """Two layers: the mean of the per-layer heatmaps, renormalised; conv's gradient is W[c]/(hw) masked by ReLU."""
    image = random_image(rng, 20, 30)
    result = Explainer(tiny.path, device="cpu", layer=["feat", "conv"]).explain([image], [3])[0]
    forward = numpy_forward(tiny, preprocess([image], tiny.preprocessing))
    feat, conv = forward["feat"][0], forward["conv"][0]
    hw = feat.shape[1] * feat.shape[2]
    grad_conv = (tiny.w2[3][:, None, None] / hw) * (conv > 0)
    cam_conv = np.einsum("k,khw->hw", grad_conv.mean(axis=(1, 2)), conv)
    expected = postprocess.finalize([_cam(tiny, feat, 3) / hw, cam_conv], (20, 30))
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    assert result.layer == "feat,conv"


def test_concurrent_use_matches_sequential(tiny, rng):
    explainer = Explainer(tiny.path, device="cpu", threads=1)
    batches = [[random_image(rng, 10 + i, 14 + i) for _ in range(3)] for i in range(8)]
    expected = [[r.heatmap for r in explainer.explain(batch)] for batch in batches]
    got: dict[int, list[np.ndarray]] = {}

    def work(i):
        got[i] = [r.heatmap for r in explainer.explain(batches[i])]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, maps in enumerate(expected):
        for a, b in zip(maps, got[i]):
            np.testing.assert_array_equal(a, b)


def test_no_softmax_no_probability_no_labels(make_model, rng):
    model = make_model(labels=None, metadata_overrides={
        contract.META_SCORE: '{"tensor": "logits", "output": "probs", "softmax": false}'})
    result = Explainer(model.path, device="cpu").explain([random_image(rng, HEIGHT, WIDTH)])[0]
    assert result.probability is None and result.label is None
    assert result.record()["probability"] is None


def test_bad_images_and_targets(tiny):
    explainer = Explainer(tiny.path, device="cpu")
    with pytest.raises(InputError, match="HWC uint8 RGB"):
        explainer.explain([np.zeros((5, 5), np.uint8)])
    with pytest.raises(InputError, match="out of range"):
        explainer.explain([np.zeros((5, 5, 3), np.uint8)], targets=[CLASSES])
    with pytest.raises(InputError, match="no images"):
        explainer.explain([])


def test_unknown_layer_names_the_flag(tiny):
    with pytest.raises(ModelError, match=r"layer4.*it has: feat, conv.*--layer layer4"):
        Explainer(tiny.path, layer="layer4")


def test_file_without_layers_names_the_flag(make_model):
    model = make_model(layers=(), rule_sets=("vanilla",))
    with pytest.raises(ModelError, match=r"gradcam.*no layers.*--layer NAME"):
        Explainer(model.path)


class _GuidedSaliency(Method):
    """Test method: |guided input gradient|, max over channels."""

    name = "test-guided-saliency"
    requires: ClassVar[Requirements] = Requirements(input_gradient=contract.RULE_GUIDED)

    def explain(self, outputs, *, layer):
        return np.abs(outputs.input_gradient(contract.RULE_GUIDED)).max(axis=1)


def test_missing_input_gradient_names_the_rules_flag(make_model):
    model = make_model(rule_sets=("vanilla",))
    with pytest.raises(ModelError, match=r"test-guided-saliency.*camrt/input_grad/guided.*--rules vanilla,guided"):
        Explainer(model.path, method=_GuidedSaliency())


def test_input_gradient_method_and_layer_refusal(tiny, rng):
    image = random_image(rng, HEIGHT, WIDTH)
    explainer = Explainer(tiny.path, method=_GuidedSaliency(), device="cpu")
    assert explainer.layers == () and explainer.fetch[-1] == contract.input_gradient_output(contract.RULE_GUIDED)
    result = explainer.explain([image])[0]
    assert result.layer is None and result.heatmap.shape == (HEIGHT, WIDTH)
    with pytest.raises(UsageError, match="takes no layer"):
        Explainer(tiny.path, method=_GuidedSaliency(), layer="feat")


def test_unknown_method_options():
    with pytest.raises(UsageError, match=r"no option\(s\) alpha; valid options: eigen_smooth"):
        GradCAM(alpha=1)
    from camrt.methods.saliency import Saliency

    with pytest.raises(UsageError, match=r"no option\(s\) alpha.*takes no options"):
        Saliency(alpha=1)
