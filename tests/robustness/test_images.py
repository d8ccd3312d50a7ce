"""Bad, odd and hostile image files: each one decodes to the pixels its bytes specify (checked
against arrays encoded byte by byte in encoders.py, or against OpenCV's decode of the same
bitstream) or is refused with an InputError naming the file and the reason."""

from __future__ import annotations

import os
import shutil
import tempfile

import cv2
import numpy as np
import pytest

from camrt.errors import InputError, UsageError
from camrt.imaging import decode as image_decoding
from camrt.imaging.decode import DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV, decode_image, load_image
from camrt.imaging.headers import image_header

from .encoders import GRAY, GRAY_ALPHA, PALETTE, RGB, RGBA, exif_orientation, jpeg_with_exif, oriented, png, png_header
from .tally import refused


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# --- layouts that work -------------------------------------------------------------------------


def test_layouts_decode_to_the_pixels_the_bytes_specify(tmp_path, rng):
    """Gray (1, 8, 16 bit), gray + alpha, RGB, RGBA (8, 16 bit), palette (4, 8 bit, with tRNS):
    alpha dropped, 16-bit samples >> 8, gray repeated into three channels."""
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    bits = rng.integers(0, 2, (5, 9), dtype=np.uint8)
    rgba16 = rng.integers(0, 65536, (5, 7, 4), dtype=np.uint16)
    gray16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    gray_alpha = rng.integers(0, 256, (5, 7, 2), dtype=np.uint8)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (5, 7), dtype=np.uint8)
    three = lambda g: np.repeat(g[:, :, None], 3, axis=2)  # noqa: E731
    cases = {
        "rgb.png": (png(rgb, RGB), rgb),
        "rgba.png": (png(np.dstack([rgb, gray]), RGBA), rgb),
        "rgba16.png": (png(rgba16, RGBA, 16), (rgba16[:, :, :3] >> 8).astype(np.uint8)),
        "gray.png": (png(gray, GRAY), three(gray)),
        "gray1bit.png": (png(bits, GRAY, 1), three(bits * 255)),
        "gray16.png": (png(gray16, GRAY, 16), three((gray16 >> 8).astype(np.uint8))),
        "gray_alpha.png": (png(gray_alpha, GRAY_ALPHA), three(gray_alpha[:, :, 0])),
        "palette8.png": (png(indices, PALETTE, 8, palette=palette), palette[indices]),
        "palette4.png": (png(indices, PALETTE, 4, palette=palette), palette[indices]),
        "palette_trns.png": (png(indices, PALETTE, 8, palette=palette, transparency=bytes(range(0, 256, 16))),
                             palette[indices]),
    }
    for name, (data, expected) in cases.items():
        loaded = load_image(_write(tmp_path / name, data))
        assert loaded.dtype == np.uint8 and loaded.flags.c_contiguous, name
        np.testing.assert_array_equal(loaded, expected, err_msg=name)


def test_one_pixel_image_is_explained(tiny, tmp_path):
    """A 1x1 image resizes to a constant model input: its target is the top-1 of that constant
    image in the numpy re-implementation, and its heatmap is 1x1 (min-max of one value: 0)."""
    from camrt.explainer import Explainer
    from camrt.imaging.preprocess import preprocess
    from tests.helpers import HEIGHT, WIDTH, numpy_forward

    pixel = np.array([[[200, 30, 90]]], np.uint8)
    loaded = load_image(_write(tmp_path / "one.png", png(pixel, RGB)))
    np.testing.assert_array_equal(loaded, pixel)
    result = Explainer(tiny.path, device="cpu").explain([loaded])[0]
    constant = np.broadcast_to(pixel, (HEIGHT, WIDTH, 3)).copy()
    logits = numpy_forward(tiny, preprocess([constant], tiny.preprocessing))["logits"][0]
    assert result.target == int(logits.argmax())
    assert result.heatmap.shape == (1, 1) and result.heatmap[0, 0] == 0.0


def test_file_name_extension_does_not_matter(tmp_path, rng):
    """Formats are recognised by content: PNG bytes named .jpg and JPEG bytes named .png or .txt."""
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(_write(tmp_path / "really_png.jpg", png(rgb, RGB))), rgb)
    ok, jpg = cv2.imencode(".jpg", rgb[:, :, ::-1])
    reference = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    for name in ("really_jpeg.png", "really_jpeg.txt"):
        np.testing.assert_array_equal(load_image(_write(tmp_path / name, jpg.tobytes())), reference)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_jpeg_and_png(rng, orientation):
    """camrt shows the image as a viewer does (like cv2.imread's default): the decode of a tagged
    file equals the untagged decode transformed as CIPA DC-008 defines the tag."""
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    tagged, plain = jpeg_with_exif(rgb[:, :, ::-1].copy(), orientation)
    reference = decode_image(plain)
    np.testing.assert_array_equal(decode_image(tagged), oriented(reference, orientation))
    np.testing.assert_array_equal(decode_image(png(rgb, RGB, exif=exif_orientation(orientation))),
                                  oriented(rgb, orientation))


# --- files that are refused ----------------------------------------------------------------------


def test_damaged_and_non_image_files_are_refused_naming_file_and_reason(tmp_path, rng):
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    good_png = png(rgb, RGB)
    ok, jpg = cv2.imencode(".jpg", rgb)
    jpg = jpg.tobytes()
    cases = {
        "empty.png": (b"", "zero-byte file"),
        "text.png": (b"this is not an image\n", "not an image format camrt reads"),
        "random.jpg": (bytes(rng.integers(0, 256, 512, dtype=np.uint8)), "not an image format camrt reads"),
        "model.png": (b"\x08\x07\x12\x04camrt:\x12", "not an image format camrt reads"),
        "document.png": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "not an image format camrt reads"),
        "png_cut_in_header.png": (good_png[:20], "damaged PNG header"),
        "png_cut_in_pixels.png": (good_png[: len(good_png) - 30], "cannot decode"),
        "png_without_pixels.png": (png_header(16, 16), "cannot decode"),
        "png_zero_width.png": (png_header(0, 16), "empty image (0x16)"),
        "jpeg_cut_in_header.jpg": (jpg[:40], "damaged JPEG header"),
        "jpeg_cut_in_scan.jpg": (jpg[:-40], "truncated JPEG"),
        "bmp_cut.bmp": (b"BM" + b"\x00" * 10, "damaged BMP header"),
        "gif_cut.gif": (b"GIF89a\x10", "damaged GIF header"),
        "tiff_bad_offset.tif": (b"II*\x00\xff\xff\xff\x7f", "damaged TIFF header"),
        "pnm_no_size.ppm": (b"P6\n# comment\n", "damaged PNM header"),
    }
    for name, (data, reason) in cases.items():
        path = _write(tmp_path / name, data)
        refused(lambda: load_image(path), InputError, path, reason)


def test_float_samples_are_refused(tmp_path, rng):
    ok, pfm = cv2.imencode(".pfm", rng.random((4, 5, 3), dtype=np.float32))
    path = _write(tmp_path / "float.pfm", pfm.tobytes())
    refused(lambda: load_image(path), InputError, path, "unsupported sample type float32")


def test_paths_that_are_not_regular_files(tmp_path):
    directory = tmp_path / "folder.png"
    directory.mkdir()
    refused(lambda: load_image(directory), InputError, str(directory), "not a file (a directory)")
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "gone.png")
    refused(lambda: load_image(broken), InputError, str(broken), "broken symbolic link", "gone.png")
    refused(lambda: load_image(tmp_path / "absent.png"), InputError, "absent.png", "no such file")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block forever: refused without opening
    refused(lambda: load_image(fifo), InputError, str(fifo), "not a file (a FIFO, socket or device)")
    refused(lambda: load_image("/dev/zero"), InputError, "/dev/zero", "not a file")


def test_swapped_for_a_fifo_after_the_path_check_does_not_block(tmp_path, monkeypatch):
    """The descriptor is opened non-blocking and checked itself (the path check can be raced)."""
    fifo = tmp_path / "raced.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(image_decoding, "require_regular_file", lambda path, error: os.fspath(path))
    refused(lambda: load_image(fifo), InputError, str(fifo), "not a regular file")


def _load_as_nobody(path: str) -> str:
    """load_image(path) in a forked child switched to uid/gid 65534 (nobody): its error message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, try, report, exit without running pytest's teardown
        code = 1
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            try:
                load_image(path)
                message = "loaded"
            except InputError as exc:
                message = str(exc)
            os.write(write_end, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.xfail("the child could not switch to user nobody to test permissions as root")
    return message


def test_unreadable_file(rng):
    """chmod 000. Root reads such files anyway, so as root the load runs in a forked child that
    switched to the unprivileged user `nobody` (the folder is world-traversable, the file not)."""
    folder = tempfile.mkdtemp(prefix="camrt-unreadable-")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "secret.png")
        with open(path, "wb") as handle:
            handle.write(png(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), RGB))
        os.chmod(path, 0)
        if os.geteuid() == 0:
            message = _load_as_nobody(path)
            call = lambda: (_ for _ in ()).throw(InputError(message))  # noqa: E731 - re-raise the child's
        else:
            call = lambda: load_image(path)  # noqa: E731
        refused(call, InputError, path, "cannot read: Permission denied")
    finally:
        shutil.rmtree(folder)


# --- the decompression-bomb guard ----------------------------------------------------------------


def _encodings(rng) -> dict[str, bytes]:
    """One 48x80 image in every format this OpenCV writes (JPEG 2000 and AVIF need that size)."""
    base = cv2.resize(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), (80, 48))
    found = {}
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm", ".pgm", ".pam", ".sr", ".jp2", ".avif", ".gif"):
        try:
            ok, data = cv2.imencode(ext, base[:, :, 0] if ext == ".pgm" else base)
        except cv2.error:
            continue
        if ok:
            found[ext] = data.tobytes()
    return found


def test_header_sizes_equal_the_decoded_sizes_in_every_format(rng):
    """The header reader is checked against OpenCV's own decode, for each format OpenCV writes;
    the limit then refuses exactly the images with more pixels than it allows."""
    found = _encodings(rng)
    assert {".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm"} <= set(found)
    for ext, data in found.items():
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        name, width, height = image_header(data)
        assert (height, width) == decoded.shape[:2], ext
        pixels = width * height
        assert decode_image(data, ext, max_pixels=pixels).shape[:2] == (height, width)
        refused(lambda: decode_image(data, "big" + ext, max_pixels=pixels - 1), InputError,
                "big" + ext, f"{width}x{height} = {pixels} pixels exceeds the limit of {pixels - 1}")


def test_bomb_is_refused_from_the_header_without_decoding(tmp_path, monkeypatch):
    """A 40-byte PNG claiming 100000 x 100000 pixels: refused by the default limit and OpenCV's
    decoder is never called (it would try to allocate 30 GB)."""
    import cv2 as real_cv2

    calls = []
    monkeypatch.setattr(real_cv2, "imdecode", lambda *args: calls.append(args))
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV, raising=False)
    path = _write(tmp_path / "bomb.png", png_header(100_000, 100_000) + b"\x00" * 16)
    refused(lambda: load_image(path), InputError, path, "100000x100000 = 10000000000 pixels exceeds the limit of "
            f"{DEFAULT_MAX_IMAGE_PIXELS}", "decompression-bomb guard")
    for data, what in [(b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03" + b"\x00" * 9, "JPEG 65535x65535"),
                       (b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00" + b"\xff\xff\x00\x00" * 2 + b"\x00" * 28, "BMP")]:
        refused(lambda: decode_image(data, what), InputError, what, "exceeds the limit")
    assert calls == []


def test_limit_from_the_environment_and_the_api(tmp_path, rng, monkeypatch):
    path = _write(tmp_path / "ten.png", png(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), RGB))
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "99")
    refused(lambda: load_image(path), InputError, path, "10x10 = 100 pixels exceeds the limit of 99")
    assert load_image(path, max_pixels=100).shape == (10, 10, 3)  # the argument wins over the environment
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "0")  # 0: no limit
    assert load_image(path).shape == (10, 10, 3)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "a lot")
    refused(lambda: load_image(path), UsageError, MAX_IMAGE_PIXELS_ENV, "'a lot'", "whole number")
    refused(lambda: load_image(path, max_pixels=-1), UsageError, "max_pixels", "-1")
