"""Guided Grad-CAM.

Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from Deep
Networks via Gradient-based Localization", ICCV 2017 (arXiv:1610.02391), sec. 3 "Guided
Grad-CAM": the Grad-CAM map L^c (eqs. 1-2) is upsampled to the input resolution by bilinear
interpolation and multiplied element-wise with guided backpropagation's G (broadcast over the
colour channels): GGC = G * Up(ReLU(sum_k alpha_k^c A^k)).

The Grad-CAM factor is camrt's own: `GradCAM`'s weighting, `postprocess.relu` (eq. 2's ReLU) and
`postprocess.upsample` (bilinear, pixel-centre aligned, as F.interpolate(align_corners=False)).
It is not min-max normalised before the product (the paper multiplies L^c itself; Captum's
GuidedGradCam does the same), so the product is G scaled by the map, not shifted.
Display convention as for guided backpropagation: max over colour channels of |GGC|, which is
Up(L^c) * max_c |G| since Up(L^c) >= 0; no ReLU after. With several layers, each layer's product
is normalised and the products are averaged by `camrt.postprocess` as for any method.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import postprocess
from ..errors import UsageError
from ..hookspecs import hookimpl
from .base import GraphOutputs, Method, channel_max_abs
from .gradcam import GradCAM
from .guided_backprop import GuidedBackprop


class GuidedGradCAM(Method):
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM map (Selvaraju et al. 2017)."""

    name = "guided-gradcam"
    aliases = ("guided-grad-cam",)
    requires = dataclasses.replace(GradCAM.requires, input_gradient=GuidedBackprop.requires.input_gradient)
    relu = False

    def __init__(self, **options):
        super().__init__(**options)
        self._gradcam = GradCAM()
        self._guided = GuidedBackprop()

    def gradcam(self, outputs: GraphOutputs, *, layer: str | None, size: tuple[int, int]) -> np.ndarray:
        """Up(ReLU(L^c)) [B, H, W]: Grad-CAM's raw map, ReLU and bilinear upsampling, no normalisation."""
        return postprocess.upsample(postprocess.relu(self._gradcam.explain(outputs, layer=layer)), size)

    def attribution(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        """GGC [B, C, H, W] (what Captum's GuidedGradCam returns with interpolate_mode="bilinear")."""
        if layer is None:
            raise UsageError(f"method {self.name!r} needs a layer")
        guided = self._guided.attribution(outputs, layer=layer)
        cam = self.gradcam(outputs, layer=layer, size=guided.shape[2:])
        return (guided * cam[:, None]).astype(np.float32, copy=False)

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        return channel_max_abs(self.attribution(outputs, layer=layer))


@hookimpl
def register_methods(register):
    register(GuidedGradCAM)
