"""The LRP methods on seeded targets against zennit 0.5.1 with `attr_output = seed * output`.

The seed is dL/d score of the target, taken from torch autograd of the reference target (pytorch-grad-cam's
`SemanticSegmentationTarget` for `seg:C`, torch's cosine similarity for `similar:`, the box-matched score
sum_k IoU_k score_k with torchvision's `box_iou` for `box:`, the IoU held constant); zennit then
propagates the output relevance seed * output. Files: a small segmentation-style net (Conv-BN-ReLU twice,
a 1x1 Conv head: [B, classes, H, W]), an embedder (the same trunk, average pooling and a Linear layer) and
a YOLO-style detector (the same trunk, a 1x1 Conv head decoded to [B, 4 + classes, H * W] boxes cx, cy,
w, h and sigmoid class scores), exported with `--seed` and the LRP rule sets. Tolerance: lrp_oracle.py's (1e-4 max-relative per sample)
for the relevance, 1e-4 max abs for the Explainer's and the CLI's min-max normalised heatmaps.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from lrp_oracle import MAX_REL, RULE_SETS, ExactMergeBatchNorm, composite, max_rel_per_sample, randomize_batchnorm
from zennit.attribution import Gradient

from camrt import contract
from camrt_lrp.method import METHODS

SIZE = 16
CLASSES = 4
HEATMAP_ABS = 1e-4


def _trunk(bias: bool = True) -> list[torch.nn.Module]:
    return [torch.nn.Conv2d(3, 8, 3, padding=1, bias=bias), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=bias), torch.nn.BatchNorm2d(8), torch.nn.ReLU()]


def segmenter(bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*_trunk(bias), torch.nn.Conv2d(8, CLASSES, 1, bias=bias)).eval()
    randomize_batchnorm(net)
    if not bias:
        _zero_batchnorm_shift(net)
    return net


def embedder() -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Sequential(*_trunk(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 6)).eval()
    randomize_batchnorm(net)
    return net


class Detector(torch.nn.Module):
    """A YOLO-style raw head [B, 4 + CLASSES, SIZE * SIZE]: one candidate per pixel, cx, cy = (2 s - 0.5 +
    grid) + origin and w, h = (4 s)^2 from a sigmoid s, sigmoid class scores. The sigmoid is one module
    (zennit: Pass, as camrt's rule sets), the decoding functional (its gradient, in both). `origin` moves
    the pixel origin: the same detections, every box coordinate `origin` larger."""

    def __init__(self, bias: bool = True, origin: float = 0.0):
        super().__init__()
        torch.manual_seed(2)
        self.trunk = torch.nn.Sequential(*_trunk(bias))
        self.head = torch.nn.Conv2d(8, 4 + CLASSES, 1, bias=bias)
        self.sigmoid = torch.nn.Sigmoid()
        randomize_batchnorm(self.trunk)
        if not bias:
            _zero_batchnorm_shift(self.trunk)
        gy, gx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                                indexing="ij")
        self.register_buffer("grid", torch.stack([gx, gy])[None] + origin)
        self.eval()

    def forward(self, x):
        s = self.sigmoid(self.head(self.trunk(x)))
        return torch.cat([s[:, :2] * 2 - 0.5 + self.grid, (s[:, 2:4] * 4) ** 2, s[:, 4:]], 1).flatten(2)


def _zero_batchnorm_shift(net) -> None:
    """BatchNorm that folds into a Conv without bias."""
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.zero_()
            bn.bias.zero_()


CONSERVATION_REL = 1e-4


def _export(net, tmp_path_factory, name: str, layer: str = "3") -> str:
    from camrt_exporters.export import export_torch, write_model

    model, _ = export_torch(net, layers=[layer], input_size=(SIZE, SIZE), rules=[contract.RULE_VANILLA, *RULE_SETS],
                            seed=True)
    path = tmp_path_factory.mktemp("lrp_seeded") / f"{name}.camrt.onnx"
    write_model(model, path)
    return str(path)


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory):
    net = segmenter()
    return net, _export(net, tmp_path_factory, "seg")


@pytest.fixture(scope="module")
def det_file(tmp_path_factory):
    net = Detector()
    return net, _export(net, tmp_path_factory, "det", layer="trunk.3")


@pytest.fixture(scope="module")
def emb_file(tmp_path_factory):
    net = embedder()
    return net, _export(net, tmp_path_factory, "emb")


def _inputs(seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)


def _frequent_class(net, x: np.ndarray) -> int:
    with torch.no_grad():
        return int(np.bincount(net(torch.from_numpy(x)).argmax(1).numpy().ravel(), minlength=CLASSES).argmax())


def _seed(output: torch.Tensor, losses) -> torch.Tensor:
    """dL/d output of each sample's L = losses[i](output row i), by torch autograd."""
    leaf = output.detach().requires_grad_(True)
    sum(loss(leaf[i]) for i, loss in enumerate(losses)).backward()
    return leaf.grad


def seg_seed(net, x: np.ndarray, category: int) -> torch.Tensor:
    """pytorch-grad-cam's SemanticSegmentationTarget: the pixels where `category` is the argmax."""
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    with torch.no_grad():
        output = net(torch.from_numpy(x))
    masks = (output.argmax(1) == category).float().numpy()
    return _seed(output, [SemanticSegmentationTarget(category, mask) for mask in masks])


def similar_seed(net, x: np.ndarray, concept: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = net(torch.from_numpy(x))
    return _seed(output, [lambda row: torch.nn.functional.cosine_similarity(row, concept, dim=0)] * len(x))


def torch_box_score(row: torch.Tensor, box, label: int, iou_constant: bool = False) -> torch.Tensor:
    """docs/targets.md's box-matched score of one head row [4 + C, N] (cx, cy, w, h): the sum over the
    candidates with IoU > 0.5 and argmax label `label` of IoU x class score; `iou_constant`: IoU detached."""
    from torchvision.ops import box_convert, box_iou

    iou = box_iou(torch.tensor([box], dtype=row.dtype), box_convert(row[:4].T, "cxcywh", "xyxy"))[0]
    if iou_constant:
        iou = iou.detach()
    scores = row[4:]
    matched = (iou > 0.5) & (scores.argmax(0) == label)
    assert int(matched.sum()) >= 2, "the test wants a box several candidates match"
    return (iou[matched] * scores[label, matched]).sum()


def box_seed(net, x: np.ndarray, box, label: int, iou_constant: bool) -> torch.Tensor:
    with torch.no_grad():
        output = net(torch.from_numpy(x))
    return _seed(output, [lambda row: torch_box_score(row, box, label, iou_constant)] * len(x))


def best_box(net, x: np.ndarray) -> tuple[tuple[float, ...], int]:
    """In the one image `x`, the box of the candidate that most candidates of its label match (x1, y1, x2, y2,
    nudged off its edges: at an equal edge min/max has no derivative) and its label."""
    from torchvision.ops import box_convert, box_iou

    with torch.no_grad():
        head = net(torch.from_numpy(x))[0].double()
    corners = box_convert(head[:4].T, "cxcywh", "xyxy")
    labels = head[4:].argmax(0)
    matches = ((box_iou(corners, corners) > 0.5) & (labels[:, None] == labels[None])).sum(1)
    k = int(matches.argmax())
    head = head.numpy()
    cx, cy, w, h = head[:4, k]
    box = (cx - w / 2 + 0.05, cy - h / 2 - 0.03, cx + w / 2 + 0.02, cy + h / 2 + 0.01)
    return tuple(round(float(v), 4) for v in box), int(head[4:, k].argmax())


def zennit_seeded(net, x: np.ndarray, seed: torch.Tensor, rule_set: str) -> np.ndarray:
    """zennit's input relevance for `attr_output = seed * output`."""
    with Gradient(model=net, composite=composite(rule_set, [ExactMergeBatchNorm()])) as attributor:
        _, relevance = attributor(torch.from_numpy(x), lambda output: seed * output.detach())
    return relevance.detach().numpy()


def _minmax(m: np.ndarray) -> np.ndarray:
    m = m - m.min()  # no epsilon in the division: these relevance maps span ~1e-5
    return m / m.max()


def _explained(path: str, rule_set: str, x: np.ndarray, target) -> list[np.ndarray]:
    from camrt import Explainer

    return [e.heatmap for e in Explainer(path, method=rule_set).explain(x, targets=target)]


def _relevance(path: str, rule_set: str, x: np.ndarray, target) -> np.ndarray:
    """The file's input relevance of a seeded run fed the method's `seed_from` of the target's seed."""
    from camrt.execution.session import ExplainSession

    lrp = next(m for m in METHODS if m.name == rule_set)()
    fetch = [contract.input_gradient_output(rule_set)]

    def make_seed(forward):
        seeds = target.seeds(forward)[0]
        return lrp.seed_from(seeds.values, forward[contract.LOGITS_OUTPUT], [target] * len(seeds.values))

    return ExplainSession(path).run_seeded(x, make_seed, fetch)[fetch[0]]


def _assert_heatmaps(heatmaps: list[np.ndarray], relevance: np.ndarray, what: str) -> float:
    diff = max(float(np.abs(h - _minmax(r.sum(0))).max()) for h, r in zip(heatmaps, relevance))
    assert diff <= HEATMAP_ABS, f"{what}: {diff:.2e}"
    return diff


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_seg_target_relevance_and_map_equal_zennit(seg_file, rule_set):
    from camrt.seeds.targets import SegmentationTarget

    net, path = seg_file
    x = _inputs()
    category = _frequent_class(net, x)
    reference = zennit_seeded(net, x, seg_seed(net, x, category), rule_set)
    target = SegmentationTarget(category)
    errors = max_rel_per_sample(_relevance(path, rule_set, x, target), reference)
    assert errors.max() <= MAX_REL, f"seg {rule_set}: {errors}"
    diff = _assert_heatmaps(_explained(path, rule_set, x, target), reference, f"seg {rule_set} heatmap")
    print(f"seg:{category} {rule_set}: relevance {errors.max():.2e}, heatmap {diff:.2e}")


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_similar_target_map_equals_zennit_gradient_times_output(emb_file, rule_set):
    from camrt.seeds.targets import SimilarityTarget

    net, path = emb_file
    x = _inputs(3)
    with torch.no_grad():
        concept = net(torch.from_numpy(_inputs(4)[:1]))[0]
    seed = similar_seed(net, x, concept)
    with torch.no_grad():  # Euler: cos is homogeneous of degree 0 in e, so sum(seed * e) = 0
        np.testing.assert_allclose((seed * net(torch.from_numpy(x))).sum(1).numpy(), 0, atol=1e-6)
    reference = zennit_seeded(net, x, seed, rule_set)
    target = SimilarityTarget(concept.numpy())
    errors = max_rel_per_sample(_relevance(path, rule_set, x, target), reference)
    assert errors.max() <= MAX_REL, f"similar {rule_set}: {errors}"
    diff = _assert_heatmaps(_explained(path, rule_set, x, target), reference, f"similar {rule_set} heatmap")
    print(f"similar {rule_set}: relevance {errors.max():.2e}, heatmap {diff:.2e}")


def test_several_targets_stack_as_single_runs(seg_file):
    """Two seg targets per image in one batched backward pass (camrt.seeded_explain.stacked_maps) give the
    maps of their single runs."""
    from camrt import Explainer
    from camrt.seeds.targets import SeededRequest, SegmentationTarget
    from camrt.targets import TargetListRequest

    net, path = seg_file
    x = _inputs()
    explainer = Explainer(path, method=RULE_SETS[0])
    whole = np.ones((SIZE, SIZE), np.float32)
    targets = [SegmentationTarget(0, whole, "whole"), SegmentationTarget(2, whole, "whole")]
    stacked = explainer.explain_request(x, TargetListRequest(tuple(SeededRequest(t) for t in targets)))
    for rank, target in enumerate(targets):
        single = explainer.explain(x, targets=target)
        for i in range(len(x)):
            np.testing.assert_allclose(stacked[i][rank].heatmap, single[i].heatmap, atol=1e-6)


def test_stacked_box_targets_equal_single_runs(det_file):
    """Two box targets of an image in one batched backward pass: each row's seed is held at constant IoU by its
    own target (`seed_from` gets the rows' targets), so each map is its single run's."""
    from camrt import Explainer
    from camrt.seeds.targets import BoxScoreTarget, SeededRequest
    from camrt.targets import TargetListRequest

    net, path = det_file
    x = _inputs(6)[:1]
    box, label = best_box(net, x)
    targets = [BoxScoreTarget(box, label), BoxScoreTarget(box, label, iou_threshold=0.3)]
    explainer = Explainer(path, method=RULE_SETS[0])
    [stacked] = explainer.explain_request(x, TargetListRequest(tuple(SeededRequest(t) for t in targets)))
    for rank, target in enumerate(targets):
        [single] = explainer.explain(x, targets=target)
        assert stacked[rank].score == pytest.approx(single.score)
        np.testing.assert_allclose(stacked[rank].heatmap, single.heatmap, atol=1e-6)
    assert np.abs(stacked[0].heatmap - stacked[1].heatmap).max() > 1e-3


def test_stacked_class_targets_equal_the_class_path(emb_file):
    """Classes of a [B, classes] score stacked in one backward pass (seed one-hot, fed one-hot * score)
    give the class path's maps (the file's one-hot relevance times the score). Class 0's score is negative,
    class 4's positive: a missing score factor would flip class 0's min-max normalised map."""
    from camrt import Explainer
    from camrt.target_parsing import parse_target

    _, path = emb_file
    x = _inputs()
    explainer = Explainer(path, method=RULE_SETS[0])
    stacked = explainer.explain_request(x, parse_target("0,4"))
    assert all(row[0].score < 0 < row[1].score for row in stacked)
    for rank, category in enumerate((0, 4)):
        for i, single in enumerate(explainer.explain(x, targets=category)):
            assert stacked[i][rank].target == category and stacked[i][rank].score == pytest.approx(single.score)
            np.testing.assert_allclose(stacked[i][rank].heatmap, single.heatmap, atol=1e-5)


def test_cli_seg_target_equals_zennit(seg_file, tmp_path):
    from click.testing import CliRunner

    from camrt.cli import build_cli
    from camrt.execution.session import ExplainSession
    from camrt.imaging.preprocess import preprocess

    net, path = seg_file
    image = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    x = preprocess([image], ExplainSession(path).info.preprocessing)
    category = _frequent_class(net, x)
    result = CliRunner().invoke(build_cli(), ["explain", path, str(tmp_path / "img.png"), "--target", f"seg:{category}",
                                              "-m", RULE_SETS[0], "--format", "npy", "-o", str(tmp_path / "out"), "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["target_kind"] == "seg" and record["method"] == RULE_SETS[0]
    reference = zennit_seeded(net, x, seg_seed(net, x, category), RULE_SETS[0])
    diff = _assert_heatmaps([np.load(record["heatmap"])], reference, "cli seg heatmap")
    print(f"cli seg:{category}: heatmap {diff:.2e}")


def test_class_target_of_a_segmentation_score_is_refused(seg_file):
    from camrt import Explainer, UsageError

    _, path = seg_file
    with pytest.raises(UsageError, match=r"is \[batch, \d+, \d+, \d+\], not class scores \[batch, classes\].*"
                                         r"--target seg:C"):
        Explainer(path, method=RULE_SETS[0]).explain(_inputs(), targets=1)


@pytest.mark.parametrize("rule_set", RULE_SETS[:2])
def test_seg_relevance_sums_to_L_without_biases(tmp_path_factory, rule_set):
    """Conservation (Bach et al. 2015, eq. 2): with no bias to absorb relevance, the input relevance of
    R_out = seed * score sums to the region's sum of logits, L (the record's score). Not alpha2-beta1:
    a neuron with no negative contribution (z- = 0; the 1x1 head over 8 ReLU'd channels has some) passes
    on alpha = 2 times its relevance, in zennit as here (+11% on this net)."""
    from camrt import Explainer
    from camrt.seeds.targets import SegmentationTarget

    net = segmenter(bias=False)
    path = _export(net, tmp_path_factory, "seg_bias_free")
    x = _inputs()
    target = SegmentationTarget(_frequent_class(net, x))
    totals = _relevance(path, rule_set, x, target).astype(np.float64).sum(axis=(1, 2, 3))
    scores = [e.score for e in Explainer(path, method=rule_set).explain(x, targets=target)]
    print(f"{rule_set}: relevance totals {totals}, L {scores}")
    np.testing.assert_allclose(totals, scores, rtol=CONSERVATION_REL)


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_box_target_relevance_and_map_equal_zennit_at_constant_iou(det_file, rule_set):
    """`box:` starts from R_out = IoU_k * score_k at the matched candidates' class scores: zennit's
    `attr_output = seed * output` with the seed of the box-matched score at constant IoU, which is the
    documented seed with its box-coordinate entries zeroed. Each image explains its best candidate's box."""
    from camrt.seeds.targets import BoxScoreTarget

    net, path = det_file
    x = _inputs(6)
    for i in range(len(x)):
        one = x[i:i + 1]
        box, label = best_box(net, one)
        full, constant = (box_seed(net, one, box, label, iou_constant) for iou_constant in (False, True))
        np.testing.assert_array_equal(constant[:, 4:], full[:, 4:])
        assert not constant[:, :4].any() and full[:, :4].abs().max() > 0
        reference = zennit_seeded(net, one, constant, rule_set)
        target = BoxScoreTarget(box, label)
        errors = max_rel_per_sample(_relevance(path, rule_set, one, target), reference)
        assert errors.max() <= MAX_REL, f"box {rule_set} image {i}: {errors}"
        diff = _assert_heatmaps(_explained(path, rule_set, one, target), reference, f"box {rule_set} heatmap")
        print(f"box {box}:{label} {rule_set} image {i}: relevance {errors.max():.2e}, heatmap {diff:.2e}")


def test_box_coordinates_share_of_seed_times_head_moves_with_the_pixel_origin(det_file, tmp_path_factory):
    """Why the IoU is held constant: with the full seed, seed * head puts score_k b dIoU/db at each box
    coordinate b, which changes when the pixel origin moves (here by 50 pixels: the same detections, every
    coordinate 50 larger, the box too), so zennit's map moves with it; camrt's (IoU constant) does not."""
    from camrt.seeds.targets import BoxScoreTarget

    net, path = det_file
    shifted = Detector(origin=50.0)
    shifted_path = _export(shifted, tmp_path_factory, "det_shifted", layer="trunk.3")
    x = _inputs(6)[:1]
    box, label = best_box(net, x)
    moved = tuple(v + 50 for v in box)
    with torch.no_grad():
        output = net(torch.from_numpy(x))
    full = box_seed(net, x, box, label, iou_constant=False)
    L = float(torch_box_score(output[0], box, label))
    share = float((full[:, :4] * output[:, :4]).sum()) / L
    zennit_full = [zennit_seeded(n, x, box_seed(n, x, b, label, iou_constant=False), RULE_SETS[0])
                   for n, b in ((net, box), (shifted, moved))]
    moved_full = float(max_rel_per_sample(zennit_full[1], zennit_full[0]).max())
    ours = [_relevance(p, RULE_SETS[0], x, BoxScoreTarget(b, label)) for p, b in ((path, box), (shifted_path, moved))]
    moved_ours = float(max_rel_per_sample(ours[1], ours[0]).max())
    print(f"box coordinates' R_out total / L: {share:.2f} at origin 0; origin +50 moves seed * head's relevance by "
          f"{moved_full:.2f}, camrt's by {moved_ours:.1e} (max-relative)")
    assert moved_full > 0.1 and moved_ours <= MAX_REL


def test_cli_box_target_equals_zennit(det_file, tmp_path):
    from click.testing import CliRunner

    from camrt.cli import build_cli
    from camrt.execution.session import ExplainSession
    from camrt.imaging.preprocess import preprocess

    net, path = det_file
    image = np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    x = preprocess([image], ExplainSession(path).info.preprocessing)
    box, label = best_box(net, x)
    text = "box:" + ",".join(str(v) for v in box) + f":{label}"
    result = CliRunner().invoke(build_cli(), ["explain", path, str(tmp_path / "img.png"), "--target", text,
                                              "-m", RULE_SETS[0], "--format", "npy", "-o", str(tmp_path / "out"), "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["target_kind"] == "box" and record["target"] == label and record["method"] == RULE_SETS[0]
    with torch.no_grad():
        assert record["score"] == pytest.approx(float(torch_box_score(net(torch.from_numpy(x))[0], box, label)),
                                                rel=1e-5)
    reference = zennit_seeded(net, x, box_seed(net, x, box, label, iou_constant=True), RULE_SETS[0])
    diff = _assert_heatmaps([np.load(record["heatmap"])], reference, "cli box heatmap")
    print(f"cli {text}: heatmap {diff:.2e}")


@pytest.mark.parametrize("rule_set", RULE_SETS[:2])
def test_box_relevance_sums_to_L_without_biases(tmp_path_factory, rule_set):
    """R_out = IoU_k * score_k sums to L, and conserving rules keep it (the sigmoid is Pass): the input
    relevance of a bias-free detector sums to the record's score L."""
    from camrt import Explainer
    from camrt.seeds.targets import BoxScoreTarget

    net = Detector(bias=False)
    path = _export(net, tmp_path_factory, "det_bias_free", layer="trunk.3")
    x = _inputs(6)[:1]
    target = BoxScoreTarget(*best_box(net, x))
    total = float(_relevance(path, rule_set, x, target).astype(np.float64).sum())
    [explained] = Explainer(path, method=rule_set).explain(x, targets=target)
    print(f"box {rule_set}: relevance total {total}, L {explained.score}")
    assert total == pytest.approx(explained.score, rel=CONSERVATION_REL)


def test_untested_target_kinds_are_refused():
    """A plugin's target kind has no zennit check of its seed * score: refused, naming what serves it."""
    from camrt import UsageError
    from camrt.methods.base import GraphOutputs

    x = _inputs()
    outputs = GraphOutputs({contract.input_gradient_output(RULE_SETS[0]): np.ones_like(x)}, x,
                           context=SimpleNamespace(seeded=SimpleNamespace(target=SimpleNamespace(kind="keypoint"))))
    with pytest.raises(UsageError, match="not tested on keypoint targets.*gradcam, saliency or d-rise"):
        METHODS[0]().explain(outputs, layer=None)
