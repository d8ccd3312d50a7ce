"""Gradient-weighted attention rollout (Chefer et al.'s generic attention explainability).

Chefer, Gur, Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021 (arXiv:2103.15679), sec. 3, for self-attention:

    Ā = E_h((∇A ⊙ A)^+)        (eq. 5)
    R ← R + Ā · R,   R = I before the first layer        (eq. 6)

A: one layer's attention probabilities [heads, T, T]; ∇A = d y_t / d A, the gradient of the target's
score (camrt's differentiated score: the logits); ⊙ the element-wise product, ^+ the positive part,
E_h the mean over heads. The layers are applied input to output, and the map is the class token's
row of R over the patch tokens, on the patch grid (`camrt.methods.attention`), as in the authors'
ViT code (``generate_relevance``: ``R[0, 1:]``).

Their CVPR 2021 paper ("Transformer Interpretability Beyond Attention Visualization",
arXiv:2012.09838) weights the attention with LRP relevances instead of the attention itself
(Ā = E_h((∇A ⊙ R^(A))^+)); that variant needs LRP's relevance propagation through the graph
(issue 19) and is not implemented here.
"""

from __future__ import annotations

import numpy as np

from .. import contract
from ..hookspecs import hookimpl
from .attention import AttentionMethod, attention_stack, class_token_row
from .base import GraphOutputs, Requirements


def gradient_weighted_rollout(maps: list[np.ndarray], gradients: list[np.ndarray]) -> np.ndarray:
    """Eqs. 5-6 over attention maps and their gradients [B, heads, T, T] (input to output) -> R [B, T, T]."""
    relevance = np.broadcast_to(np.eye(maps[0].shape[-1]), (maps[0].shape[0], *maps[0].shape[2:])).copy()
    for attention, gradient in zip(maps, gradients):
        weighted = np.maximum(gradient * attention, 0.0).mean(axis=1)
        relevance = relevance + weighted @ relevance
    return relevance


class GenericAttention(AttentionMethod):
    """Gradient-weighted attention rollout: R <- R + E_h[(grad A * A)^+] R over layers, class-token row (Chefer, Gur, Wolf, ICCV 2021)."""

    name = "generic-attention"
    aliases = ("chefer", "gradient-rollout")
    requires = Requirements(attention=True, attention_gradients=True)

    def relevance_map(self, outputs: GraphOutputs, attention: contract.Attention) -> np.ndarray:
        maps = attention_stack(outputs, attention)
        gradients = attention_stack(outputs, attention, contract.attention_gradient_output)
        return class_token_row(gradient_weighted_rollout(maps, gradients), attention.tokens)


@hookimpl
def register_methods(register):
    register(GenericAttention)
