"""The LRP methods on seeded targets against zennit 0.5.1 with `attr_output = seed * output`.

The seed is dL/d score of the target, taken from torch autograd of the reference target (pytorch-grad-cam's
`SemanticSegmentationTarget` for `seg:C`, torch's cosine similarity for `similar:`); zennit then
propagates the output relevance seed * output. Files: a small segmentation-style net (Conv-BN-ReLU twice,
a 1x1 Conv head: [B, classes, H, W]) and an embedder (the same trunk, average pooling and a Linear layer),
exported with `--seed` and the LRP rule sets. Tolerance: lrp_oracle.py's (1e-4 max-relative per sample)
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
    if not bias:  # BatchNorm folds into a Conv without bias
        with torch.no_grad():
            for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.running_mean.zero_()
                bn.bias.zero_()
    return net


def embedder() -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Sequential(*_trunk(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 6)).eval()
    randomize_batchnorm(net)
    return net


CONSERVATION_REL = 1e-4


def _export(net, tmp_path_factory, name: str) -> str:
    from camrt_exporters.export import export_torch, write_model

    model, _ = export_torch(net, layers=["3"], input_size=(SIZE, SIZE), rules=[contract.RULE_VANILLA, *RULE_SETS],
                            seed=True)
    path = tmp_path_factory.mktemp("lrp_seeded") / f"{name}.camrt.onnx"
    write_model(model, path)
    return str(path)


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory):
    net = segmenter()
    return net, _export(net, tmp_path_factory, "seg")


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
        return lrp.seed_from(target.seeds(forward)[0].values, forward[contract.LOGITS_OUTPUT])

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
    with pytest.raises(UsageError, match=r"needs a \[batch, classes\] score.*--target seg:CLASS"):
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


def test_box_targets_are_refused():
    """A box target's output relevance (seed * head) has no zennit check: refused, naming what serves it."""
    from camrt import UsageError
    from camrt.methods.base import GraphOutputs
    from camrt.seeds.targets import BoxScoreTarget, SeededPasses

    x = _inputs()
    outputs = GraphOutputs({contract.input_gradient_output(RULE_SETS[0]): np.ones_like(x)}, x,
                           context=SimpleNamespace(seeded=SeededPasses(BoxScoreTarget((0, 0, 4, 4)), np.ones((2, 7, 5)))))
    with pytest.raises(UsageError, match="not tested on box targets.*gradcam, saliency or d-rise"):
        METHODS[0]().explain(outputs, layer=None)
