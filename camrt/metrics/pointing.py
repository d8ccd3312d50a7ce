"""The pointing game.

Zhang, Bargal, Lin, Brandt, Shen, Sclaroff, "Top-Down Neural Attention by Excitation Backprop",
IJCV 2018 (ECCV 2016), sec. 5.1: a *hit* when the map's maximum lies on a ground-truth box of the
explained class, with a tolerance of 15 pixels; the accuracy is hits / (hits + misses).

camrt takes the first maximum of the heatmap in raster order at the model input's resolution,
maps its pixel centre to the original image's pixels (the preprocessing resizes without cropping)
and counts a hit when its Euclidean distance to a box (x0, y0, x1, y1 in image pixels, edges
included) is at most ``tolerance``. Images without a box for the explained class get None.

Box files (``--boxes FILE``), keyed by the input as given on the command line or by its file name:
- JSON: ``{"cat.jpg": [[x0, y0, x1, y1], ...]}`` or ``{"cat.jpg": [{"box": [x0, y0, x1, y1],
  "class": 285}, ...]}``;
- CSV with a header: ``image,x0,y0,x1,y1`` and optionally ``class``.
A box with a class (an index, or a label of the model's labels) counts only when it is the
explained class; a box without one always counts.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, UsageError
from ..hookspecs import hookimpl
from .base import HIGHER, EvalBatch, Metric


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None  # a class index or name, as text; None: any class

    def distance(self, x: float, y: float) -> float:
        dx = max(self.x0 - x, 0.0, x - self.x1)
        dy = max(self.y0 - y, 0.0, y - self.y1)
        return float(np.hypot(dx, dy))


def _box(values: Any, label: Any, where: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{where}: a box must be four numbers x0, y0, x1, y1, got {values!r}") from None
    if x1 < x0 or y1 < y0:
        raise InputError(f"{where}: box {values!r} has x1 < x0 or y1 < y0")
    return Box(x0, y0, x1, y1, None if label in (None, "") else str(label).strip())


def load_boxes(path: str) -> dict[str, list[Box]]:
    """Boxes by image key from a JSON or CSV file (see the module's docstring)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except OSError as exc:
        raise UsageError(f"--boxes {path}: cannot read: {exc.strerror or exc}") from None
    boxes: dict[str, list[Box]] = {}
    if path.lower().endswith(".json") or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--boxes {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--boxes {path}: expected an object mapping image names to lists of boxes")
        for key, items in data.items():
            where = f"--boxes {path}, image {key!r}"
            if not isinstance(items, list):
                raise UsageError(f"{where}: expected a list of boxes")
            boxes[key] = [_box(item.get("box"), item.get("class"), where) if isinstance(item, dict) else _box(item, None, where)
                          for item in items]
        return boxes
    reader = csv.DictReader(text.splitlines())
    missing = {"image", "x0", "y0", "x1", "y1"} - set(reader.fieldnames or ())
    if missing:
        raise UsageError(f"--boxes {path}: the CSV header lacks {', '.join(sorted(missing))} "
                         "(expected image,x0,y0,x1,y1[,class])")
    for number, row in enumerate(reader, start=2):
        boxes.setdefault(row["image"], []).append(
            _box([row[k] for k in ("x0", "y0", "x1", "y1")], row.get("class"), f"--boxes {path}, line {number}"))
    return boxes


def max_point(heatmap: np.ndarray, image_size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) in image pixels of the heatmap's first maximum (raster order)."""
    h, w = heatmap.shape
    row, col = divmod(int(np.argmax(heatmap)), w)
    height, width = image_size
    return (col + 0.5) * width / w - 0.5, (row + 0.5) * height / h - 0.5


@dataclass(frozen=True)
class PointingOptions:
    """boxes: a JSON or CSV file of ground-truth boxes (camrt eval --boxes); tolerance: in image pixels."""

    boxes: str = ""
    tolerance: float = 15.0


class PointingGame(Metric):
    """The pointing game (Zhang et al., IJCV 2018): a hit when the map's maximum falls within 15 pixels of a box of the explained class."""

    name = "pointing"
    aliases = ("pointing-game",)
    fields = {"pointing_game": HIGHER}
    Options = PointingOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        if not self.options.boxes:
            raise UsageError("metric 'pointing' needs ground-truth boxes: camrt eval ... --boxes FILE (JSON or CSV)")
        self.boxes = load_boxes(self.options.boxes)

    def evaluate(self, batch: EvalBatch) -> list[dict[str, Any]]:
        labels = batch.explainer.info.labels if batch.explainer is not None else None
        results = []
        for i in range(len(batch)):
            name = batch.names[i] if i < len(batch.names) else ""
            found = self.boxes.get(name, self.boxes.get(os.path.basename(name), []))
            target = int(batch.targets[i])
            names = {str(target), *([labels[target]] if labels and 0 <= target < len(labels) else [])}
            relevant = [box for box in found if box.label is None or box.label in names]
            if not relevant:
                results.append({"pointing_game": None})
                continue
            size = batch.images[i].shape[:2] if i < len(batch.images) else batch.heatmaps.shape[1:]
            x, y = max_point(batch.heatmaps[i], size)
            hit = min(box.distance(x, y) for box in relevant) <= self.options.tolerance
            results.append({"pointing_game": float(hit), "pointing_point": [round(x, 2), round(y, 2)]})
        return results


@hookimpl
def register_metrics(register):
    register(PointingGame)
