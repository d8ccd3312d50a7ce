"""PNG figures of an evaluation, drawn with OpenCV (matplotlib is not a runtime dependency).

- `plot_curves`: the deletion and insertion curves of each method on one image, side by side;
- `plot_overlays`: each method's heatmap over the image, one tile per method, with its name.

`CurvePanel.pixel` is the one mapping from (fraction, score) to pixels, so that a test can check
that a curve's pixels lie where its values say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

PANEL_WIDTH, PANEL_HEIGHT = 360, 280
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 30, 78  # margins; the legend sits in the bottom one
TILE = 224
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
#: BGR line colours, one per method in order (Tableau 20: the dark tones, then the light ones).
COLOURS = ((180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140),
           (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23), (232, 199, 174), (120, 187, 255),
           (138, 223, 152), (150, 152, 255), (213, 176, 197), (148, 156, 196), (210, 182, 247), (199, 199, 199),
           (141, 219, 219), (229, 218, 158))
LEGEND_COLUMNS, LEGEND_ROW = 4, 14


def colour(index: int) -> tuple[int, int, int]:
    return COLOURS[index % len(COLOURS)]


@dataclass(frozen=True)
class CurvePanel:
    """One plot area: x (fraction) in [0, 1], y (score) in [low, high]."""

    low: float
    high: float
    x0: int = 0  # the panel's left edge in the figure

    def pixel(self, fraction: float, score: float) -> tuple[int, int]:
        width = PANEL_WIDTH - LEFT - RIGHT
        height = PANEL_HEIGHT - TOP - BOTTOM
        span = (self.high - self.low) or 1.0
        x = self.x0 + LEFT + fraction * width
        y = TOP + (1.0 - (score - self.low) / span) * height
        return int(round(x)), int(round(y))


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.4, color=BLACK) -> None:
    import cv2

    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def score_range(curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]) -> tuple[float, float]:
    """[low, high] covering every curve: [0, 1] widened to the scores (logits may leave it)."""
    values = [v for per_kind in curves.values() for _, scores in per_kind.values() for v in scores]
    return min(0.0, *values), max(1.0, *values)


def plot_curves(path: str, curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                title: str = "") -> None:
    """curves: method -> {"deletion": (fractions, scores), "insertion": (...)} (either may be missing)."""
    import cv2

    kinds = [k for k in ("deletion", "insertion") if any(k in c for c in curves.values())]
    if not kinds:
        raise ValueError("no deletion or insertion curves to plot")
    low, high = score_range(curves)
    rows = -(-len(curves) // LEGEND_COLUMNS)
    extra = max(0, rows - 4) * LEGEND_ROW  # the bottom margin holds four legend rows
    canvas = np.full((PANEL_HEIGHT + extra, PANEL_WIDTH * len(kinds), 3), 255, np.uint8)
    for k, kind in enumerate(kinds):
        panel = CurvePanel(low, high, x0=k * PANEL_WIDTH)
        (left, top), (right, bottom) = panel.pixel(0, high), panel.pixel(1, low)
        cv2.rectangle(canvas, (left, top), (right, bottom), GREY, 1)
        for tick in (0.0, 0.5, 1.0):
            x, _ = panel.pixel(tick, low)
            _text(canvas, f"{tick:g}", (x - 8, bottom + 14))
        for value in (low, (low + high) / 2, high):
            _, y = panel.pixel(0, value)
            _text(canvas, f"{value:.2f}", (panel.x0 + 4, y + 4))
        _text(canvas, f"{kind} {title}".strip(), (left, TOP - 10), 0.5)
        for m, (method, per_kind) in enumerate(curves.items()):
            if kind not in per_kind:
                continue
            fractions, scores = per_kind[kind]
            points = np.array([panel.pixel(f, s) for f, s in zip(fractions, scores)], np.int32)
            cv2.polylines(canvas, [points], False, colour(m), 2, cv2.LINE_AA)
    for m, method in enumerate(curves):  # the legend, under the panels
        x, y = 10 + (m % LEGEND_COLUMNS) * 170, PANEL_HEIGHT - BOTTOM + 34 + (m // LEGEND_COLUMNS) * LEGEND_ROW
        cv2.line(canvas, (x, y - 4), (x + 18, y - 4), colour(m), 2)
        _text(canvas, method, (x + 24, y))
    _write_png(path, canvas)


def plot_overlays(path: str, image: np.ndarray, heatmaps: Mapping[str, np.ndarray], title: str = "") -> None:
    """image: HWC uint8 RGB; heatmaps: method -> [H, W] in [0, 1] (any size: resized to the tiles)."""
    import cv2

    from ..imaging.render import overlay

    if not heatmaps:
        raise ValueError("no heatmaps to plot")
    tiles = []
    base = cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)
    for name, heatmap in [("image", None), *heatmaps.items()]:
        tile = cv2.cvtColor(base, cv2.COLOR_RGB2BGR) if heatmap is None else overlay(
            cv2.resize(np.asarray(heatmap, np.float32), (TILE, TILE), interpolation=cv2.INTER_LINEAR), base)
        framed = np.full((TILE + 22, TILE, 3), 255, np.uint8)
        framed[22:] = tile
        _text(framed, name if heatmap is not None or not title else title, (4, 15), 0.45)
        tiles.append(framed)
    _write_png(path, np.concatenate(tiles, axis=1))


def _write_png(path: str, canvas: np.ndarray) -> None:
    import cv2

    from ..imaging.render import write_atomic

    ok, encoded = cv2.imencode(".png", canvas)
    if not ok:
        raise OSError(f"OpenCV could not encode {path} as PNG")

    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            handle.write(encoded.tobytes())

    write_atomic(path, write)
