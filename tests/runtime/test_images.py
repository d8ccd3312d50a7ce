"""Image decoding and preprocessing, against the arrays that were encoded and a numpy re-implementation."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from camrt.contract import Preprocessing
from camrt.errors import InputError
from camrt.imaging.decode import decode_image, load_image
from camrt.imaging.preprocess import preprocess
from tests.helpers import random_image, write_image


def test_rgb_png_round_trip(tmp_path, rng):
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    loaded = load_image(write_image(str(tmp_path / "a.png"), rgb))
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, rgb)


def test_rgba_png_drops_alpha(tmp_path, rng):
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    bgra = np.dstack([rgb[:, :, ::-1], alpha])
    path = str(tmp_path / "rgba.png")
    assert cv2.imwrite(path, bgra)
    np.testing.assert_array_equal(load_image(path), rgb)


def test_16bit_png(tmp_path, rng):
    rgb16 = rng.integers(0, 65536, (5, 8, 3), dtype=np.uint16)
    path = str(tmp_path / "deep.png")
    assert cv2.imwrite(path, rgb16[:, :, ::-1])
    np.testing.assert_array_equal(load_image(path), (rgb16 >> 8).astype(np.uint8))
    gray16 = rng.integers(0, 65536, (4, 3), dtype=np.uint16)
    assert cv2.imwrite(path, gray16)
    expected = np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(load_image(path), expected)


def test_grayscale(tmp_path, rng):
    gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    path = str(tmp_path / "gray.png")
    assert cv2.imwrite(path, gray)
    np.testing.assert_array_equal(load_image(path), np.repeat(gray[:, :, None], 3, axis=2))


def test_exif_orientation_is_applied(rng):
    """A JPEG tagged orientation 6 (rotate 90 degrees clockwise) comes out as displayed."""
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white
    ok, jpg = cv2.imencode(".jpg", image)
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\x00" * 4
    payload = b"Exif\x00\x00" + tiff
    data = jpg.tobytes()[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpg.tobytes()[2:]
    decoded = decode_image(data, "exif.jpg")
    assert decoded.shape == (40, 20, 3)
    assert decoded[:20].mean() > 200 and decoded[20:].mean() < 50  # the white half is now on top


def test_bad_files(tmp_path, rng):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not an image")
    good = write_image(str(tmp_path / "good.jpg"), random_image(rng, 32, 32))
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    for path, reason in [(empty, "zero-byte"), (text, "cannot decode"), (truncated, "cannot decode"),
                         (tmp_path / "absent.png", "no such file"), (tmp_path, "not a file")]:
        with pytest.raises(InputError, match=reason) as info:
            load_image(path)
        assert str(path) in str(info.value)


def test_truncated_jpeg_marker_check():
    """OpenCV 4 decodes truncated JPEGs into half-grey images; the marker check refuses them anyway."""
    from camrt.imaging.decode import _jpeg_truncated

    ok, jpg = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    data = jpg.tobytes()
    assert not _jpeg_truncated(data)
    assert _jpeg_truncated(data[:-2])
    assert not _jpeg_truncated(b"\x89PNG....")


def _numpy_preprocess(image: np.ndarray, p: Preprocessing) -> np.ndarray:
    """The contract's formula, written out: x = (pixel * scale - mean) / std per channel, NCHW."""
    channels = image.astype(np.float64)
    if p.channel_order == "bgr":
        channels = channels[:, :, ::-1]
    out = (channels * p.scale - np.array(p.mean)) / np.array(p.std)
    return out.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_preprocess_same_size_no_resampling(rng, order):
    p = Preprocessing(6, 7, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4), scale=1 / 255, channel_order=order)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    x = preprocess([image], p)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, _numpy_preprocess(image, p), rtol=1e-6, atol=1e-6)


def test_preprocess_resizes_without_cropping(rng):
    p = Preprocessing(12, 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0)
    image = rng.integers(0, 256, (30, 17, 3), dtype=np.uint8)
    x = preprocess([image], p)
    resized = cv2.resize(image, (16, 12), interpolation=cv2.INTER_LINEAR)  # the whole image, no crop
    np.testing.assert_array_equal(x[0], resized.transpose(2, 0, 1).astype(np.float32))


def test_preprocess_rejects_non_rgb8():
    p = Preprocessing(4, 4)
    with pytest.raises(InputError, match="HWC uint8 RGB"):
        preprocess([np.zeros((4, 4), np.uint8)], p)
    with pytest.raises(InputError, match="HWC uint8 RGB"):
        preprocess([np.zeros((4, 4, 3), np.float32)], p)
