"""Image files written byte by byte from their specifications (PNG: RFC 2083 / ISO 15948; JPEG
APP1 Exif: CIPA DC-008): independent of OpenCV, so OpenCV's decode can be checked against them."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

#: PNG colour types: 0 gray, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA.
GRAY, RGB, PALETTE, GRAY_ALPHA, RGBA = 0, 2, 3, 4, 6


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, color_type: int = RGB, bit_depth: int = 8) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


def png(samples: np.ndarray, color_type: int, bit_depth: int = 8, palette: np.ndarray | None = None,
        transparency: bytes | None = None, exif: bytes | None = None) -> bytes:
    """samples: [H, W, channels] (or [H, W] of palette indices / gray levels), unsigned integers."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    height, width, _ = samples.shape
    rows = []
    for row in samples:
        if bit_depth < 8:  # pack indices/levels MSB first, rows padded to a byte
            bits = np.unpackbits(row[:, 0].astype(np.uint8)[:, None], axis=1)[:, 8 - bit_depth:]
            rows.append(b"\x00" + np.packbits(bits.reshape(-1)).tobytes())
        else:
            dtype = ">u2" if bit_depth == 16 else np.uint8
            rows.append(b"\x00" + row.astype(dtype).tobytes())  # filter type 0 (None)
    data = png_header(width, height, color_type, bit_depth)
    if palette is not None:
        data += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if transparency is not None:
        data += _chunk(b"tRNS", transparency)
    if exif is not None:
        data += _chunk(b"eXIf", exif)
    return data + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")


def exif_orientation(orientation: int) -> bytes:
    """A big-endian TIFF structure with one IFD entry: Orientation (0x0112, SHORT) = orientation."""
    return (b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00" * 4)


def jpeg_with_exif(bgr: np.ndarray, orientation: int) -> tuple[bytes, bytes]:
    """(the JPEG with an APP1 Exif segment of `orientation` after SOI, the same JPEG without it)."""
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    plain = encoded.tobytes()
    payload = b"Exif\x00\x00" + exif_orientation(orientation)
    return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + plain[2:], plain


def oriented(image: np.ndarray, orientation: int) -> np.ndarray:
    """The stored image as displayed under EXIF `orientation` (CIPA DC-008, tag 0x0112)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=-1)[::-1],
        8: lambda a: np.rot90(a, k=1),
    }[orientation](image)
