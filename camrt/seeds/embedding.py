"""Embedding seeds: L = cosine similarity between the explained embedding and a concept embedding.

As pytorch-grad-cam's `SimilarityToConceptTarget(features)`: cos(output, features) over the
embedding axis. The seed is d cos / d e = c / (|e| |c|) - (e . c) e / (|e|^3 |c|).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .batch import SeedBatch


def cosine_similarity(embeddings: np.ndarray, concept: np.ndarray) -> np.ndarray:
    """cos(e_b, c) per row of embeddings [B, D] (concept [D] or [B, D]), in float64."""
    e, c = _checked(embeddings, concept)
    return (e * c).sum(axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(c, axis=1))


def similarity_seed(embeddings: np.ndarray, concept: np.ndarray) -> SeedBatch:
    """One seed row per image: the gradient of cos(e_b, concept) with respect to e_b."""
    e, c = _checked(embeddings, concept)
    e_norm = np.linalg.norm(e, axis=1, keepdims=True)
    c_norm = np.linalg.norm(c, axis=1, keepdims=True)
    dot = (e * c).sum(axis=1, keepdims=True)
    seed = c / (e_norm * c_norm) - dot * e / (e_norm ** 3 * c_norm)
    return SeedBatch.one_per_sample(seed.astype(np.asarray(embeddings).dtype))


def _checked(embeddings: np.ndarray, concept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise InputError(f"similarity targets need [batch, dim] embeddings, got shape {e.shape}")
    concept = np.asarray(concept, dtype=np.float64)
    if concept.ndim not in (1, 2) or concept.shape[-1] != e.shape[1] or concept.shape[:-1] not in ((), (1,), e.shape[:1]):
        raise InputError(f"the concept embedding has shape {concept.shape}; the model's embeddings are "
                         f"{e.shape} (give [dim] or [batch, dim])")
    c = np.broadcast_to(concept, e.shape)
    if not (np.linalg.norm(e, axis=1) > 0).all() or not (np.linalg.norm(c, axis=1) > 0).all():
        raise InputError("a zero embedding or concept vector has no cosine similarity")
    return e, c
