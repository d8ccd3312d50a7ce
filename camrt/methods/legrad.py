"""LeGrad.

Bousselham, Boggust, Chaybouti, Strobelt, Kuehne, "LeGrad: An Explainability Method for Vision
Transformers via Feature Formation Sensitivity", ICCV 2025 (arXiv:2404.03214), sec. 3 (the method:
the gradient of each layer's score with respect to that layer's attention map is the explanation
signal, merged over layers):

    s^l = C(z̄^l)                                        the layer score of block l
    Ê^l = mean_{h, i} ReLU(d s^l_c / d A^l_{h, i, :})      heads h and query tokens i averaged
    E   = mean_l Ê^l, over the patch tokens (keys)

A^l: block l's attention probabilities [heads, T, T]; z̄^l the mean of block l's output tokens and
C the model's final norm and classifier head (the authors' code: ``ln_post(feat.mean(dim=0)) @ proj``;
torchcam 0.5's ``heads(norm(tokens.mean(dim=1)))``); c the target class. Unlike the rollouts, the
gradient is not multiplied by the attention. The exporter puts d s^l_c / d A^l in
``camrt/attn_layer_grad/<map>`` (``camrt export --attention-layer-scores``, torch sources: timm's and
torchvision's vision transformers, `camrt_exporters.attention.layer_score_projection`); the keys
of the extra tokens are dropped and the rest laid on the patch grid. camrt matches torchcam 0.5's
``LeGrad`` (which averages the blocks it is given; camrt the blocks the file has, or the last
`last_blocks` of them). The paper's equation numbers could not be read offline; the formula
above is the one of the authors' code and of torchcam 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import contract
from ..hookspecs import hookimpl
from .attention import AttentionMethod, attention_stack, patch_map
from .base import GraphOutputs, Requirements


class LeGrad(AttentionMethod):
    """LeGrad: ReLU of each block's layer-score gradient w.r.t. its attention, averaged over heads, queries and blocks (Bousselham et al. 2024)."""

    name = "legrad"
    requires = Requirements(attention_layer_gradients=True)

    @dataclass(frozen=True)
    class Options:
        """last_blocks: average the last N attention maps of the file only (0: all of them)."""

        last_blocks: int = 0

        def __post_init__(self):
            if self.last_blocks < 0:
                raise ValueError(f"last_blocks must be >= 0, got {self.last_blocks}")

    def relevance_map(self, outputs: GraphOutputs, attention: contract.Attention) -> np.ndarray:
        if self.options.last_blocks:
            attention = replace(attention, maps=attention.maps[-self.options.last_blocks:])
        gradients = attention_stack(outputs, attention, contract.attention_layer_gradient_output)
        keys = [np.maximum(gradient, 0.0).mean(axis=(1, 2)) for gradient in gradients]
        return patch_map(np.mean(keys, axis=0), attention.tokens)


@hookimpl
def register_methods(register):
    register(LeGrad)
