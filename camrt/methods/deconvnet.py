"""Deconvnet.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014
(arXiv:1311.2901), sec. 2.1: the reconstruction runs the network backwards with transposed
filters, max-pooling switches from the forward pass, and at each ReLU R_l = max(R_{l+1}, 0),
ignoring the forward switch. Transposed filters and pooling switches are what the gradient does
anyway, so this is the input gradient under the exporter's ``deconvnet`` rule set (Relu ops
only, as Captum's Deconvolution replaces only ReLU modules). Seeded at the class score as in
Simonyan et al. 2014 sec. 4 (the paper projects one feature-map activation instead).

Display convention as for guided backpropagation: the max over colour channels of |R_0|, no ReLU.
"""

from __future__ import annotations

from .. import contract
from ..hookspecs import hookimpl
from .base import InputGradientMethod, Requirements


class Deconvnet(InputGradientMethod):
    """Deconvnet: max over channels of the input "gradient" with R = max(R, 0) at each ReLU (Zeiler & Fergus 2014)."""

    name = "deconvnet"
    aliases = ("deconvolution",)
    requires = Requirements(input_gradient=contract.RULE_DECONVNET)


@hookimpl
def register_methods(register):
    register(Deconvnet)
