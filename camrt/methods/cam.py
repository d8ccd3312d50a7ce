"""CAM (class activation mapping).

Zhou, Khosla, Lapedriza, Oliva, Torralba, "Learning Deep Features for Discriminative
Localization", CVPR 2016 (arXiv:1512.04150), sec. 2:

    M_c(x, y) = sum_k w_k^c f_k(x, y)

f_k: the k-th feature map of the last convolutional layer, which feeds global average pooling;
w_k^c: the weight of the fully connected layer after the pooling from unit k to class c. CAM is
defined only for such a head (GAP -> [Flatten/Reshape] -> linear): the exporter finds it and puts
w^c, gathered by the target in the graph, in ``camrt/cam_weights/<layer>``; for any other layer
the file has no such output and the method refuses the layer (Grad-CAM generalises CAM and equals it
on a GAP + FC head: d y^c / d f_k(x, y) = w_k^c / Z).

The paper's M_c is signed and has no ReLU (torchcam's CAM neither), so none is applied; the map is
min-max normalised and upsampled by `camrt.postprocess`. Option eigen_smooth as for the CAM family
(`camrt.methods.base.ChannelWeightingMethod`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..hookspecs import hookimpl
from .base import ChannelWeightingMethod, GraphOutputs, Requirements


class CAM(ChannelWeightingMethod):
    """CAM: feature maps weighted by the classifier weights of the class, for a GAP + FC head (Zhou et al. 2016)."""

    name = "cam"
    aliases = ("class-activation-map",)
    requires = Requirements(activations=True, cam_weights=True)
    relu: ClassVar[bool] = False

    def layer_weights(self, outputs: GraphOutputs, layer: str) -> np.ndarray:
        return outputs.cam_weights(layer)


@hookimpl
def register_methods(register):
    register(CAM)
