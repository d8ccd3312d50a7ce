"""Heatmap postprocessing, in one place and applied once: ReLU, upsampling, normalisation, fusion.

Methods return raw maps; `finalize` turns the raw maps of one sample (one per layer) into the
heatmap that is shown and saved. It is pytorch-grad-cam's pipeline (`base_cam.py`
``compute_cam_per_layer`` + ``aggregate_multi_layers``, `utils/image.py` ``scale_cam_image``):

1. per layer: ReLU, min-max normalisation ``(x - min) / (max - min + 1e-7)`` at the layer's own
   resolution (so that layers of different scales weigh the same in the fusion), bilinear
   upsampling with ``cv2.resize(..., INTER_LINEAR)`` (pixel-centre aligned);
2. fusion (``fusion="mean"``, every method's default): the mean over layers, then one min-max
   normalisation of the result.

Layer-CAM's own fusion (``fusion="tanh-max"``; Jiang et al. 2021, eq. 9 and sec. III-C, as torchcam's
``LayerCAM.fuse_cams`` does it): per layer ReLU and min-max normalisation, then tanh(2 x) (the paper's
scaling with gamma = 2, which lifts the weak responses of shallow layers), bilinear upsampling to the
largest layer's resolution, the element-wise maximum over layers, and only then the upsampling to
the heatmap size and one min-max normalisation.

Each step runs exactly once per heatmap, here and nowhere else. With one layer, step 2's
normalisation only stretches the upsampled map back to exactly [0, 1] (bilinear upsampling need
not hit the low-resolution extremes).

Test-time augmentation (the explainer's ``aug_smooth``; pytorch-grad-cam's
``forward_augmentation_smoothing`` with its default ttach transforms): the input is flipped
horizontally or not and multiplied by 0.9, 1 or 1.1 (`AUGMENTATIONS`, ttach's order); each of the
six inputs gets its full heatmap (steps 1-2 above), which is flipped back, and the six are
averaged (`merge_augmented`). pytorch-grad-cam returns that mean as it is; camrt min-max
normalises it once more, so that every heatmap spans [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: pytorch-grad-cam's epsilon in scale_cam_image.
EPS = 1e-7


def relu(maps: np.ndarray) -> np.ndarray:
    return np.maximum(maps, 0, dtype=np.float32)


def normalize(maps: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Min-max normalise each map over its last two axes: (x - min) / (max - min + eps)."""
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(-2, -1), keepdims=True)
    high = maps.max(axis=(-2, -1), keepdims=True)
    return ((maps - low) / (high - low + np.float32(eps))).astype(np.float32, copy=False)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (cv2.INTER_LINEAR) of one map [h, w] or a batch [B, h, w] to size (H, W)."""
    import cv2

    maps = np.asarray(maps, dtype=np.float32)
    height, width = int(size[0]), int(size[1])
    if maps.shape[-2:] == (height, width):
        return maps
    if maps.ndim == 2:
        return cv2.resize(maps, (width, height), interpolation=cv2.INTER_LINEAR)
    if maps.ndim != 3:
        raise ValueError(f"upsample expects [h, w] or [B, h, w], got {maps.shape}")
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    step = 512  # cv2.resize handles at most 512 channels at once
    for start in range(0, maps.shape[0], step):
        chunk = np.ascontiguousarray(maps[start:start + step].transpose(1, 2, 0))
        resized = cv2.resize(chunk, (width, height), interpolation=cv2.INTER_LINEAR)
        out[start:start + step] = resized.reshape(height, width, -1).transpose(2, 0, 1)
    return out


def fuse(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Multi-layer fusion: the mean of same-sized maps (pytorch-grad-cam's default aggregation)."""
    if len(maps) == 1:
        return np.asarray(maps[0], dtype=np.float32)
    return np.mean(np.stack([np.asarray(m, dtype=np.float32) for m in maps]), axis=0, dtype=np.float32)


#: Layer-CAM's gamma in tanh(gamma * normalised map) (Jiang et al. 2021, eq. 9).
TANH_GAMMA = 2.0

#: The ways to fuse the maps of several layers (`finalize`'s ``fusion``).
FUSIONS = ("mean", "tanh-max")


def check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


def finalize(maps: Sequence[np.ndarray], size: tuple[int, int], *, apply_relu: bool = True,
             fusion: str = "mean") -> np.ndarray:
    """The raw maps of one sample (one [h, w] map per layer) -> one [H, W] float32 heatmap in [0, 1]."""
    if not maps:
        raise ValueError("finalize needs at least one map")
    check_fusion(fusion)
    per_layer = []
    for raw in maps:
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 2:
            raise ValueError(f"a raw map must be [h, w], got {raw.shape}")
        per_layer.append(normalize(relu(raw) if apply_relu else raw))
    if fusion == "tanh-max" and len(per_layer) > 1:
        largest = (max(m.shape[0] for m in per_layer), max(m.shape[1] for m in per_layer))
        scaled = [upsample(np.tanh(np.float32(TANH_GAMMA) * m), largest) for m in per_layer]
        return normalize(upsample(np.max(np.stack(scaled), axis=0), size))
    return normalize(fuse([upsample(m, size) for m in per_layer]))


#: (horizontal flip, factor) of each augmented input: ttach.Compose([HorizontalFlip(),
#: Multiply([0.9, 1, 1.1])]) as pytorch-grad-cam 1.5.7's aug_smooth uses it, in ttach's order.
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


def augment(inputs: np.ndarray, flip: bool, factor: float) -> np.ndarray:
    """An augmented copy of model inputs [B, C, H, W]: flipped along W if `flip`, times `factor`."""
    flipped = inputs[..., ::-1] if flip else inputs
    return np.ascontiguousarray(flipped * np.float32(factor), dtype=np.float32)


def merge_augmented(heatmaps: Sequence[tuple[bool, np.ndarray]]) -> np.ndarray:
    """(flip, heatmap [H, W] of the augmented input) pairs -> the mean of the heatmaps flipped back,
    min-max normalised."""
    restored = [heatmap[:, ::-1] if flip else heatmap for flip, heatmap in heatmaps]
    return normalize(np.mean(np.stack(restored).astype(np.float32), axis=0, dtype=np.float32))
