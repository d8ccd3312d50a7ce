"""`camrt.targets`: requests (--target N, top1, topk:K) become per-rank targets, and targets become
the graph's ``camrt/target`` feed; checked against the numpy forward pass of the tiny model (the
ranking) and CAM's closed form on its GAP + linear head (the heatmaps)."""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract, postprocess
from camrt.errors import InputError, UsageError
from camrt.explainer import Explainer
from camrt.imaging.preprocess import preprocess
from camrt.target_parsing import parse_target
from camrt.targets import ClassRequest, ClassTarget, TopKRequest, as_target
from tests.helpers import CLASSES, HEIGHT, WIDTH, numpy_forward, random_image


@pytest.mark.parametrize(("text", "request_", "ranks"), [
    ("top1", ClassRequest(-1), [None]), ("Top-1", ClassRequest(-1), [None]), ("-1", ClassRequest(-1), [None]),
    ("3", ClassRequest(3), [None]), (" topk:2 ", TopKRequest(2), [1, 2]),
])
def test_parse_target(text, request_, ranks):
    assert parse_target(text) == request_ and parse_target(text).ranks == ranks


@pytest.mark.parametrize(("request_", "largest", "given"), [
    (ClassRequest(CLASSES), ClassRequest(CLASSES - 1), "5"), (TopKRequest(CLASSES + 1), TopKRequest(CLASSES), "topk:6"),
])
def test_requests_a_file_cannot_serve(request_, largest, given):
    largest.check(CLASSES, "m.onnx")
    ClassRequest(-1).check(CLASSES, "m.onnx")
    with pytest.raises(UsageError, match=rf"^--target {given} is out of range: m.onnx has 5 classes \(0\.\.4\)$"):
        request_.check(CLASSES, "m.onnx")


def test_class_target_feeds_and_rows():
    feed = ClassTarget(2).feeds(3, CLASSES)
    assert list(feed) == [contract.TARGET_INPUT] and feed[contract.TARGET_INPUT].dtype == np.int64
    assert feed[contract.TARGET_INPUT].tolist() == [2, 2, 2]
    per_row = as_target([4, None, 0])
    assert per_row.feeds(3, CLASSES)[contract.TARGET_INPUT].tolist() == [4, -1, 0]
    assert per_row.select([2, 0]).feeds(2, CLASSES)[contract.TARGET_INPUT].tolist() == [0, 4]
    assert ClassTarget(2).select([1]).feeds(1, CLASSES)[contract.TARGET_INPUT].tolist() == [2]
    assert as_target(None).feeds(2, CLASSES)[contract.TARGET_INPUT].tolist() == [-1, -1]
    with pytest.raises(InputError, match=r"target\(s\) \[5\] out of range"):
        as_target([0, 5]).feeds(2, CLASSES)


def test_the_session_takes_a_target_or_class_indices(tiny, rng):
    from camrt.execution.session import ExplainSession

    session = ExplainSession(tiny.path, device="cpu")
    x = rng.normal(size=(3, 3, HEIGHT, WIDTH)).astype(np.float32)
    fetch = [contract.TARGET_INDEX_OUTPUT, contract.gradient_output("feat")]
    by_target = session.run(x, ClassTarget((1, -1, 4)), fetch)
    by_indices = session.run(x, [1, -1, 4], fetch)
    for name in fetch:
        np.testing.assert_array_equal(by_target[name], by_indices[name])
    assert by_target[contract.TARGET_INDEX_OUTPUT].tolist() == [1, int(numpy_forward(tiny, x)["logits"][1].argmax()), 4]


def test_top_k_request_ranks_and_explains(tiny, rng):
    """Each rank r explains every image's r-th highest logit (the numpy forward pass ranks them);
    Grad-CAM on this GAP + linear head is CAM, sum_k W[c, k] A^k, up to a positive factor."""
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(3)]
    explained = Explainer(tiny.path, device="cpu").explain_request(images, TopKRequest(3))
    forward = numpy_forward(tiny, preprocess(images, tiny.preprocessing))
    order = np.argsort(-forward["logits"], axis=1)[:, :3]
    for i, ranked in enumerate(explained):
        assert [result.target for result in ranked] == order[i].tolist()
        for result in ranked:
            cam = np.einsum("k,khw->hw", tiny.w2[result.target].astype(np.float64), forward["feat"][i])
            np.testing.assert_allclose(result.heatmap, postprocess.finalize([cam], (HEIGHT, WIDTH)), atol=1e-5)
    top_k = Explainer(tiny.path, device="cpu").explain_top_k(images, 3)
    assert [[r.target for r in ranked] for ranked in top_k] == order.tolist()


@pytest.mark.parametrize("classes", [True, 1.0, "1", None])
def test_a_class_target_for_all_inputs_is_an_integer(classes):
    with pytest.raises(InputError, match=r"target\(s\) for a batch of 2|targets must be integers"):
        ClassTarget(classes).feeds(2, CLASSES)
