"""torchvision detectors' raw heads as one differentiable tensor (the recipe of docs/targets.md,
"Detectors"): their eval forward ends in `postprocess_detections` (score threshold, top-k, NMS),
which has no derivative, so export the part before it.

`RawDetectionHead(model, size)` returns [B, N, 4 + C]: for each of the N anchors its decoded box
(x1, y1, x2, y2 in input pixels: the model's box coder on the anchors of a `size` input) and its
class scores as the model's postprocessing makes them (SSD: softmax over the classes, background
0 included; RetinaNet: sigmoid). The input is the model's normalised image at `size` (its
`GeneralizedRCNNTransform` is left out: give `camrt export` its mean and std instead).
"""

from __future__ import annotations

import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD


class RawDetectionHead(torch.nn.Module):
    def __init__(self, model: SSD | RetinaNet, size: tuple[int, int]):
        super().__init__()
        model.eval()  # the anchors need only the feature sizes; BatchNorm in training mode would need a batch
        self.backbone, self.head, self.box_coder = model.backbone, model.head, model.box_coder
        self.softmax = isinstance(model, SSD)
        with torch.no_grad():
            image = torch.zeros(1, 3, *size)
            features = self._features(image)
            anchors = model.anchor_generator(ImageList(image, [tuple(size)]), features)[0]
        self.register_buffer("anchors", anchors)  # fixed by the pinned input size

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x)
        return list(features.values()) if isinstance(features, dict) else [features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self._features(x))
        logits, codes = out["cls_logits"], out["bbox_regression"]
        batch, count = codes.shape[:2]
        anchors = self.anchors.to(codes.dtype).expand(batch, count, 4).reshape(-1, 4)
        boxes = self.box_coder.decode_single(codes.reshape(-1, 4), anchors).reshape(batch, count, 4)
        scores = logits.softmax(-1) if self.softmax else logits.sigmoid()
        return torch.cat([boxes, scores], 2)


def calibrated(head: RawDetectionHead, size: tuple[int, int]) -> RawDetectionHead:
    """The head in eval mode with its BatchNorm statistics calibrated on random images, as training
    would: random-init statistics (mean 0, var 1) shrink SSDlite's features to 1e-13 by its last stage."""
    for module in head.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
    head.train()
    with torch.no_grad():
        for _ in range(2):
            head(torch.randn(4, 3, *size))
    return head.eval()
