"""D-RISE: saliency of one detection from randomly masked forward passes, no gradient.

Petsiuk, Jain, Manjunatha, Morariu, Mehra, Ordonez, Saenko, "Black-box Explanation of Object
Detectors via Saliency Maps", CVPR 2021 (arXiv:2006.03204), sec. 3. A detection is
d = [L, O, P] (box, objectness, class probabilities; eq. 1). The similarity of the target d_t to a
detection d_j is (eq. 2)

    s(d_t, d_j) = IoU(L_t, L_j) * (P_t . P_j) / (|P_t| |P_j|) * O_j

each random mask M_i gets the weight of its masked pass's best match (sec. 3.2)

    w_i = max_{d_j in f(I o M_i)} s(d_t, d_j)

and the saliency map is the weighted sum of the masks (sec. 3.2, as RISE's)

    H = sum_i w_i M_i

The masks are RISE's (Petsiuk, Das, Saenko, BMVC 2018, sec. 3.2): N binary grids s x s, each cell 1
with probability p, upsampled bilinearly to (s + 1) * ceil(H/s) x (s + 1) * ceil(W/s) and cropped
at a random shift in [0, ceil(H/s)) x [0, ceil(W/s)) to H x W (`rise_masks`).

In camrt the target is a box target (`--target box:x1,y1,x2,y2[:label]` with its format and layout,
camrt.seeds.targets.BoxScoreTarget); the detections are every candidate of the raw head of each
masked pass (camrt.seeds.boxes.detection_similarity). P_t is the one-hot of the label; with no
label, the class scores of the unmasked input's candidate of highest IoU with the box. The heads
camrt reads (YOLOv8, torchvision's decoded heads) carry no objectness, so O_j = 1. The masks apply
to the model input after normalisation (zero: the mean colour), as Score-CAM's do. Equation numbers
follow the arXiv version as recalled; the paper could not be read offline to confirm them.

Cost: n_masks forward passes of the file (only its forward subgraph: no gradient, no seed is read),
batch_size at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..hookspecs import hookimpl
from ..postprocess import upsample
from ..seeds import boxes
from ..seeds.targets import BoxScoreTarget
from .base import BatchOptions, GraphOutputs, Method, Requirements


@dataclass(frozen=True)
class DRISEOptions(BatchOptions):
    """n_masks random masks of a grid x grid grid, each cell kept with probability keep; seed of their
    random stream; batch_size masked inputs per pass."""

    n_masks: int = 1000
    grid: int = 16
    keep: float = 0.5
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {self.n_masks}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")


@dataclass(frozen=True)
class MaskPlan:
    """The random draws of n RISE masks: binary grids [n, s, s] and crop offsets [n, 2]."""

    grids: np.ndarray
    shifts: np.ndarray


def draw_masks(n: int, size: tuple[int, int], grid: int, keep: float, seed: int) -> MaskPlan:
    """The random part of `n` RISE masks for an input of `size`, from one seeded stream."""
    rng = np.random.default_rng(seed)
    cell = (-(-size[0] // grid), -(-size[1] // grid))
    grids = (rng.random((n, grid, grid)) < keep).astype(np.float32)
    shifts = np.stack([rng.integers(0, cell[0], n), rng.integers(0, cell[1], n)], axis=1)
    return MaskPlan(grids, shifts)


def rise_masks(plan: MaskPlan, rows: slice, size: tuple[int, int]) -> np.ndarray:
    """Masks [k, H, W] float32 in [0, 1] of `plan`'s rows: each grid upsampled to (s + 1) cells, cropped."""
    grid = plan.grids.shape[1]
    cell = (-(-size[0] // grid), -(-size[1] // grid))
    upsampled = upsample(plan.grids[rows], ((grid + 1) * cell[0], (grid + 1) * cell[1]))
    return np.stack([mask[dy:dy + size[0], dx:dx + size[1]] for mask, (dy, dx) in zip(upsampled, plan.shifts[rows])])


class DRISE(Method):
    """D-RISE: masks weighted by how well each masked pass still detects the target box (Petsiuk et al. 2021)."""

    name = "d-rise"
    aliases = ("drise",)
    requires = Requirements(extra_passes=True)
    #: Its passes read the box target itself (`ExplainContext.target`), never camrt/target.
    scores_seeded_targets = True
    target_kinds = ("box",)
    Options = DRISEOptions

    def explain(self, outputs: GraphOutputs, *, layer: str | None) -> np.ndarray:
        context = outputs.require_context(self.name)
        target = context.target
        if not isinstance(target, BoxScoreTarget):
            raise UsageError(f"method {self.name!r} explains a detection: give --target box:x1,y1,x2,y2[:label] "
                             "(a file exported with --seed whose score is a raw detection head)")
        x = outputs.inputs
        size = x.shape[2:]
        options = self.options
        plan = draw_masks(options.n_masks, size, options.grid, options.keep, options.seed)
        unmasked = outputs.logits
        maps = np.zeros((x.shape[0], *size), dtype=np.float64)
        for b in range(x.shape[0]):
            classes = self.target_classes(target, unmasked[b:b + 1])
            for start in range(0, options.n_masks, options.batch_size):
                masks = rise_masks(plan, slice(start, start + options.batch_size), size)
                heads = context.forward(x[b][None] * masks[:, None])
                weights = boxes.detection_similarity(heads, target.box, classes, target.box_format, target.layout)
                maps[b] += np.tensordot(weights, masks, axes=1)
        return maps.astype(np.float32)

    @staticmethod
    def target_classes(target, head: np.ndarray) -> np.ndarray:
        """P_t [C]: the label's one-hot, or (no label) the class scores of the candidate of `head`
        [1, ...] whose box has the highest IoU with the target box."""
        rows = boxes.candidates_last(head, target.layout)[0].astype(np.float64)
        if target.label is not None:
            return np.eye(rows.shape[0] - 4)[target.label]
        return rows[4:, int(boxes.detection_iou(rows, target.box, target.box_format).argmax())]


@hookimpl
def register_methods(register):
    register(DRISE)
