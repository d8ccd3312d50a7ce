"""The seed builders (camrt.seeds) against central finite differences in float64 of the score they
differentiate, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest

from camrt.errors import InputError
from camrt.seeds import SeedBatch
from camrt.seeds.boxes import BoxTarget, box_score, box_seed
from camrt.seeds.embedding import cosine_similarity, similarity_seed
from camrt.seeds.segmentation import segmentation_seed


def _finite_difference(score, point: np.ndarray, step: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(point)
    for index in np.ndindex(point.shape):
        plus, minus = point.copy(), point.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (score(plus) - score(minus)) / (2 * step)
    return grad


def test_similarity_seed_is_the_gradient_of_the_cosine(rng):
    embeddings = rng.standard_normal((2, 6))
    concept = rng.standard_normal(6)
    seeds = similarity_seed(embeddings, concept)
    for b in range(2):
        expected = _finite_difference(lambda e: cosine_similarity(e[None], concept)[0], embeddings[b])
        np.testing.assert_allclose(seeds.values[b], expected, atol=1e-8)
    assert seeds.samples.tolist() == [0, 1]


def _head(rng, candidates: int = 40, classes: int = 3) -> np.ndarray:
    """A raw head [1, 4 + C, N]: boxes around (30, 30) of size about 20, scores in (0, 1)."""
    boxes = np.stack([30 + 4 * rng.standard_normal(candidates), 30 + 4 * rng.standard_normal(candidates),
                      20 + 3 * rng.standard_normal(candidates), 20 + 3 * rng.standard_normal(candidates)])
    return np.concatenate([boxes, rng.uniform(0.05, 0.95, (classes, candidates))])[None]


@pytest.mark.parametrize("box_format", ["cxcywh", "xyxy"])
def test_box_seed_is_the_gradient_of_the_box_score(rng, box_format):
    head = _head(rng)
    if box_format == "xyxy":
        cx, cy, w, h = head[0, :4]
        head[0, :4] = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    target = BoxTarget(0, (20.3, 19.7, 40.1, 40.2), 1)
    seeds = box_seed(head, [target, BoxTarget(0, target.box, None)], box_format=box_format)
    for row, t in enumerate([target, BoxTarget(0, target.box, None)]):
        expected = _finite_difference(lambda h: box_score(h, t, box_format=box_format), head)
        assert np.count_nonzero(expected[0, 4:]) >= 3  # several candidates matched
        np.testing.assert_allclose(seeds.values[row], expected[0], atol=1e-6)
    assert seeds.samples.tolist() == [0, 0]


def test_box_seed_with_a_constant_iou_leaves_the_boxes_alone(rng):
    head = _head(rng)
    target = BoxTarget(0, (20.3, 19.7, 40.1, 40.2), 1)
    seed = box_seed(head, [target], iou_constant=True).values[0]
    assert not seed[:4].any() and seed[4:].any()
    np.testing.assert_allclose(seed[4:], box_seed(head, [target]).values[0, 4:])


def test_segmentation_seed_places_the_region_in_the_class_channel(rng):
    logits = rng.standard_normal((2, 4, 5, 6))
    seeds = segmentation_seed(logits, [1, 3])
    for b, c in enumerate([1, 3]):
        expected = np.zeros((4, 5, 6))
        expected[c] = logits[b].argmax(0) == c
        np.testing.assert_array_equal(seeds.values[b], expected)
    mask = rng.uniform(size=(5, 6))
    np.testing.assert_allclose(segmentation_seed(logits, 2, mask).values[:, 2], np.stack([mask, mask]), rtol=1e-6)


def test_refusals(rng):
    logits = np.zeros((1, 3, 4, 4))
    logits[:, 0] = 1
    with pytest.raises(InputError, match="image 0: segmentation class 2 is the argmax at no pixel"):
        segmentation_seed(logits, 2)
    with pytest.raises(InputError, match="region mask of shape"):
        segmentation_seed(logits, 0, np.ones((3, 3)))
    with pytest.raises(InputError, match="concept embedding has shape"):
        similarity_seed(rng.standard_normal((2, 6)), np.ones(5))
    with pytest.raises(InputError, match="no candidate has IoU > 0.5"):
        box_seed(_head(rng), [BoxTarget(0, (100, 100, 120, 120), 0)])
    with pytest.raises(InputError, match="3 sample indices for 2 seed rows"):
        SeedBatch(np.ones((2, 3)), np.arange(3))
