"""Decode image files into HWC uint8 RGB arrays and turn them into the model input.

Decoding uses OpenCV. Files are read as bytes and decoded with ``cv2.imdecode`` (so paths with any
characters work) using ``IMREAD_ANYCOLOR | IMREAD_ANYDEPTH``: colour layout and bit depth as
stored, EXIF orientation applied (``IMREAD_UNCHANGED`` would ignore it and explain a photo lying on
its side), alpha dropped (not composited). Then grayscale becomes 3 channels, a remaining alpha
channel is dropped and 16-bit samples become 8-bit by ``>> 8``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .contract import Preprocessing
from .errors import InputError, require_regular_file

#: Extensions picked up when a directory is given as input (lower case).
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".pbm", ".pgm", ".ppm", ".pnm", ".jp2", ".avif",
})


def _jpeg_truncated(data: bytes) -> bool:
    """A JPEG whose last scan has no end-of-image marker after it.

    Entropy-coded data cannot contain 0xFFD9 or 0xFFDA (0xFF is stuffed), so the last
    start-of-scan marker must be followed by an EOI. Older OpenCV builds decode such files into
    half-grey images with only a warning; this makes them an error everywhere.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return False
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def to_rgb8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Any decoded OpenCV image (BGR order) as HWC uint8 RGB."""
    import cv2

    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{what}: unsupported sample type {image.dtype} (8- and 16-bit images are supported)")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2] if image.ndim == 3 else 0
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha: drop the alpha
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:  # BGRA: drop the alpha
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise InputError(f"{what}: unsupported image layout {image.shape}")


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode encoded image bytes into HWC uint8 RGB."""
    import cv2

    if not data:
        raise InputError(f"{what}: zero-byte file")
    if _jpeg_truncated(data):
        raise InputError(f"{what}: cannot decode: truncated JPEG (no end-of-image marker)")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as exc:
        raise InputError(f"{what}: cannot decode: {str(exc).strip().splitlines()[-1]}") from None
    if image is None or image.size == 0:
        raise InputError(f"{what}: cannot decode: not an image format OpenCV reads, or a damaged file")
    return to_rgb8(image, what)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read and decode one image file into HWC uint8 RGB; InputError names the file and the reason."""
    path = require_regular_file(path, InputError)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return decode_image(data, path)


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """An HWC uint8 RGB array, or InputError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{what}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise InputError(f"{what}: expected an HWC uint8 RGB array, got {image.dtype} {image.shape}")
    return image


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (cv2.INTER_LINEAR) to (height, width); the array itself when it already fits."""
    import cv2

    if image.shape[0] == height and image.shape[1] == width:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def preprocess(images: Sequence[np.ndarray], preprocessing: Preprocessing) -> np.ndarray:
    """HWC uint8 RGB images -> NCHW float32 as the contract says.

    Each image is resized to (height, width) without cropping (not resampled when it already has
    that size), channels put in `channel_order`, and x = (pixel * scale - mean) / std with mean and
    std given in that channel order.
    """
    p = preprocessing
    order = p.channel_order.lower()
    if order not in ("rgb", "bgr"):
        raise InputError(f"unsupported channel order {p.channel_order!r} in the model's preprocessing")
    batch = np.empty((len(images), 3, p.height, p.width), dtype=np.float32)
    mean = np.asarray(p.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(p.std, dtype=np.float32).reshape(3, 1, 1)
    scale = np.float32(p.scale)
    for i, image in enumerate(images):
        image = resize_to(check_image(image, f"image {i}"), p.height, p.width)
        chw = image.transpose(2, 0, 1)
        if order == "bgr":
            chw = chw[::-1]
        np.multiply(chw, scale, out=batch[i], dtype=np.float32)
        batch[i] -= mean
        batch[i] /= std
    return batch
