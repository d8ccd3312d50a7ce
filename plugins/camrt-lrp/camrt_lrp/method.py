"""Layer-wise relevance propagation heatmaps from the input relevance of an LRP rule set.

Bach, Binder, Montavon, Klauschen, Mueller, Samek, "On Pixel-Wise Explanations for Non-Linear Classifier
Decisions by Layer-Wise Relevance Propagation", PLoS ONE 10(7), 2015: relevance is redistributed layer by
layer from the output to the input, conserving its total (eq. 2: sum_d R_d^(l) = sum_d R_d^(l+1) = f(x)).
Montavon, Binder, Lapuschkin, Samek, Mueller, "Layer-Wise Relevance Propagation: An Overview", in
Explainable AI, LNCS 11700, 2019: the rules (eqs. 4.1-4.4) and the composites that assign them by layer.
For transformers (lrp-attn, lrp-cp): Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance
Propagation for Transformers", ICML 2024, and Ali et al., "XAI for Transformers: Better Explanations
through Conservative Propagation", ICML 2022 (rules: transformer_rules.py); lrp-chefer: Chefer, Gur, Wolf,
"Transformer Interpretability Beyond Attention Visualization", CVPR 2021 (rules: chefer_rules.py; its input
relevance is their method "full"; their transformer attribution: transformer_attribution.py).

Every rule propagates R linearly (R_x = M(x) R_out for a matrix M that depends on the input only), so the
file carries the input relevance for R_out = one-hot of the target (the contract's seed), as zennit's
attributor returns it for that output relevance. This method starts from zennit's other usual choice,
the target score: R_out = one-hot * f_c(x), so that the input relevance sums to the score
(conservation) wherever the rules conserve:

    R_input = f_c(x) * camrt/input_grad/<rule set>,    map_ij = sum_c R_input[c, i, j]

the sum over colour channels as in zennit's examples (`relevance.sum(1)`). The map is signed (negative
relevance speaks against the class), so no ReLU is applied; camrt normalises it to [0, 1] afterwards.

Seeded targets (a segmentation region, a concept similarity: camrt.seeds) start from
the analogue, zennit's `attr_output = seed * output` with the seed dL/d score: R_out = seed * score,
elementwise. That is not a multiple of the seed, so the method cannot scale the file's relevance
afterwards; it asks the seeded run to feed R_out itself to the backward pass (`seed_from`), and the
input relevance comes out of the file as it is. For a region of a class (`seg:C`) R_out is the class's
logits inside the region and the relevance sums to L (conserving rules); for `similar:` (L = cos(e, c),
not linear) R_out = seed * e is "gradient x output" at the embedding, whose total is 0 (cos is
homogeneous of degree 0 in e: sum_i e_i dL/de_i = 0), so the map shows which pixels push the embedding
towards or away from the concept but does not sum to L. For a box (`box:`, L = sum over the matched
candidates k of IoU_k * score_k) seed * head would put score_k * b dIoU/db at each box coordinate b of a
candidate: "gradient x coordinate", which depends on where the pixel origin is (a coordinate is a
position, not an amount), so the map would change when the image is padded on the left. The method
therefore holds the IoU constant, as the match does: R_out = IoU_k * score_k at the matched candidates'
class scores and 0 at their box coordinates (zennit's `attr_output = seed * output` with the seed of L
at constant IoU), which sums to L.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import camrt
from camrt.seeds.boxes import CANDIDATES_LAST
from camrt.seeds.targets import BoxScoreTarget

from .names import ATTN_LRP, CHEFER_LRP, CP_LRP, EPSILON_ALPHA2_BETA1, EPSILON_GAMMA_BOX, EPSILON_PLUS_FLAT
from .seeded import seeded_kinds
from .transformer_attribution import TransformerAttribution


def input_relevance(outputs: camrt.GraphOutputs, rule_set: str) -> np.ndarray:
    """[B, C, H, W] relevance of the input pixels: for a class target, for the output relevance one-hot *
    target score; for a seeded one (a seeded run), for the output relevance `seed_from` fed it."""
    if getattr(outputs.context, "seeded", None) is not None:
        _refuse_untested(outputs)
        return outputs.input_gradient(rule_set)
    relevance = outputs.input_gradient(rule_set)
    logits = outputs.logits  # [batch, classes]: the Explainer refuses class targets of any other score
    score = np.take_along_axis(logits, outputs.target_index[:, None].astype(np.int64), axis=1)[:, 0]
    return relevance * score.astype(np.float32)[:, None, None, None]


#: Seeded target kinds whose output relevance seed * score is tested against zennit (tests/test_lrp_seeded.py).
TESTED_SEEDED_KINDS = ("seg", "similar", "box")


def _refuse_untested(outputs: camrt.GraphOutputs) -> None:
    """UsageError for a seeded run with a target kind not in TESTED_SEEDED_KINDS (a plugin's target
    kind): its seed * score has no zennit check."""
    kinds = sorted(seeded_kinds(outputs) - set(TESTED_SEEDED_KINDS))
    if kinds:
        raise camrt.UsageError(f"the LRP methods are not tested on {', '.join(kinds)} targets (their output relevance "
                               f"seed * score is checked against zennit for {', '.join(TESTED_SEEDED_KINDS)} and class "
                               "targets only); use gradcam, saliency or d-rise for them")


def iou_constant_seed(seed: np.ndarray, target: Any) -> np.ndarray:
    """A box target's seed row with the IoU held constant (its box coordinates' entries, score_k dIoU/db,
    zeroed; its class entries are IoU_k already), any other target's seed row as it is."""
    if not isinstance(target, BoxScoreTarget):
        return seed
    constant = seed.copy()
    if target.layout == CANDIDATES_LAST:  # [4 + C, N]
        constant[:4] = 0
    else:  # [N, 4 + C]
        constant[:, :4] = 0
    return constant


class LRP(camrt.Method):
    """LRP heatmap (Bach et al. 2015) under one of the plugin's rule sets: the channel sum of the input relevance."""

    relu = False

    def seed_from(self, seeds: np.ndarray, scores: np.ndarray, targets: Sequence[Any]) -> np.ndarray:
        """zennit's `attr_output = seed * output`: the target's seed times the score, elementwise; a
        box target's seed at constant IoU (`iou_constant_seed`)."""
        return np.stack([iou_constant_seed(seed, target) for seed, target in zip(seeds, targets)]) * scores

    def explain(self, outputs: camrt.GraphOutputs, *, layer: str | None) -> np.ndarray:
        return input_relevance(outputs, self.requires.input_gradient).sum(axis=1).astype(np.float32, copy=False)


def lrp_method(rule_set: str) -> type[LRP]:
    return type(f"LRP_{rule_set.replace('-', '_')}", (LRP,), {
        "name": rule_set,
        "requires": camrt.Requirements(input_gradient=rule_set),
        "__doc__": f"LRP heatmap with the {rule_set} rule set (camrt_lrp.composites).",
        "__module__": __name__,
    })


METHODS = (*(lrp_method(name) for name in (EPSILON_PLUS_FLAT, EPSILON_GAMMA_BOX, EPSILON_ALPHA2_BETA1, ATTN_LRP,
                                           CP_LRP, CHEFER_LRP)), TransformerAttribution)
