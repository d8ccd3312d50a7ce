"""ViT-ReciproCAM.

Byun, Lee, "ViT-ReciproCAM: Gradient and Attention-Free Visual Explanations for Vision
Transformer", arXiv:2310.02588 (2023), section 3, as the authors' OpenVINO XAI 1.1 implements it
(`openvino_xai.methods.white_box.recipro_cam.ViTReciproCAM`):

    M^(i,j) = G centred at token (i, j) of the h x w token grid, cut at its borders,
              G = [[1/16, 1/8, 1/16], [1/8, 1/4, 1/8], [1/16, 1/8, 1/16]]
    F^(i,j) = M^(i,j) (.) F          (every channel of each grid token scaled; class token kept)
    S^c(i, j) = y^c(F^(i,j))          (the target's score through the rest of the network)

F is the layer's output, the LayerNorm feeding the last attention (camrt's default ViT layer,
`blocks.11.norm1`); the block's residual stream, which the tail reads beside it, is masked by the
same M^(i,j) (OpenVINO XAI masks the Add before the last block and the output of its first
LayerNorm alike: `ExplainContext.masked_tail`). One tail pass per grid token, `batch_size` at a
time. The map is the scores, signed (no ReLU), normalised by `camrt.postprocess` as OpenVINO XAI's
min-max scaling does. Checked on token layers (tests/exporters/test_vit_reciprocam.py, and against
OpenVINO XAI itself: scripts/oracle-openvino-xai.py); on NCHW and NHWC layers the masks apply alike.
"""

from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import BatchOptions, GraphOutputs, Method, Requirements

#: The 3x3 Gaussian-like kernel of the masks.
KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32) / 16.0


def gaussian_masks(height: int, width: int) -> np.ndarray:
    """[h * w, h, w]: mask k = i * w + j is KERNEL centred at (i, j), cut at the grid's borders."""
    padded = np.zeros((height * width, height + 2, width + 2), dtype=np.float32)
    for i in range(height):
        for j in range(width):
            padded[i * width + j, i:i + 3, j:j + 3] = KERNEL
    return padded[:, 1:-1, 1:-1]


class ViTReciproCAM(Method):
    """ViT-ReciproCAM: the target score with the token grid masked around each token (Byun & Lee 2023)."""

    name = "vit-reciprocam"
    aliases = ("vitreciprocam", "reciprocam")
    requires = Requirements(activations=True, tail=True)
    relu = False
    #: Its tail passes read the target only through ExplainContext.target_scores.
    scores_seeded_targets = True

    Options = BatchOptions

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        context = outputs.require_context(self.name)
        batch, _, height, width = outputs.activation(layer).shape
        masks = gaussian_masks(height, width)
        maps = np.empty((batch, height * width), dtype=np.float32)
        step = self.options.batch_size
        for b in range(batch):
            for start in range(0, len(masks), step):
                chunk = masks[start:start + step]
                scores = context.masked_tail(layer, chunk, samples=np.full(len(chunk), b))
                maps[b, start:start + len(chunk)] = context.target_scores(scores, b)
        return maps.reshape(batch, height, width)


@hookimpl
def register_methods(register):
    register(ViTReciproCAM)
