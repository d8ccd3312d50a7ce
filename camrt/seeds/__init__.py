"""Seeds: the cotangent dL/d score that a seeded camrt file differentiates (L = <seed, score>).

Plain numpy functions of the forward outputs, one module per kind of target:
`segmentation` (a class's logits summed over a region), `embedding` (cosine similarity to a concept
vector), `boxes` (IoU x class score of the candidates of a raw detection head matching a box).
Each returns a `SeedBatch`; `SeedBatch.stack` puts several targets of one image in one backward run.
"""

from .batch import SeedBatch

__all__ = ["SeedBatch"]
