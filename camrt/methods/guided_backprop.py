"""Guided backpropagation.

Springenberg, Dosovitskiy, Brox, Riedmiller, "Striving for Simplicity: The All Convolutional
Net", ICLR 2015 workshop (arXiv:1412.6806), sec. 3.4 and Fig. 1: the input gradient of the class
score with every ReLU's backward replaced by R_l = 1[f_l > 0] * 1[R_{l+1} > 0] * R_{l+1}
(the exporter's ``guided`` rule set; it replaces the Relu op only, not Clip/ReLU6, as Captum and
pytorch-grad-cam replace only ReLU modules).

Display convention: the paper shows G as an RGB image; camrt shows one heatmap per image, the
max over colour channels of |G| (Simonyan et al.'s saliency reduction), min-max normalised by
`camrt.postprocess`, no ReLU (the map is >= 0 already). `attribution` returns G itself.
"""

from __future__ import annotations

from .. import contract
from ..hookspecs import hookimpl
from .base import InputGradientMethod, Requirements


class GuidedBackprop(InputGradientMethod):
    """Guided backpropagation: max over channels of |G|, G the guided input gradient (Springenberg et al. 2015)."""

    name = "guided-backprop"
    aliases = ("guided-backpropagation", "gbp")
    requires = Requirements(input_gradient=contract.RULE_GUIDED)


@hookimpl
def register_methods(register):
    register(GuidedBackprop)
