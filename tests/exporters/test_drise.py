"""D-RISE (camrt/methods/drise.py): with a fixed mask set, its map is the paper's formula
(Petsiuk et al. 2021: H = sum_i w_i M_i, w_i = max_j IoU(L_t, L_j) cos(P_t, P_j)) computed
independently in torch float64 (torchvision's box_iou, torch's cosine similarity, the torch model's
own outputs) on the same masks; and on a toy detector a box on an object lights up the object.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract

torch = pytest.importorskip("torch")

SIZE = (64, 64)
OBJECT = (16, 16, 32, 32)  # x1, y1, x2, y2 of the object, one of the detector's windows


class WindowDetector(torch.nn.Module):
    """A raw head [B, 4 + 2, 49]: candidates are the 16x16 windows at stride 8 (cx, cy, w, h), class 0
    scores sigmoid(8 (mean of the window's red channel - 0.5)), class 1 its complement."""

    def __init__(self):
        super().__init__()
        self.feat = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.feat.weight.zero_()
            self.feat.weight[0, 0] = 8.0
            self.feat.weight[1, 0] = -8.0
            self.feat.bias.copy_(torch.tensor([-4.0, 4.0]))
        self.pool = torch.nn.AvgPool2d(16, 8)
        corners = torch.arange(7, dtype=torch.float32) * 8
        gy, gx = torch.meshgrid(corners, corners, indexing="ij")
        boxes = torch.stack([gx + 8, gy + 8, torch.full_like(gx, 16), torch.full_like(gy, 16)]).flatten(1)
        self.register_buffer("boxes", boxes)

    def forward(self, x):
        scores = torch.sigmoid(self.pool(self.feat(x))).flatten(2)
        return torch.cat([self.boxes.to(x.dtype).expand(x.shape[0], 4, -1), scores], 1)


@pytest.fixture(scope="module")
def window_detector(tmp_path_factory):
    from camrt_exporters.export import export_torch, write_model

    model = WindowDetector().eval()
    onnx_model, _ = export_torch(model, layers=["feat"], input_size=SIZE, rules=[contract.RULE_VANILLA], seed=True)
    path = tmp_path_factory.mktemp("window") / "window.camrt.onnx"
    write_model(onnx_model, path)
    return model, str(path)


def _images():
    """Two images: background noise, the object (red 1) in OBJECT; the second has a second object."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, *SIZE)) * 0.1).astype(np.float32)
    x1, y1, x2, y2 = OBJECT
    x[:, 0, y1:y2, x1:x2] += 1.0
    x[1, 0, 40:56, 40:56] += 1.0
    return x


def _reference_drise(model, x, masks, box, label):
    """H = sum_i w_i M_i, w_i = max_j IoU(box, box_j) cos(P_t, P_j), in torch float64 (P_t: the
    label's one-hot, or the class scores of the unmasked input's highest-IoU candidate)."""
    from torchvision.ops import box_convert, box_iou

    model = model.double()
    masks = torch.from_numpy(masks).double()
    target = torch.tensor([box], dtype=torch.float64)
    maps = []
    with torch.no_grad():
        for image in torch.from_numpy(x).double():
            unmasked = model(image[None])[0]
            iou0 = box_iou(target, box_convert(unmasked[:4].T, "cxcywh", "xyxy"))[0]
            classes = (torch.eye(unmasked.shape[0] - 4, dtype=torch.float64)[label] if label is not None
                       else unmasked[4:, int(iou0.argmax())])
            heads = model(image[None] * masks[:, None])
            weights = []
            for head in heads:
                iou = box_iou(target, box_convert(head[:4].T, "cxcywh", "xyxy"))[0]
                cosine = torch.nn.functional.cosine_similarity(classes[:, None], head[4:], dim=0)
                weights.append((iou * cosine).max())
            maps.append((torch.stack(weights)[:, None, None] * masks).sum(0).numpy())
    model.float()
    return maps


@pytest.mark.parametrize("label", [0, None])
def test_drise_is_the_papers_formula_on_the_same_masks(window_detector, label):
    from camrt.explainer import Explainer
    from camrt.methods.drise import draw_masks, rise_masks
    from camrt.postprocess import finalize
    from camrt.seeds.targets import BoxScoreTarget

    model, path = window_detector
    x = _images()
    options = {"n_masks": 60, "grid": 8, "keep": 0.5, "seed": 3, "batch_size": 16}
    got = Explainer(path, method="d-rise", **options).explain(x, targets=BoxScoreTarget(OBJECT, label))
    masks = rise_masks(draw_masks(60, SIZE, 8, 0.5, 3), slice(0, 60), SIZE)
    assert masks.shape == (60, *SIZE) and 0.3 < masks.mean() < 0.7
    for b, reference in enumerate(_reference_drise(model, x, masks, OBJECT, label)):
        diff = float(np.abs(got[b].heatmap - finalize([reference], SIZE)).max())
        print(f"d-rise label {label} image {b}: max diff {diff:.2e}")
        assert np.ptp(reference) > 0 and diff <= 1e-6
        assert got[b].record()["target_kind"] == "box"


def test_drise_lights_up_the_object_in_the_box(window_detector):
    """A box on the object: the map's mean inside the object is over twice its mean outside, and
    its maximum lies inside; the second image's other object stays dark."""
    from camrt.explainer import Explainer
    from camrt.seeds.targets import BoxScoreTarget

    _, path = window_detector
    got = Explainer(path, method="drise", n_masks=300, grid=8).explain(_images(), targets=BoxScoreTarget(OBJECT, 0))
    x1, y1, x2, y2 = OBJECT
    for b, explanation in enumerate(got):
        heatmap = explanation.heatmap
        inside = np.zeros(SIZE, bool)
        inside[y1:y2, x1:x2] = True
        ratio = heatmap[inside].mean() / heatmap[~inside].mean()
        print(f"d-rise image {b}: inside/outside mean {ratio:.1f}")
        assert ratio > 2
        assert inside[np.unravel_index(heatmap.argmax(), SIZE)]
        if b == 1:
            assert heatmap[40:56, 40:56].mean() < heatmap[inside].mean() / 3


def test_drise_needs_a_box_target_and_no_gradient(window_detector, tiny):
    """A class target is refused naming --target box: (of a detection head by the Explainer, as for every
    method; of a classifier by D-RISE); D-RISE fetches no gradient (forward passes only)."""
    from camrt.errors import UsageError
    from camrt.explainer import Explainer

    _, path = window_detector
    explainer = Explainer(path, method="d-rise", n_masks=4)
    assert not any(name.startswith((contract.GRADIENT_PREFIX, contract.INPUT_GRADIENT_PREFIX))
                   for name in explainer.fetch)
    with pytest.raises(UsageError, match=r"is \[batch, 6, 49\], not class scores.*box:X1,Y1,X2,Y2"):
        explainer.explain(_images()[:1], targets=0)
    with pytest.raises(UsageError, match=r"method 'd-rise' explains a detection: give --target box:"):
        Explainer(tiny.path, method="d-rise", n_masks=4).explain(
            np.zeros((1, 3, tiny.preprocessing.height, tiny.preprocessing.width), np.float32))
    with pytest.raises(UsageError, match=r"method 'd-rise': bad options: keep must be in \(0, 1\]"):
        Explainer(path, method="d-rise", keep=0)
