"""Built-in renderers (``npy`` heatmap, ``png`` overlay) and the atomic file writer.

Registered through the `register_renderers` hook like any plugin's renderers. A renderer writes one
file at the path it is given; `write_atomic` gives it a temporary path in the destination folder
and moves the finished file into place with ``os.replace``, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from ..hookspecs import hookimpl

#: Weight of the heatmap in the overlay: overlay = alpha * colormap + (1 - alpha) * image.
DEFAULT_ALPHA = 0.5
DEFAULT_COLORMAP = "jet"


def colormap_names() -> list[str]:
    """OpenCV's colormaps (cv2.COLORMAP_<NAME>), lower case: jet, turbo, viridis, inferno, ..."""
    import cv2

    return sorted(name[len("COLORMAP_"):].lower() for name in dir(cv2) if name.startswith("COLORMAP_"))


def colormap_code(name: str) -> int:
    """The cv2.COLORMAP_* constant of `name` (case-insensitive); UsageError listing the names."""
    import cv2

    from ..errors import UsageError

    code = getattr(cv2, f"COLORMAP_{name.strip().upper()}", None)
    if not isinstance(code, int):
        raise UsageError(f"unknown colormap {name!r}; choose one of {', '.join(colormap_names())}")
    return code


def colorize(heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """The colormap of a [0, 1] heatmap as HWC uint8 BGR (cv2.applyColorMap of uint8(255 * h))."""
    import cv2

    scaled = np.uint8(np.clip(heatmap, 0.0, 1.0) * 255)
    return cv2.applyColorMap(scaled, colormap_code(colormap))


def overlay(heatmap: np.ndarray, image: np.ndarray | None, alpha: float = DEFAULT_ALPHA,
            colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """The heatmap's colormap blended over the RGB image, as HWC uint8 BGR (OpenCV's order).

    Without an image the colormap alone. The heatmap must have the image's height and width.
    """
    import cv2

    colored = colorize(heatmap, colormap)
    if image is None:
        return colored
    if image.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} and image {image.shape[:2]} differ in size")
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return cv2.addWeighted(colored, float(alpha), bgr, 1.0 - float(alpha), 0.0)


def encode_overlay_png(heatmap: np.ndarray, image: np.ndarray | None, options: dict) -> bytes:
    """The overlay (`overlay` with the options' alpha and colormap) as PNG bytes."""
    import cv2

    ok, encoded = cv2.imencode(".png", overlay(heatmap, image, options.get("alpha", DEFAULT_ALPHA),
                                            options.get("colormap", DEFAULT_COLORMAP)))
    if not ok:
        raise OSError("OpenCV could not encode the overlay as PNG")
    return encoded.tobytes()


def write_overlay_png(path: str, heatmap: np.ndarray, image: np.ndarray | None, options: dict) -> None:
    data = encode_overlay_png(heatmap, image, options)
    with open(path, "wb") as handle:
        handle.write(data)


def write_heatmap_npy(path: str, heatmap: np.ndarray, image: np.ndarray | None, options: dict) -> None:
    with open(path, "wb") as handle:  # a handle: np.save(path) would append ".npy"
        np.save(handle, np.asarray(heatmap, dtype=np.float32), allow_pickle=False)


def write_atomic(path: str, write: Callable[[str], Any]) -> None:
    """Call write(temp_path) for a temporary file beside `path`, then move it to `path`.

    On any failure the temporary file is removed and the error propagates; `path` is untouched.
    """
    directory, base = os.path.split(os.path.abspath(path))
    suffix = os.path.splitext(base)[1]
    # Not tempfile.mkstemp: its files are private (0600); these get the usual umask-based mode.
    while True:
        temp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp{suffix}")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


@hookimpl
def register_renderers(register):
    register("npy", write_heatmap_npy, suffix=".heatmap.npy", field="heatmap")
    register("png", write_overlay_png, suffix=".overlay.png", field="overlay")


#: Temporary files of `write_atomic`: ".<name>.<12 hex digits>.tmp<suffix>".
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[^.]*)?$")


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the temporary files an interrupted run (killed inside `write_atomic`) left in
    `directory`; return their paths. Only for resuming: a live writer's temporary would go too."""
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if _TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed
