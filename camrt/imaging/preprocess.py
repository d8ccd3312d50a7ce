"""Images to the model input: resized to the file's input size and normalised as its
preprocessing metadata says."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..contract import Preprocessing
from ..errors import InputError
from .decode import check_image


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (cv2.INTER_LINEAR) to (height, width); the array itself when it already fits."""
    import cv2

    if image.shape[0] == height and image.shape[1] == width:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def preprocess(images: Sequence[np.ndarray], preprocessing: Preprocessing) -> np.ndarray:
    """HWC uint8 RGB images -> NCHW float32 as the contract says.

    Each image is resized to (height, width) without cropping (not resampled when it already has
    that size), channels put in `channel_order` (or, for a one-channel model, the luma of
    cv2.COLOR_RGB2GRAY: 0.299 R + 0.587 G + 0.114 B), and x = (pixel * scale - mean) / std with mean
    and std given in that channel order.
    """
    import cv2

    p = preprocessing
    order = p.channel_order.lower()
    if order not in ("rgb", "bgr"):
        raise InputError(f"unsupported channel order {p.channel_order!r} in the model's preprocessing")
    batch = np.empty((len(images), p.channels, p.height, p.width), dtype=np.float32)
    mean = np.asarray(p.mean, dtype=np.float32).reshape(p.channels, 1, 1)
    std = np.asarray(p.std, dtype=np.float32).reshape(p.channels, 1, 1)
    scale = np.float32(p.scale)
    for i, image in enumerate(images):
        image = resize_to(check_image(image, f"image {i}"), p.height, p.width)
        chw = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[None] if p.channels == 1 else image.transpose(2, 0, 1)
        if order == "bgr":
            chw = chw[::-1]
        np.multiply(chw, scale, out=batch[i], dtype=np.float32)
        batch[i] -= mean
        batch[i] /= std
    return batch
