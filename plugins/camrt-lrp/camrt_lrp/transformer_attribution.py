"""Transformer attribution: attention gradients weighted by LRP relevance, rolled out over the blocks.

Chefer, Gur, Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021 (arXiv 2012.09838),
sec. 3, eqs. 6-8 (the section and equation numbers as recalled from arXiv v2: the paper could not be read
offline; the formula follows the authors' code, hila-chefer/Transformer-Explainability, baselines/ViT/ViT_LRP.py):

    Ā_b = E_h[(∇A_b ⊙ R^(A_b))^+]                (eq. 6)
    C = (I + Ā_B) · ... · (I + Ā_1)                (eqs. 7-8, the rollout with the identity added)

A_b: block b's attention probabilities [heads, T, T]; ∇A_b = d y_t / d A_b, the gradient of the target's logit
(the file's `camrt/attn_grad/<map>`); R^(A_b) the relevance that reaches A_b when relevance one-hot(t) is
propagated from the logits with the authors' LRP rules (the rule set lrp-chefer, chefer_rules.py; the file's
`camrt/attn_rule_grad/lrp-chefer/<map>`: the share of A_b in A_b V_b); ⊙ the element-wise product, ^+ the
positive part, E_h the mean over heads. As the authors' code (ViT_LRP.compute_rollout_attention), the rows are
not re-normalised and later blocks multiply from the left; the map is the class token's row of C over the patch
tokens (`rollout[:, 0, 1:]`), on the patch grid (camrt.methods.attention).
"""

from __future__ import annotations

from functools import partial

import numpy as np

import camrt
from camrt import contract
from camrt.methods.attention import AttentionMethod, attention_stack, class_token_row

from .names import CHEFER_LRP
from .seeded import seeded_kinds


def lrp_weighted_rollout(gradients: list[np.ndarray], relevances: list[np.ndarray]) -> np.ndarray:
    """Eqs. 6-8 over the maps' gradients and relevances [B, heads, T, T] (input to output) -> C [B, T, T]."""
    tokens = gradients[0].shape[-1]
    rollout = np.broadcast_to(np.eye(tokens), (gradients[0].shape[0], tokens, tokens))
    for gradient, relevance in zip(gradients, relevances):
        weighted = np.maximum(gradient * relevance, 0.0).mean(axis=1)
        rollout = (np.eye(tokens) + weighted) @ rollout
    return rollout


class TransformerAttribution(AttentionMethod):
    """E_h[(grad A * R^A)^+] rolled out with the identity over the blocks, class-token row (Chefer, Gur, Wolf, CVPR 2021)."""

    name = "transformer-attribution"
    aliases = ("chefer-lrp",)
    requires = camrt.Requirements(attention_gradients=True, attention_rule_gradients=CHEFER_LRP)

    def relevance_map(self, outputs: camrt.GraphOutputs, attention: contract.Attention) -> np.ndarray:
        kinds = seeded_kinds(outputs)
        if kinds:  # the authors' relevance starts from a class's one-hot; a seed's is untested against their code
            raise camrt.UsageError(f"transformer-attribution is tested on class targets only, not on "
                                   f"{', '.join(sorted(kinds))} targets; use generic-attention (gradients only) for them")
        gradients = attention_stack(outputs, attention, contract.attention_gradient_output)
        relevances = attention_stack(outputs, attention, partial(contract.attention_rule_gradient_output, CHEFER_LRP))
        return class_token_row(lrp_weighted_rollout(gradients, relevances), attention.tokens)
