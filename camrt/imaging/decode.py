"""Decode image files into HWC uint8 RGB arrays.

Decoding uses OpenCV. Files are read as bytes and decoded with ``cv2.imdecode`` (so paths with any
characters work) using ``IMREAD_ANYCOLOR | IMREAD_ANYDEPTH``: colour layout and bit depth as
stored, EXIF orientation applied as ``cv2.imread`` does by default (``IMREAD_UNCHANGED`` would
ignore it and explain a photo lying on its side), alpha dropped (not composited). Then grayscale
becomes 3 channels, a remaining alpha channel is dropped and 16-bit samples become 8-bit by ``>> 8``.

Hostile files: only the formats below are handed to a decoder, recognised by their signature
(never by the file name), and their width and height are read from the header *before* any pixel
is decoded, so a decompression bomb (a small file claiming a huge image) is refused without being
allocated. The limit is `max_pixels` (API), else ``CAMRT_MAX_IMAGE_PIXELS``, else
DEFAULT_MAX_IMAGE_PIXELS; 0 disables it. Paths must be regular files (not directories, FIFOs or
devices), checked on the opened descriptor.
"""

from __future__ import annotations

import os
import stat

import numpy as np

from ..errors import InputError, UsageError, require_regular_file
from .headers import image_header

#: Extensions picked up when a directory is given as input (lower case).
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".pbm", ".pgm", ".ppm", ".pnm", ".jp2", ".avif",
})

#: Default decompression-bomb guard: 100 megapixels (a 10000 x 10000 photograph; 300 MB as RGB8).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_PIXELS_ENV = "CAMRT_MAX_IMAGE_PIXELS"


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: `max_pixels`, else $CAMRT_MAX_IMAGE_PIXELS, else the default (0: none)."""
    if max_pixels is None:
        text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            max_pixels = int(text.replace("_", ""))
        except ValueError:
            raise UsageError(f"{MAX_IMAGE_PIXELS_ENV}={text!r}: expected a whole number of pixels (0: no limit)") from None
        where = MAX_IMAGE_PIXELS_ENV
    else:
        where = "max_pixels"
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 0:
        raise UsageError(f"{where} must be a whole number of pixels >= 0 (0: no limit), got {max_pixels!r}")
    return int(max_pixels)


def _check_pixels(what: str, name: str, width: int, height: int, limit: int) -> None:
    if limit and width * height > limit:
        raise InputError(
            f"{what}: {name} image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limit} (a decompression-bomb guard; raise it with max_pixels or {MAX_IMAGE_PIXELS_ENV}, 0: no limit)"
        )


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


_opencv_quieted = False


def _quiet_opencv() -> None:
    """OpenCV logs warnings to stderr for the damaged files camrt reports itself; silence them
    once, unless the user configured OpenCV's logging ($OPENCV_LOG_LEVEL)."""
    global _opencv_quieted
    if not _opencv_quieted and "OPENCV_LOG_LEVEL" not in os.environ:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    _opencv_quieted = True


def decode_image(data: bytes, what: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes into HWC uint8 RGB.

    The format and size come from the header first (`image_header`); an image over the pixel limit
    (`max_image_pixels(max_pixels)`) is refused before OpenCV decodes anything.
    """
    import cv2

    if not data:
        raise InputError(f"{what}: zero-byte file")
    limit = max_image_pixels(max_pixels)
    name, width, height = image_header(data, what)
    _check_pixels(what, name, width, height, limit)
    if _jpeg_truncated(data):
        raise InputError(f"{what}: cannot decode: truncated JPEG (no end-of-image marker)")
    _quiet_opencv()
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as exc:
        raise InputError(f"{what}: cannot decode: {str(exc).strip().splitlines()[-1]}") from None
    if image is None or image.size == 0:
        raise InputError(f"{what}: cannot decode: a damaged or unsupported {name} file")
    # The header and the decoder agree for valid files; a file where they do not is refused too.
    _check_pixels(what, name, image.shape[1], image.shape[0], limit)
    return to_rgb8(image, what)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read and decode one image file into HWC uint8 RGB; InputError names the file and the reason.

    The file is opened without blocking and checked to be a regular file on the open descriptor,
    so a path swapped for a FIFO or a device after the first check cannot hang or flood the run.
    """
    path = require_regular_file(path, InputError)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise InputError(f"{path}: not a regular file")
            data = handle.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return decode_image(data, path, max_pixels)


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """An HWC uint8 RGB array, or InputError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{what}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise InputError(f"{what}: expected an HWC uint8 RGB array, got {image.dtype} {image.shape}")
    return image
