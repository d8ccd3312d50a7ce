"""Ablation-CAM.

Desai, Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
Gradient-free Localization", WACV 2020, eq. 3 and 5 (as pytorch-grad-cam 1.5.7 implements them):

    w_k^c = (y^c - y^c_k) / y^c            (y^c_k: the target score with channel A^k set to 0)
    L^c = ReLU(sum_k w_k^c A^k)

y^c_k is computed by the layer's tail graph (the forward nodes from the layer's tensor to
``camrt/logits``, cut from the same file): one tail pass per channel, `batch_size` ablated copies
at a time. A channel is ablated by setting it to 0, as the paper does, on every layer. This is
pytorch-grad-cam's choice after a ReLU (minimum 0); on signed layers it writes min(A) - 1e7
instead, and because it takes that minimum over the batch of copies it is editing, the i-th copy
of a batch gets min(A) - (i + 1) * 1e7 (its maps there depend on its batch_size). camrt follows
the paper; the tests compare signed layers with pytorch-grad-cam given a zeroing AblationLayer.
y^c is the tail's score of the unedited activations (the same computation as y^c_k, so the
difference carries no rounding of a different graph). y^c is the explained target's score of the
tail's output (`ExplainContext.target_scores`): a class logit, or a seeded target's L (a
segmentation region fixed on the unablated input, as pytorch-grad-cam's SemanticSegmentationTarget
keeps its mask; the cosine of the ablated embedding; the box matched again). The ReLU, upsampling
and normalisation are `camrt.postprocess`'s.
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import BatchedCAMOptions, ChannelWeightingMethod, GraphOutputs, Requirements


class AblationCAM(ChannelWeightingMethod):
    """Ablation-CAM: channels weighted by the relative drop of the target score when each is zeroed (Desai & Ramaswamy 2020)."""

    name = "ablationcam"
    aliases = ("ablation-cam",)
    requires = Requirements(activations=True, tail=True)
    scores_seeded_targets = True

    Options = BatchedCAMOptions

    def layer_weights(self, outputs: GraphOutputs, layer: str) -> np.ndarray:
        context = outputs.require_context(self.name)
        acts = outputs.activation(layer).astype(np.float32, copy=False)
        batch, channels = acts.shape[:2]
        step = self.options.batch_size
        weights = np.empty((batch, channels), dtype=np.float32)
        for b in range(batch):
            original = context.target_scores(context.tail(layer, acts[b][None], samples=[b]), b)[0]
            for start in range(0, channels, step):
                stop = min(start + step, channels)
                edited = np.repeat(acts[b][None], stop - start, axis=0)
                edited[np.arange(stop - start), np.arange(start, stop)] = 0.0
                scores = context.target_scores(context.tail(layer, edited, samples=np.full(stop - start, b)), b)
                weights[b, start:stop] = (original - scores) / original
        return weights


@hookimpl
def register_methods(register):
    register(AblationCAM)
