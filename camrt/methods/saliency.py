"""Vanilla gradient saliency (image-specific class saliency).

Simonyan, Vedaldi, Zisserman, "Deep Inside Convolutional Networks: Visualising Image
Classification Models and Saliency Maps", ICLR 2014 workshop (arXiv:1312.6034), sec. 3.1:
w = d S_c / d I at the image I_0 (eq. 3); for a colour image the map is
M_ij = max_c |w_h(i,j,c)|, the largest magnitude over the colour channels.
The absolute value is part of the method, so the postprocessing applies no ReLU; normalisation
and upsampling are `camrt.postprocess`'s.
"""

from __future__ import annotations

from .. import contract
from ..hookspecs import hookimpl
from .base import InputGradientMethod, Requirements


class Saliency(InputGradientMethod):
    """Saliency: max over colour channels of |d score / d input| (Simonyan et al. 2014)."""

    name = "saliency"
    aliases = ("vanilla-gradient",)
    requires = Requirements(input_gradient=contract.RULE_VANILLA)


@hookimpl
def register_methods(register):
    register(Saliency)
