"""Attention rollout.

Abnar, Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020 (arXiv:2005.00928), sec. 3:
the residual connection is modelled by adding the identity to each layer's attention,
A_l' = 0.5 W_att,l + 0.5 I, with the rows re-normalised to sum to 1, and the attention of the output
to the input tokens is the product over layers, from the input up:

    Ã(l_i) = A_i' Ã(l_{i-1}),   Ã(l_1) = A_1'        (eq. 1)

W_att is the attention of one layer with its heads fused (the paper averages them; option
head_fusion takes their max or min instead, as jacobgil's vit-explain offers). The map is the
class token's row of Ã(l_L) over the patch tokens, on the patch grid (`camrt.methods.attention`).

Option discard_ratio (vit-explain's, not in the paper): before adding the identity, the lowest
discard_ratio fraction of each sample's fused attention entries are set to 0, except the class
token's attention to itself. camrt re-normalises rows as the paper says (vit-explain divides by the
column sums, ``a / a.sum(dim=-1)``, which broadcasts along the wrong axis) and discards per sample
(vit-explain only in the first sample of a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import contract
from ..hookspecs import hookimpl
from .attention import HEAD_FUSIONS, AttentionMethod, attention_stack, class_token_row, fuse_heads
from .base import GraphOutputs, Requirements


def discard_lowest(fused: np.ndarray, ratio: float, keep: int | None) -> np.ndarray:
    """[B, T, T] with the lowest `ratio` of each sample's entries set to 0, except entry (keep, keep)."""
    batch, tokens = fused.shape[:2]
    flat = fused.reshape(batch, -1).copy()
    count = int(flat.shape[1] * ratio)
    lowest = np.argsort(flat, axis=1, kind="stable")[:, :count]
    for row, indices in zip(flat, lowest):
        row[indices[indices != (keep * tokens + keep if keep is not None else -1)]] = 0.0
    return flat.reshape(fused.shape)


def rollout(maps: list[np.ndarray], head_fusion: str = "mean", discard_ratio: float = 0.0,
            keep: int | None = None) -> np.ndarray:
    """Eq. 1 over attention maps [B, heads, T, T] (input to output) -> [B, T, T]."""
    result = None
    for attention in maps:
        fused = fuse_heads(attention, head_fusion)
        if discard_ratio > 0:
            fused = discard_lowest(fused, discard_ratio, keep)
        with_residual = 0.5 * fused + 0.5 * np.eye(fused.shape[-1])
        with_residual /= with_residual.sum(axis=-1, keepdims=True)
        result = with_residual if result is None else with_residual @ result
    return result


class AttentionRollout(AttentionMethod):
    """Attention rollout: the product over layers of the head-fused attention plus identity, class-token row (Abnar & Zuidema 2020)."""

    name = "attention-rollout"
    aliases = ("rollout",)
    requires = Requirements(attention=True)

    @dataclass(frozen=True)
    class Options:
        """head_fusion: mean (the paper), max or min over heads; discard_ratio: the fraction of the
        lowest fused attention entries set to 0 in each layer (vit-explain's; 0 = the paper)."""

        head_fusion: str = "mean"
        discard_ratio: float = 0.0

        def __post_init__(self):
            if self.head_fusion not in HEAD_FUSIONS:
                raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {self.head_fusion!r}")
            if not 0.0 <= self.discard_ratio < 1.0:
                raise ValueError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")

    def relevance_map(self, outputs: GraphOutputs, attention: contract.Attention) -> np.ndarray:
        tokens = attention.tokens
        keep = tokens.extra_tokens[0] if tokens.extra_tokens else None
        result = rollout(attention_stack(outputs, attention), self.options.head_fusion, self.options.discard_ratio,
                         keep)
        return class_token_row(result, tokens)


@hookimpl
def register_methods(register):
    register(AttentionRollout)
