"""Image headers: (format, width, height) read from the first bytes of a file, without decoding.

Only the formats below are handed to a decoder, recognised by their signature (never by the file
name), and their size is read before any pixel is decoded, so a decompression bomb (a small file
claiming a huge image) is refused without being allocated.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from ..errors import InputError


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
