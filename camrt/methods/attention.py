"""What the attention-map methods share (attention rollout, gradient-weighted rollout, LeGrad).

A file exported with ``camrt export --attention`` carries, for every attention map l (a Softmax
output [B, heads, T, T], input to output), the probabilities ``camrt/attn/<map>``, their gradient
``camrt/attn_grad/<map>`` and the token sequence they attend over (metadata ``camrt.attention``:
the patch grid (h, w) and the positions of the extra tokens; `camrt.contract.Attention`). These
methods read a relevance row over the T tokens and show its patch tokens as an [h, w] map.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import numpy as np

from .. import contract
from ..errors import ModelError, PluginError
from .base import GraphOutputs, Method

#: How heads are fused (`--head-fusion`; jacobgil's vit-explain offers the same three).
HEAD_FUSIONS = ("mean", "max", "min")


def file_attention(outputs: GraphOutputs, method: str) -> contract.Attention:
    """The attention metadata of the file `outputs` came from (through the Explainer's context)."""
    info = getattr(getattr(outputs.context, "session", None), "info", None)
    if info is None:
        raise PluginError(f"method {method!r} reads the file's attention metadata; it needs "
                          "GraphOutputs(..., context=ExplainContext(...)) (the Explainer gives one)")
    if info.attention is None:
        raise ModelError(f"method {method!r} needs attention maps; re-export the file with `camrt export ... --attention`")
    return info.attention


def attention_stack(outputs: GraphOutputs, attention: contract.Attention,
                    output: Callable[[str], str] = contract.attention_output) -> list[np.ndarray]:
    """The fetched [B, heads, T, T] tensors `output(map)` of every map, input to output, in float64;
    ModelError when one is not square over the file's T tokens."""
    tokens = len(attention.tokens.extra_tokens) + attention.tokens.grid[0] * attention.tokens.grid[1]
    stack = []
    for name in attention.maps:
        value = outputs.get(output(name))
        if value.ndim != 4 or value.shape[2:] != (tokens, tokens):
            raise ModelError(f"output {output(name)!r} has shape {value.shape}; expected [B, heads, {tokens}, {tokens}] "
                             f"(the file's {tokens} tokens)")
        stack.append(value.astype(np.float64))
    return stack


def fuse_heads(maps: np.ndarray, fusion: str) -> np.ndarray:
    """[B, heads, T, T] -> [B, T, T]: the mean, max or min over heads."""
    return getattr(maps, fusion)(axis=1)


def patch_map(rows: np.ndarray, tokens: contract.LayerLayout) -> np.ndarray:
    """Relevance rows [B, T] -> maps [B, h, w]: the patch tokens (every position that is not an extra
    token), in row-major grid order."""
    patches = np.setdiff1d(np.arange(rows.shape[1]), tokens.extra_tokens)
    return rows[:, patches].reshape(rows.shape[0], *tokens.grid).astype(np.float32)


def class_token_row(relevance: np.ndarray, tokens: contract.LayerLayout) -> np.ndarray:
    """[B, T, T] token-to-token relevance -> [B, h, w]: the row of the class token (the first extra
    token) over the patch tokens. Without extra tokens (a mean-pooled model) the pooled output is the
    mean of all tokens, so its row is the mean of all rows."""
    rows = relevance[:, tokens.extra_tokens[0]] if tokens.extra_tokens else relevance.mean(axis=1)
    return patch_map(rows, tokens)


class AttentionMethod(Method):
    """A method over the file's attention maps: no layer, no input gradient."""

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        attention = file_attention(outputs, self.name)
        return self.relevance_map(outputs, attention)

    @abstractmethod
    def relevance_map(self, outputs: GraphOutputs, attention: contract.Attention) -> np.ndarray:
        """Raw maps [B, h, w] over the patch grid."""
