"""Box seeds for raw (pre-NMS) detection heads: L = sum over the candidates matching a box of IoU x score.

A YOLO-style head (ultralytics' export) outputs [B, 4 + C, N]: for each of N candidates a box
(rows 0..3; cx, cy, w, h in input pixels, or x1, y1, x2, y2) and C class scores; other heads
(YOLOv5, a torchvision detector's decoded head) put the candidates first, [B, N, 4 + C]
(`layout="candidates-first"`). For a requested
box b and label l, every candidate k whose IoU with b exceeds the threshold and whose label (the
argmax of its class scores) is l contributes IoU(b, box_k) * score_k[l] (D-RISE's similarity with
its IoU and class terms, Petsiuk et al. 2021, eq. 3; pytorch-grad-cam's `FasterRCNNBoxScoreTarget`
matches the same way). The seed is dL/d(head output): IoU_k at score_k[l], and score_k[l] *
dIoU/d(box_k) at the box rows: like pytorch-grad-cam, whose torchvision `box_iou` of the model's
output boxes is differentiated, the IoU is not held constant (`iou_constant=True` holds it). The
candidate selection (threshold, label) is piecewise constant and has no derivative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .batch import SeedBatch

BOX_FORMATS = ("cxcywh", "xyxy")
#: [B, 4 + C, N] (ultralytics) and [B, N, 4 + C] (YOLOv5, torchvision heads decoded in a wrapper).
CANDIDATES_LAST, CANDIDATES_FIRST = "candidates-last", "candidates-first"
BOX_LAYOUTS = (CANDIDATES_LAST, CANDIDATES_FIRST)


@dataclass(frozen=True)
class BoxTarget:
    """A box (x1, y1, x2, y2 in input pixels) in image `sample`, and its label (None: any label)."""

    sample: int
    box: tuple[float, float, float, float]
    label: int | None = None


def _as_xyxy(rows: np.ndarray, box_format: str) -> np.ndarray:
    """[4, N] candidate boxes in x1, y1, x2, y2."""
    if box_format == "xyxy":
        return rows
    cx, cy, w, h = rows
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def iou_and_gradient(box: Sequence[float], candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU [N] of `box` (x1, y1, x2, y2) with candidates [4, N] (x1, y1, x2, y2), and dIoU/d candidates [4, N]."""
    ax1, ay1, ax2, ay2 = (float(v) for v in box)
    bx1, by1, bx2, by2 = candidates
    iw = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
    ih = np.minimum(ay2, by2) - np.maximum(ay1, by1)
    overlaps = (iw > 0) & (ih > 0)
    inter = np.where(overlaps, iw * ih, 0.0)
    bw, bh = bx2 - bx1, by2 - by1
    union = (ax2 - ax1) * (ay2 - ay1) + bw * bh - inter
    iou = inter / union
    d_inter = (union + inter) / union ** 2  # d(inter / union) / d inter, union depending on inter too
    d_area = -inter / union ** 2
    grad_inter = np.stack([-ih * (bx1 > ax1), -iw * (by1 > ay1), ih * (bx2 < ax2), iw * (by2 < ay2)])
    grad_area = np.stack([-bh, -bw, bh, bw])
    return iou, np.where(overlaps, d_inter * grad_inter + d_area * grad_area, 0.0)


def _checked_boxes(rows: np.ndarray, box_format: str) -> np.ndarray:
    """The candidates' boxes [4, N] in x1, y1, x2, y2; InputError when one has a negative extent,
    which no decoded head makes: the head is read in the wrong box format or layout."""
    corners = _as_xyxy(rows, box_format)
    inverted = int(((corners[2] < corners[0]) | (corners[3] < corners[1])).sum())
    if inverted:
        raise InputError(f"{inverted} of {corners.shape[1]} candidate boxes have x2 < x1 or y2 < y1 when the head is read "
                         f"as {box_format} boxes: check the box format and layout (--box-format, --box-layout)")
    return corners


def _xyxy_gradient_to(grad: np.ndarray, box_format: str) -> np.ndarray:
    """A gradient with respect to x1, y1, x2, y2 as one with respect to the head's box rows."""
    if box_format == "xyxy":
        return grad
    g1x, g1y, g2x, g2y = grad
    return np.stack([g1x + g2x, g1y + g2y, (g2x - g1x) / 2, (g2y - g1y) / 2])


def check_iou_threshold(iou_threshold: float) -> None:
    if not 0 <= iou_threshold < 1:
        raise InputError(f"the box IoU threshold must be in [0, 1) (a candidate matches when its IoU exceeds it), "
                         f"got {iou_threshold}")


def check_box_format(box_format: str) -> None:
    if box_format not in BOX_FORMATS:
        raise InputError(f"box format {box_format!r}: choose one of {', '.join(BOX_FORMATS)}")


def check_layout(layout: str) -> None:
    if layout not in BOX_LAYOUTS:
        raise InputError(f"box head layout {layout!r}: choose one of {', '.join(BOX_LAYOUTS)}")


def check_box_options(iou_threshold: float, box_format: str, layout: str) -> None:
    """InputError naming the bad option: IoU threshold in [0, 1), a known box format and layout."""
    check_iou_threshold(iou_threshold)
    check_box_format(box_format)
    check_layout(layout)


def candidates_last(head: np.ndarray, layout: str) -> np.ndarray:
    """A head [B, 4 + C, N] (a view) from a head in `layout`; InputError unless it is a raw head."""
    given = np.asarray(head)
    head = given.transpose(0, 2, 1) if given.ndim == 3 and layout == CANDIDATES_FIRST else given
    if head.ndim != 3 or head.shape[1] < 5:
        shape = "[batch, candidates, 4 + classes]" if layout == CANDIDATES_FIRST else "[batch, 4 + classes, candidates]"
        raise InputError(f"box targets of layout {layout} need a raw detection head {shape}, got {given.shape} "
                         f"(layouts: {', '.join(BOX_LAYOUTS)})")
    return head


def box_score(head: np.ndarray, target: BoxTarget, iou_threshold: float = 0.5,
              box_format: str = "cxcywh", layout: str = CANDIDATES_LAST) -> float:
    """L of one target on a head output in `layout` (float64), for reporting and tests."""
    check_box_options(iou_threshold, box_format, layout)
    return float(_matched(candidates_last(head, layout), target, iou_threshold, box_format)[0])


def _matched(head: np.ndarray, target: BoxTarget, iou_threshold: float, box_format: str):
    """(L, seed row [4 + C, N]) of one target on a head [B, 4 + C, N]."""
    head = np.asarray(head, dtype=np.float64)
    if not 0 <= target.sample < head.shape[0]:
        raise InputError(f"box target of image {target.sample}: the batch has {head.shape[0]} images")
    rows = head[target.sample]
    scores = rows[4:]
    labels = scores.argmax(axis=0)
    if target.label is not None and not 0 <= target.label < scores.shape[0]:
        raise InputError(f"box label {target.label} out of range 0..{scores.shape[0] - 1}")
    iou, d_iou = iou_and_gradient(target.box, _checked_boxes(rows[:4], box_format))
    label = labels if target.label is None else np.full_like(labels, target.label)
    matched = (iou > iou_threshold) & (labels == label)
    candidates = np.flatnonzero(matched)
    score = scores[label[candidates], candidates]
    seed = np.zeros_like(rows)
    seed[4 + label[candidates], candidates] = iou[candidates]
    return float((iou[candidates] * score).sum()), seed, candidates, score, d_iou


def box_seed(head: np.ndarray, targets: Sequence[BoxTarget], iou_threshold: float = 0.5,
             box_format: str = "cxcywh", iou_constant: bool = False, layout: str = CANDIDATES_LAST,
             allow_unmatched: bool = False) -> SeedBatch:
    """One seed row per target (several per image allowed: one map per box, one backward pass),
    shaped like the head's rows in `layout`. A box no candidate matches is an error, or with
    `allow_unmatched` a row of zeros (L = 0 there)."""
    check_box_options(iou_threshold, box_format, layout)
    rows = []
    for target in targets:
        _, seed, candidates, score, d_iou = _matched(candidates_last(head, layout), target, iou_threshold, box_format)
        if candidates.size == 0 and not allow_unmatched:
            raise InputError(f"box {list(target.box)} (image {target.sample}, label {target.label}): no candidate has "
                             f"IoU > {iou_threshold} with a matching label; lower the threshold or check the box")
        if not iou_constant:
            seed[:4, candidates] = _xyxy_gradient_to(d_iou[:, candidates] * score, box_format)
        rows.append((seed.T if layout == CANDIDATES_FIRST else seed).astype(np.asarray(head).dtype))
    return SeedBatch(np.stack(rows), np.array([t.sample for t in targets], dtype=np.int64))


def detection_similarity(head: np.ndarray, box: Sequence[float], classes: np.ndarray, box_format: str = "cxcywh",
                         layout: str = CANDIDATES_LAST) -> np.ndarray:
    """D-RISE's similarity of a target detection (box, class vector `classes` [C]) to the best-matching
    candidate of each row of a head [n, ...] in `layout`: max_j IoU(box, box_j) x cos(classes, P_j)
    [n] (Petsiuk et al. 2021, sec. 3.2, eq. 2; without an objectness term: these heads have none)."""
    heads = candidates_last(head, layout).astype(np.float64)
    target = np.asarray(classes, dtype=np.float64)
    similarity = np.empty(len(heads))
    for row, rows in enumerate(heads):
        iou = detection_iou(rows, box, box_format)
        scores = rows[4:]
        norms = np.linalg.norm(scores, axis=0) * np.linalg.norm(target)
        cosine = np.divide(target @ scores, norms, out=np.zeros(scores.shape[1]), where=norms > 0)
        similarity[row] = (iou * cosine).max()
    return similarity


def detection_iou(rows: np.ndarray, box: Sequence[float], box_format: str = "cxcywh") -> np.ndarray:
    """IoU [N] of `box` with the candidates of one head [4 + C, N]."""
    return iou_and_gradient(box, _checked_boxes(rows[:4], box_format))[0]
