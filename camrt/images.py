"""Decode image files into HWC uint8 RGB arrays and turn them into the model input.

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
import re
import stat
import struct
from collections.abc import Callable, Sequence

import numpy as np

from .contract import Preprocessing
from .errors import InputError, UsageError, require_regular_file

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


# --- image headers: (format, width, height) without decoding ---------------------------------


class _BadHeader(ValueError):
    pass


def _unpack(fmt: str, data: bytes, offset: int) -> tuple:
    if offset < 0 or offset + struct.calcsize(fmt) > len(data):
        raise _BadHeader("the header is cut short")
    return struct.unpack_from(fmt, data, offset)


def _png(data: bytes) -> tuple[int, int]:
    length, kind = _unpack(">I4s", data, 8)
    if kind != b"IHDR" or length < 8:
        raise _BadHeader("no IHDR chunk first")
    return _unpack(">II", data, 16)


#: JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(data: bytes) -> tuple[int, int]:
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes, then the marker code
            pos += 1
        if pos >= len(data):
            raise _BadHeader("no frame header (SOF) before the end of the file")
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            continue
        if marker in (0xD9, 0xDA):
            raise _BadHeader("image data or end before the frame header (SOF)")
        (length,) = _unpack(">H", data, pos)
        if marker in _SOF:
            height, width = _unpack(">HH", data, pos + 3)
            return width, height
        if length < 2:
            raise _BadHeader(f"segment length {length}")
        pos += length


def _bmp(data: bytes) -> tuple[int, int]:
    (size,) = _unpack("<I", data, 14)
    if size == 12:  # OS/2 BITMAPCOREHEADER
        return _unpack("<HH", data, 18)
    width, height = _unpack("<ii", data, 18)
    return abs(width), abs(height)  # a negative height means top-down rows


def _gif(data: bytes) -> tuple[int, int]:
    return _unpack("<HH", data, 6)


def _webp(data: bytes) -> tuple[int, int]:
    (chunk,) = _unpack("4s", data, 12)
    if chunk == b"VP8 ":
        width, height = _unpack("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        (bits,) = _unpack("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w0, w1, w2, h0, h1, h2 = _unpack("6B", data, 24)
        return (w0 | w1 << 8 | w2 << 16) + 1, (h0 | h1 << 8 | h2 << 16) + 1
    raise _BadHeader(f"unknown WebP chunk {chunk!r}")


def _tiff(data: bytes) -> tuple[int, int]:
    order = "<" if data[:2] == b"II" else ">"
    (version,) = _unpack(order + "H", data, 2)
    big = version == 43  # BigTIFF: 8-byte offsets and counts
    offset = _unpack(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
    count = _unpack(order + ("Q" if big else "H"), data, offset)[0]
    entry, start = (20, offset + 8) if big else (12, offset + 2)
    found: dict[int, int] = {}
    for i in range(min(count, 4096)):
        tag, kind = _unpack(order + "HH", data, start + i * entry)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3), LONG (4) or LONG8 (16)
            value_at = start + i * entry + (12 if big else 8)
            codes = {3: "H", 4: "I", 16: "Q"}
            if kind not in codes:
                raise _BadHeader(f"tag {tag} has type {kind}")
            found[tag] = _unpack(order + codes[kind], data, value_at)[0]
    if len(found) != 2:
        raise _BadHeader("the first directory lacks ImageWidth or ImageLength")
    return found[256], found[257]


_PNM_TOKEN = re.compile(rb"\s*(?:#[^\n]*\n\s*)*(\S+)")


def _pnm(data: bytes) -> tuple[int, int]:
    if data[:2] == b"P7":  # PAM: "WIDTH w" / "HEIGHT h" lines up to ENDHDR
        header = data[: data.find(b"ENDHDR")] if b"ENDHDR" in data[:4096] else b""
        width, height = re.search(rb"\bWIDTH\s+(\d+)", header), re.search(rb"\bHEIGHT\s+(\d+)", header)
        if not (width and height):
            raise _BadHeader("no WIDTH and HEIGHT before ENDHDR")
        return int(width.group(1)), int(height.group(1))
    pos, values = 2, []
    for _ in range(2):
        match = _PNM_TOKEN.match(data, pos, min(len(data), pos + 4096))
        if not match or not match.group(1).isdigit():
            raise _BadHeader("no width and height after the magic number")
        values.append(int(match.group(1)))
        pos = match.end()
    return values[0], values[1]


def _sun_raster(data: bytes) -> tuple[int, int]:
    return _unpack(">II", data, 4)


def _radiance(data: bytes) -> tuple[int, int]:
    end = data.find(b"\n\n", 0, 65536)
    if end < 0:
        raise _BadHeader("no end of the header")
    line = data[end + 2: data.find(b"\n", end + 2, end + 130)]
    match = re.fullmatch(rb"([-+])([XY]) (\d+) ([-+])([XY]) (\d+)", line.strip())
    if not match or match.group(2) == match.group(5):
        raise _BadHeader("no resolution line")
    first, second = int(match.group(3)), int(match.group(6))
    return (second, first) if match.group(2) == b"Y" else (first, second)  # "-Y rows +X columns" or rotated


def _boxes(data: bytes, start: int, end: int):
    """ISO base media / JP2 boxes in [start, end): (type, payload start, payload end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = _unpack(">I4s", data, pos)
        header = 8
        if size == 1:
            (size,) = _unpack(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise _BadHeader(f"box {kind!r} runs past its container")
        yield kind, pos + header, pos + size
        pos += size


def _jp2(data: bytes) -> tuple[int, int]:
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"jp2h":
            for sub, sub_start, _ in _boxes(data, start, end):
                if sub == b"ihdr":
                    height, width = _unpack(">II", data, sub_start)
                    return width, height
    raise _BadHeader("no image header box (jp2h/ihdr)")


def _j2k(data: bytes) -> tuple[int, int]:
    xsiz, ysiz, xo, yo = _unpack(">IIII", data, 8)  # SIZ follows SOC: Lsiz, Rsiz, then these
    return max(xsiz - xo, 0), max(ysiz - yo, 0)


def _avif(data: bytes) -> tuple[int, int]:
    """The largest image spatial extent ('ispe') among the items (meta/iprp/ipco)."""
    best = None

    def walk(start: int, end: int, depth: int) -> None:
        nonlocal best
        for kind, box_start, box_end in _boxes(data, start, end):
            if kind == b"ispe":
                width, height = _unpack(">II", data, box_start + 4)
                if best is None or width * height > best[0] * best[1]:
                    best = (width, height)
            elif kind in (b"meta", b"iprp", b"ipco") and depth < 4:
                walk(box_start + (4 if kind == b"meta" else 0), box_end, depth + 1)

    walk(0, len(data), 0)
    if best is None:
        raise _BadHeader("no image spatial extent ('ispe') property")
    return best


#: (format, signature test, header reader): the formats camrt hands to OpenCV.
_FORMATS: tuple[tuple[str, Callable[[bytes], bool], Callable[[bytes], tuple[int, int]]], ...] = (
    ("PNG", lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"), _png),
    ("JPEG", lambda d: d.startswith(b"\xff\xd8\xff"), _jpeg),
    ("BMP", lambda d: d.startswith(b"BM"), _bmp),
    ("GIF", lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif),
    ("WebP", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    ("TIFF", lambda d: d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff),
    ("PNM", lambda d: re.match(rb"P[1-7]\s", d[:3]) is not None, _pnm),
    ("PFM", lambda d: re.match(rb"P[Ff]\s", d[:3]) is not None, _pnm),
    ("Sun raster", lambda d: d.startswith(b"\x59\xa6\x6a\x95"), _sun_raster),
    ("Radiance HDR", lambda d: d.startswith((b"#?RADIANCE", b"#?RGBE")), _radiance),
    ("JPEG 2000", lambda d: d.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"), _jp2),
    ("JPEG 2000 codestream", lambda d: d.startswith(b"\xff\x4f\xff\x51"), _j2k),
    ("AVIF", lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"avif", b"avis"), _avif),
)
READABLE_FORMATS = tuple(name for name, _, _ in _FORMATS)


def image_header(data: bytes, what: str = "image") -> tuple[str, int, int]:
    """(format, width, height) read from the header alone; InputError when the format is not one
    camrt reads or its header is damaged."""
    for name, matches, read in _FORMATS:
        if matches(data):
            try:
                width, height = read(data)
            except _BadHeader as exc:
                raise InputError(f"{what}: cannot decode: damaged {name} header ({exc})") from None
            if width <= 0 or height <= 0:
                raise InputError(f"{what}: cannot decode: the {name} header gives an empty image ({width}x{height})")
            return name, int(width), int(height)
    raise InputError(
        f"{what}: cannot decode: not an image format camrt reads ({', '.join(READABLE_FORMATS)}); "
        "formats are recognised by content, not by the file name"
    )


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
