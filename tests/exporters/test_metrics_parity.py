"""camrt eval's metrics against the reference implementations, on the same maps and model.

resnet18 (fixed random weights, calibrated BatchNorm; layer4) is exported once; camrt's Grad-CAM
heatmaps of three of scikit-image's photographs (224x224, no resampling) are the maps every metric
scores, on both sides: torch runs the torch model, camrt runs the ONNX file in onnxruntime.
Scores are the logits of EfficientNet-Lite0's top-1 classes of the photographs (resnet18's random-weight
probabilities are all ~1e-3, too flat to compare anything).

- torchcam 0.5 ``ClassificationMetric`` (average drop, increase in confidence) and
  ``DeletionInsertionMetric`` (zeros baseline): per image, through an extractor stub that hands
  torchcam the same maps;
- pytorch-grad-cam 1.5.7 ``CamMultImageConfidenceChange`` and ``ROADMostRelevantFirstAverage`` /
  ``ROADLeastRelevantFirstAverage``, with pgc's imputation noise (``torch.randn_like``) replaced by
  the draws camrt makes, so both impute identical inputs.
Criterion: |camrt - reference| <= 1e-4 max(1, |reference|) (onnxruntime's and torch's float32 logits
differ by ~1e-6 relative); increase in confidence (a comparison) exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

from camrt import contract

from .models import load, photos
from .test_cam_methods_parity import TARGETS

torch = pytest.importorskip("torch")
pytest.importorskip("torchcam")
pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("scipy")

TOLERANCE = 1e-4


def close(ours, reference) -> bool:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return bool(np.all(np.abs(ours - reference) <= TOLERANCE * np.maximum(1.0, np.abs(reference))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(torch model, contract file's session, inputs [3, 3, 224, 224], camrt Grad-CAM heatmaps [3, 224, 224])."""
    from camrt import Explainer
    from camrt_exporters.export import export_torch, write_model

    model = load("resnet18")
    onnx_model, _ = export_torch(model, layers=["layer4"], rules=[contract.RULE_VANILLA])
    path = str(tmp_path_factory.mktemp("metrics") / "resnet18.camrt.onnx")
    write_model(onnx_model, path)
    x = photos()
    explainer = Explainer(path, "gradcam", device="cpu")
    heatmaps = np.stack([r.heatmap for r in explainer.explain(x, targets=TARGETS)])
    assert all(h.std() > 0.05 for h in heatmaps)  # non-degenerate maps
    return model, explainer.session, x, heatmaps


def _batch(session, x, heatmaps):
    """The metrics' view of the maps, targets TARGETS (the first len(x)), logit scores."""
    from camrt.execution.context import ExplainContext
    from camrt.metrics.base import EvalBatch

    targets = np.array(TARGETS[:len(x)])
    return EvalBatch(x, heatmaps, targets, ExplainContext(session, x, targets),
                     score="logit", batch_size=16)


class MapStub:
    """What torchcam's metrics need of a CAM extractor, handing out fixed maps."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def test_confidence_matches_torchcam_and_pytorch_grad_cam(setup):
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.metrics import ClassificationMetric

    from camrt.metrics.confidence import Confidence

    model, session, x, heatmaps = setup
    ours = Confidence().evaluate(_batch(session, x, heatmaps))
    stub = MapStub(model, None)
    metric = ClassificationMetric(stub)  # no logits_fn: the logits
    for i, target in enumerate(TARGETS):
        metric.reset()
        stub.maps = torch.from_numpy(heatmaps[i:i + 1])
        metric.update(torch.from_numpy(x[i:i + 1]), class_idx=[target])
        reference = metric.summary()
        print("average drop", ours[i]["average_drop"], reference["avg_drop"])
        assert close(ours[i]["average_drop"], reference["avg_drop"])
        assert ours[i]["increase_in_confidence"] == reference["conf_increase"]
    with torch.no_grad():
        change = CamMultImageConfidenceChange()(torch.from_numpy(x), heatmaps,
                                                [ClassifierOutputTarget(t) for t in TARGETS], model)
    print("confidence change", [r["confidence_change"] for r in ours], change)
    assert close([r["confidence_change"] for r in ours], change)
    assert np.abs(change).min() > 1e-2  # the comparison is not between zeros


def test_deletion_insertion_match_torchcam(setup):
    from torchcam.metrics import DeletionInsertionMetric

    from camrt.metrics.deletion import DeletionAUC, InsertionAUC

    model, session, x, heatmaps = setup
    x, heatmaps = x[:2], heatmaps[:2]
    batch = _batch(session, x, heatmaps)
    deletion = DeletionAUC(steps=5).evaluate(batch)
    insertion = InsertionAUC(steps=5, baseline="zeros").evaluate(batch)
    stub = MapStub(model, None)
    metric = DeletionInsertionMetric(stub, steps=5, batch_size=16)
    for i, target in enumerate(TARGETS[:2]):
        metric.reset()
        stub.maps = torch.from_numpy(heatmaps[i:i + 1])
        metric.update(torch.from_numpy(x[i:i + 1]), class_idx=[target])
        reference = metric.summary()
        print("deletion/insertion", deletion[i]["deletion_auc"], insertion[i]["insertion_auc"], reference)
        assert close(deletion[i]["deletion_auc"], reference["deletion_auc"])
        assert close(insertion[i]["insertion_auc"], reference["insertion_auc"])


def test_road_matches_pytorch_grad_cam_with_the_same_noise(setup, monkeypatch):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt.metrics.road import LERF, MORF, ROAD

    model, session, x, heatmaps = setup
    x, heatmaps, chosen = x[:1], heatmaps[:1], TARGETS[:1]  # pgc's imputation takes seconds per image
    percentiles = [30, 70]
    seed = 7
    ours = ROAD(percentiles=percentiles, seed=seed).evaluate(_batch(session, x, heatmaps))
    targets = [ClassifierOutputTarget(t) for t in chosen]
    for order, averager, field in ((MORF, ROADMostRelevantFirstAverage, "road_morf"),
                                   (LERF, ROADLeastRelevantFirstAverage, "road_lerf")):
        # pgc imputes percentile by percentile, image by image; camrt draws from rng((seed, p, order))
        keys = iter([p for p in percentiles for _ in chosen])

        def same_noise(tensor, keys=keys, order=order):
            draws = np.random.default_rng((seed, next(keys), order)).standard_normal(tuple(tensor.shape))
            return torch.from_numpy(draws.astype(np.float32))

        monkeypatch.setattr(torch, "randn_like", same_noise)
        with torch.no_grad():
            reference = averager(percentiles)(torch.from_numpy(x), heatmaps, targets, model)
        monkeypatch.undo()
        print(field, [r[field] for r in ours], reference)
        assert close([r[field] for r in ours], reference)
        assert np.abs(reference).min() > 1e-2
    for r in ours:
        assert r["road_combined"] == pytest.approx((r["road_lerf"] - r["road_morf"]) / 2)


def test_randomization_low_for_gradcam_high_for_an_edge_detector(setup, plugin):
    """Adebayo et al.'s cascading randomization on resnet18: Grad-CAM's maps decorrelate, an edge
    detector's (a test plugin that ignores the weights) stay identical."""
    from camrt.batch.evaluation import Evaluation

    from ..runtime.test_metrics import Sobel

    plugin(Sobel(), "test-sobel")
    _, session, x, _ = setup
    path = session.path
    images = [np.ascontiguousarray((x[i].transpose(1, 2, 0) * 50 + 120).clip(0, 255).astype(np.uint8)) for i in range(2)]
    evaluation = Evaluation(path, ["gradcam", "test-sobel"], ["randomization"],
                            metric_options={"randomization": {"stages": 1}}, device="cpu")
    try:
        records = list(evaluation.run([(f"photo{i}", image) for i, image in enumerate(images)]))
    finally:
        evaluation.close()
    by_method = {m: [r["randomization_spearman"] for r in records if r["method"] == m] for m in ("gradcam", "test-sobel")}
    print(by_method, [r["randomization_cascade"] for r in records if r["method"] == "gradcam"])
    assert all(rho is not None and rho < 0.5 for rho in by_method["gradcam"])
    assert all(rho == pytest.approx(1.0, abs=1e-9) for rho in by_method["test-sobel"])
