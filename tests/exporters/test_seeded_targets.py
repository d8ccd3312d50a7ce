"""Seeded files (`camrt export --seed`): gradients of L = <seed, score> for segmentation, embedding
and raw detection-head targets, run as one forward pass and one backward pass on its activations.

Oracles: torch autograd of the same L (float64 where it decides), pytorch-grad-cam 1.5.7's GradCAM
with `SemanticSegmentationTarget` / `SimilarityToConceptTarget` (max abs of min-max normalised maps
<= 1e-4), torchvision's differentiable `box_iou` for the box-matched score.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract
from camrt.seeds import SeedBatch
from camrt.seeds.boxes import BoxTarget, box_seed
from camrt.seeds.embedding import similarity_seed
from camrt.seeds.segmentation import segmentation_seed
from tests.helpers import count_runs

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)


def _export(tmp_path_factory, model, layer, size, name, score_output=None):
    from camrt_exporters.export import export_torch, write_model

    onnx_model, _ = export_torch(model, layers=[layer], input_size=size, rules=[contract.RULE_VANILLA], seed=True,
                                 score_output=score_output)
    path = tmp_path_factory.mktemp(name) / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    return str(path)


def _layer_autograd(model, module_name, x, loss, score_output=None, float64=True):
    """Activation and d loss(score) / d activation of a module's output in torch (float64 copy)."""
    import copy

    from camrt_exporters.torch_frontend import select_output

    if float64:
        model, x = copy.deepcopy(model).double(), x.double()
    captured = {}
    handle = dict(model.named_modules())[module_name].register_forward_hook(
        lambda m, a, out: captured.__setitem__("act", out))
    try:
        score = select_output(model(x), score_output)
        grad, = torch.autograd.grad(loss(score), [captured["act"]])
    finally:
        handle.remove()
    return captured["act"].detach().numpy(), grad.numpy()


def _gradcam_maps(values, layer, inputs):
    from camrt.methods.base import GraphOutputs
    from camrt.methods.gradcam import GradCAM
    from camrt.postprocess import finalize

    raw = GradCAM().explain(GraphOutputs(values, inputs), layer=layer)
    return [finalize([m], inputs.shape[2:]) for m in raw]



# --- segmentation: torchvision LR-ASPP (dict output {"out"}) ---------------------------------
SEG_SIZE = (128, 128)
SEG_LAYER = "backbone.16"


class _SegOut(torch.nn.Module):
    """The "out" logits of a torchvision segmentation model (pytorch-grad-cam's tutorial wrapper)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@pytest.fixture(scope="module")
def lraspp(tmp_path_factory):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    return model, _export(tmp_path_factory, model, SEG_LAYER, SEG_SIZE, "lraspp", score_output="out")


def _seg_inputs():
    return np.random.default_rng(1).standard_normal((2, 3, *SEG_SIZE)).astype(np.float32)


def test_segmentation_gradients_match_autograd_and_one_forward(lraspp):
    from camrt.execution.session import ExplainSession

    model, path = lraspp
    session = ExplainSession(path)
    x = _seg_inputs()
    fetch = [contract.activation_output(SEG_LAYER), contract.gradient_output(SEG_LAYER)]
    plan = session.seeded_plan(fetch)
    forward_runs, backward_runs = count_runs(plan.forward_session), count_runs(plan.backward_session)
    made = {}

    def make_seed(outputs):
        logits = outputs[contract.LOGITS_OUTPUT]
        classes = [int(np.bincount(logits.argmax(1)[b].ravel()).argmax()) for b in range(len(logits))]
        made["classes"], made["seed"] = classes, segmentation_seed(logits, classes)
        return made["seed"]

    got = session.run_seeded(x, make_seed, fetch)
    assert (len(forward_runs), len(backward_runs)) == (1, 1)
    seed = made["seed"].values
    for b in range(len(x)):
        act, grad = _layer_autograd(model, "backbone.16", torch.from_numpy(x[b:b + 1]),
                                    lambda out: (out * torch.from_numpy(seed[b:b + 1]).double()).sum(), "out")
        np.testing.assert_allclose(got[fetch[0]][b:b + 1], act, atol=1e-4 * np.abs(act).max())
        assert np.abs(got[fetch[1]][b:b + 1] - grad).max() <= 1e-4 * np.abs(grad).max()


def test_segmentation_gradcam_matches_pytorch_grad_cam(lraspp):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from camrt.execution.session import ExplainSession

    model, path = lraspp
    x = _seg_inputs()
    fetch = [contract.activation_output(SEG_LAYER), contract.gradient_output(SEG_LAYER)]
    with torch.no_grad():
        logits = _SegOut(model)(torch.from_numpy(x)).numpy()
    category = int(np.bincount(logits.argmax(1).ravel()).argmax())
    masks = (logits.argmax(1) == category).astype(np.float32)  # pytorch-grad-cam's tutorial region
    got = ExplainSession(path).run_seeded(x, lambda out: segmentation_seed(out[contract.LOGITS_OUTPUT], category),
                                          fetch)
    ours = _gradcam_maps(got, SEG_LAYER, x)
    with GradCAM(model=_SegOut(model), target_layers=[model.backbone["16"]]) as cam:
        for b in range(len(x)):
            reference = cam(torch.from_numpy(x[b:b + 1]), targets=[SemanticSegmentationTarget(category, masks[b])])[0]
            assert np.abs(_minmax(ours[b]) - _minmax(reference)).max() <= 1e-4


def test_several_classes_per_image_in_one_forward(lraspp):
    """Two targets per image (its most frequent class over its argmax region, and class 1 over the
    left half): one forward run, one backward run of 4 rows, each row equal to its own seeded run."""
    from camrt.execution.session import ExplainSession

    _, path = lraspp
    session = ExplainSession(path)
    x = _seg_inputs()
    grad = contract.gradient_output(SEG_LAYER)
    plan = session.seeded_plan([grad])
    forward_runs = count_runs(plan.forward_session)
    half = np.zeros(SEG_SIZE, np.float32)
    half[:, : SEG_SIZE[1] // 2] = 1

    def frequent(logits):
        return [int(np.bincount(logits.argmax(1)[b].ravel()).argmax()) for b in range(len(logits))]

    def two_targets(outputs):
        logits = outputs[contract.LOGITS_OUTPUT]
        return SeedBatch.stack([segmentation_seed(logits, frequent(logits)), segmentation_seed(logits, 1, half)])

    stacked = session.run_seeded(x, two_targets, [grad])[grad]
    assert len(forward_runs) == 1 and stacked.shape[0] == 4
    for b in range(2):
        for k, seed in enumerate([lambda logits: segmentation_seed(logits, frequent(logits)),
                                  lambda logits: segmentation_seed(logits, 1, half)]):
            single = session.run_seeded(x[b:b + 1], lambda out: seed(out[contract.LOGITS_OUTPUT]), [grad])[grad]
            assert np.abs(stacked[2 * k + b] - single[0]).max() <= 1e-5 * np.abs(single).max()


@pytest.mark.slow
def test_deeplabv3_segmentation_gradcam_matches_pytorch_grad_cam(tmp_path_factory):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    from camrt.execution.session import ExplainSession

    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    path = _export(tmp_path_factory, model, "backbone.16", SEG_SIZE, "deeplab", score_output="out")
    x = _seg_inputs()
    fetch = [contract.activation_output("backbone.16"), contract.gradient_output("backbone.16")]
    with torch.no_grad():
        argmax = _SegOut(model)(torch.from_numpy(x)).argmax(1).numpy()
    classes = [int(np.bincount(argmax[b].ravel()).argmax()) for b in range(len(x))]
    got = ExplainSession(path).run_seeded(x, lambda out: segmentation_seed(out[contract.LOGITS_OUTPUT], classes), fetch)
    ours = _gradcam_maps(got, "backbone.16", x)
    with GradCAM(model=_SegOut(model), target_layers=[model.backbone["16"]]) as cam:
        for b, category in enumerate(classes):
            mask = (argmax[b] == category).astype(np.float32)
            reference = cam(torch.from_numpy(x[b:b + 1]), targets=[SemanticSegmentationTarget(category, mask)])[0]
            assert np.abs(_minmax(ours[b]) - _minmax(reference)).max() <= 1e-4


# --- embeddings: resnet18 without its classifier ---------------------------------------------
EMB_SIZE = (96, 96)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    return model, _export(tmp_path_factory, model, "layer4", EMB_SIZE, "embedder")


class SimilarityToConceptTarget:
    """pytorch-grad-cam's target of its embeddings tutorial ("Pixel Attribution for embeddings"; not
    in the 1.5.7 package): the cosine similarity of one sample's embedding to a concept embedding."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def test_embedding_similarity_matches_autograd_and_pytorch_grad_cam(embedder):
    from pytorch_grad_cam import GradCAM

    from camrt.execution.session import ExplainSession

    model, path = embedder
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, *EMB_SIZE)).astype(np.float32)
    with torch.no_grad():
        concept = model(torch.from_numpy(rng.standard_normal((1, 3, *EMB_SIZE)).astype(np.float32)))[0]
    fetch = [contract.activation_output("layer4"), contract.gradient_output("layer4")]
    got = ExplainSession(path).run_seeded(x, lambda out: similarity_seed(out[contract.LOGITS_OUTPUT],
                                                                         concept.numpy()), fetch)
    cosine = torch.nn.CosineSimilarity(dim=1)
    for b in range(len(x)):
        _, grad = _layer_autograd(model, "layer4", torch.from_numpy(x[b:b + 1]),
                                  lambda out: cosine(out, concept.double()[None]).sum())
        assert np.abs(got[fetch[1]][b:b + 1] - grad).max() <= 1e-4 * np.abs(grad).max()
    ours = _gradcam_maps(got, "layer4", x)
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        reference = cam(torch.from_numpy(x), targets=[SimilarityToConceptTarget(concept)] * len(x))
    for b in range(len(x)):
        assert np.abs(_minmax(ours[b]) - _minmax(reference[b])).max() <= 1e-4


# --- raw detection head: a small YOLO-style model [B, 4 + C, N] ------------------------------
DET_SIZE = (64, 64)
DET_CLASSES = 3


class TinyYolo(torch.nn.Module):
    """Two strides (4, 8), anchor-free heads decoded as ultralytics exports them: cx, cy, w, h in
    input pixels and sigmoid class scores, concatenated over the candidates: [B, 4 + C, N]."""

    def __init__(self, classes: int = DET_CLASSES, size: tuple[int, int] = DET_SIZE):
        super().__init__()
        nn = torch.nn

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.SiLU())

        self.stem = nn.Sequential(block(3, 8), block(8, 16))
        self.down = block(16, 32)
        self.heads = nn.ModuleList([nn.Conv2d(16, 4 + classes, 1), nn.Conv2d(32, 4 + classes, 1)])
        self.strides = (4, 8)
        for stride in self.strides:
            h, w = size[0] // stride, size[1] // stride
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
            self.register_buffer(f"grid{stride}", torch.stack([gx, gy])[None])

    def forward(self, x):
        f1 = self.stem(x)
        outs = []
        for feature, head, stride in zip((f1, self.down(f1)), self.heads, self.strides):
            p = head(feature)
            xy = (torch.sigmoid(p[:, :2]) * 2 - 0.5 + getattr(self, f"grid{stride}")) * stride
            wh = (torch.sigmoid(p[:, 2:4]) * 4) ** 2 * stride
            outs.append(torch.cat([xy, wh, torch.sigmoid(p[:, 4:])], 1).flatten(2))
        return torch.cat(outs, 2)


def _torch_box_score(head, target: BoxTarget, threshold=0.5):
    """The box-matched score in torch: sum over matching candidates of IoU x class score."""
    from torchvision.ops import box_convert, box_iou

    boxes = box_convert(head[target.sample, :4].T, "cxcywh", "xyxy")
    scores = head[target.sample, 4:]
    labels = scores.argmax(0)
    iou = box_iou(torch.tensor([target.box], dtype=head.dtype), boxes)[0]
    matched = (iou > threshold) & (labels == target.label)
    return (iou[matched] * scores[target.label, matched]).sum()


def _box_targets(head: np.ndarray):
    """Per image, the box of its best-scoring candidate (x1, y1, x2, y2) and label, nudged off its
    edges (at an equal edge min/max have no derivative; torch splits it in halves)."""
    targets = []
    for b in range(len(head)):
        k = int(head[b, 4:].max(0).argmax())
        label = int(head[b, 4:, k].argmax())
        cx, cy, w, h = head[b, :4, k]
        targets.append(BoxTarget(b, (cx - w / 2 + 0.5, cy - h / 2 - 0.3, cx + w / 2 + 0.2, cy + h / 2 + 0.1), label))
    return targets


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyYolo().eval()
    return model, _export(tmp_path_factory, model, "stem", DET_SIZE, "tinyyolo")


def test_box_seed_is_the_autograd_gradient_of_the_box_score():
    torch.manual_seed(1)
    model = TinyYolo().double().eval()
    x = torch.randn(2, 3, *DET_SIZE, dtype=torch.float64)
    with torch.no_grad():
        head = model(x).numpy()
    targets = _box_targets(head)
    seeds = box_seed(head, targets)
    for row, target in enumerate(targets):
        raw = torch.from_numpy(head).requires_grad_(True)
        score = _torch_box_score(raw, target)
        grad, = torch.autograd.grad(score, [raw])
        assert int((grad[target.sample, 4:] != 0).sum()) >= 2  # several candidates matched
        np.testing.assert_allclose(seeds.values[row], grad[target.sample].numpy(), rtol=1e-9, atol=1e-12)
        assert seeds.samples[row] == target.sample


def test_box_gradients_at_a_layer_match_autograd(yolo):
    from camrt.execution.session import ExplainSession

    model, path = yolo
    x = np.random.default_rng(4).standard_normal((2, 3, *DET_SIZE)).astype(np.float32)
    fetch = [contract.gradient_output("stem")]
    chosen = {}

    def make_seed(outputs):
        chosen["targets"] = _box_targets(outputs[contract.LOGITS_OUTPUT])
        return box_seed(outputs[contract.LOGITS_OUTPUT], chosen["targets"])

    got = ExplainSession(path).run_seeded(x, make_seed, fetch)[fetch[0]]
    for row, target in enumerate(chosen["targets"]):
        one = BoxTarget(0, target.box, target.label)
        _, grad = _layer_autograd(model, "stem", torch.from_numpy(x[target.sample:target.sample + 1]),
                                  lambda out: _torch_box_score(out, one))
        assert np.abs(got[row] - grad[0]).max() <= 1e-4 * np.abs(grad).max()


def test_seeded_run_of_a_file_whose_weights_are_constant_nodes(tmp_path):
    """Weights held by Constant nodes (files written with onnx.helper) are recomputed by the backward
    graph, never passed over from the forward pass as if they had a batch axis (onnxruntime refused
    them: 'invalid dimensions for input: fc_w'). Oracle: torch autograd of <seed, logits> on the same
    network, rtol 1e-4 of the largest element."""
    import onnx
    import torch

    from camrt.execution.session import ExplainSession
    from camrt_exporters.export import export_onnx, write_model

    from .tiny_models import conv_relu_maxpool_gap_gemm_softmax, torch_equivalent

    source = conv_relu_maxpool_gap_gemm_softmax(batch="N")
    assert any(node.op_type == "Constant" for node in source.graph.node)
    onnx.save(source, tmp_path / "constants.onnx")
    exported, _ = export_onnx(tmp_path / "constants.onnx", seed=True)
    write_model(exported, tmp_path / "constants.camrt.onnx")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    seed = rng.standard_normal((3, 5)).astype(np.float32)
    fetch = contract.input_gradient_output(contract.RULE_VANILLA)
    session = ExplainSession(tmp_path / "constants.camrt.onnx", device="cpu")
    got = session.run_seeded(x, lambda forward: seed, [fetch])[fetch]
    image = torch.from_numpy(x).requires_grad_(True)
    (torch.from_numpy(seed) * torch_equivalent()(image)[2]).sum().backward()
    want = image.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


# --- seeded targets through the Explainer and `camrt explain --target` -----------------------
def _cli(*args: str):
    from click.testing import CliRunner

    from camrt.cli import build_cli

    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def _frequent_class(model, x) -> int:
    with torch.no_grad():
        return int(np.bincount(_SegOut(model)(torch.from_numpy(x)).argmax(1).numpy().ravel()).argmax())


def test_explainer_seg_target_matches_pytorch_grad_cam(lraspp):
    """Explainer(gradcam).explain(targets=SegmentationTarget) for the default (argmax) region and a
    given region equals pytorch-grad-cam's GradCAM + SemanticSegmentationTarget with that region."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from camrt.explainer import Explainer
    from camrt.seeds.targets import SegmentationTarget

    model, path = lraspp
    x = _seg_inputs()
    category = _frequent_class(model, x)
    with torch.no_grad():
        argmax = _SegOut(model)(torch.from_numpy(x)).argmax(1).numpy()
    half = np.zeros(SEG_SIZE, np.float32)
    half[:, : SEG_SIZE[1] // 2] = 1
    explainer = Explainer(path, method="gradcam")
    default = explainer.explain(x, targets=SegmentationTarget(category))
    region = explainer.explain(x, targets=SegmentationTarget(category, half, "half.png"))
    assert default[0].record()["target_kind"] == "seg" and default[0].target == category
    assert region[0].record()["target_params"] == {"class": category, "region": "half.png"}
    with GradCAM(model=_SegOut(model), target_layers=[model.backbone["16"]]) as cam:
        for b in range(len(x)):
            for got, mask in ((default[b], (argmax[b] == category).astype(np.float32)), (region[b], half)):
                reference = cam(torch.from_numpy(x[b:b + 1]), targets=[SemanticSegmentationTarget(category, mask)])[0]
                diff = float(np.abs(got.heatmap - _minmax(reference)).max())
                print(f"explainer seg gradcam image {b}: max diff {diff:.2e}")
                assert diff <= 1e-4
                with torch.no_grad():
                    score = float((_SegOut(model)(torch.from_numpy(x[b:b + 1]))[0, category] * torch.from_numpy(mask))
                                  .sum())
                assert got.score == pytest.approx(score, rel=1e-4)


def test_explainer_seg_saliency_is_the_input_gradient_of_the_region_score(lraspp):
    """saliency (max over channels of |dL/d input|) of a seg target equals torch float64 autograd."""
    from camrt.explainer import Explainer
    from camrt.postprocess import finalize
    from camrt.seeds.targets import SegmentationTarget

    model, path = lraspp
    x = _seg_inputs()[:1]
    category = _frequent_class(model, x)
    got = Explainer(path, method="saliency").explain(x, targets=SegmentationTarget(category))[0].heatmap
    double = _SegOut(model).double()
    inputs = torch.from_numpy(x).double().requires_grad_(True)
    logits = double(inputs)
    region = (logits.argmax(1) == category).double()
    grad, = torch.autograd.grad((logits[:, category] * region).sum(), [inputs])
    _SegOut(model).float()
    model.float()
    reference = finalize([grad[0].abs().amax(0).numpy()], SEG_SIZE)
    diff = float(np.abs(got - reference).max())
    print(f"explainer seg saliency: max diff {diff:.2e}")
    assert diff <= 1e-4


def _image_and_region(tmp_path, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random image (rng 5) and a rectangular region mask written as tmp_path/img.png and mask.png; the
    image, the region as a [H, W] 0/1 float32 map and the image's preprocessed batch for the file at `path`."""
    from camrt.execution.session import ExplainSession
    from camrt.imaging.preprocess import preprocess
    from tests.helpers import random_image, write_image

    image = random_image(np.random.default_rng(5), *SEG_SIZE)
    write_image(str(tmp_path / "img.png"), image)
    mask = np.zeros((*SEG_SIZE, 3), np.uint8)
    mask[16:100, 40:120] = 255
    write_image(str(tmp_path / "mask.png"), mask)
    return image, (mask[..., 0] > 0).astype(np.float32), preprocess([image], ExplainSession(path).info.preprocessing)


def test_cli_seg_target_with_region(lraspp, tmp_path):
    """`camrt explain FILE IMG --target seg:C --region mask.png`: the heatmap equals pytorch-grad-cam
    on the same preprocessed input and region; the record names the target kind and parameters."""
    import json

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget


    model, path = lraspp
    _, region, x = _image_and_region(tmp_path, path)
    category = _frequent_class(model, x)
    result = _cli("explain", path, str(tmp_path / "img.png"), "--target", f"seg:{category}", "--region",
                  str(tmp_path / "mask.png"), "--format", "npy", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["target_kind"] == "seg" and record["target"] == category
    assert record["target_params"] == {"class": category, "region": str(tmp_path / "mask.png")}
    heatmap = np.load(record["heatmap"])
    with GradCAM(model=_SegOut(model), target_layers=[model.backbone["16"]]) as cam:
        reference = cam(torch.from_numpy(x), targets=[SemanticSegmentationTarget(category, region)])[0]
    diff = float(np.abs(heatmap - _minmax(reference)).max())
    print(f"cli seg --region gradcam: max diff {diff:.2e}")
    assert diff <= 1e-4


def test_cli_similar_target_matches_pytorch_grad_cam(embedder, tmp_path):
    import json

    from pytorch_grad_cam import GradCAM

    from camrt.execution.session import ExplainSession
    from camrt.imaging.preprocess import preprocess
    from tests.helpers import random_image, write_image

    model, path = embedder
    rng = np.random.default_rng(6)
    image = random_image(rng, *EMB_SIZE)
    write_image(str(tmp_path / "img.png"), image)
    x = preprocess([image], ExplainSession(path).info.preprocessing)
    with torch.no_grad():
        concept = model(torch.from_numpy(rng.standard_normal((1, 3, *EMB_SIZE)).astype(np.float32)))[0]
    np.save(tmp_path / "concept.npy", concept.numpy())
    result = _cli("explain", path, str(tmp_path / "img.png"), "--target", f"similar:{tmp_path / 'concept.npy'}",
                  "-m", "gradcam", "--format", "npy", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["target_kind"] == "similar" and record["target"] is None
    assert record["target_params"] == {"concept": str(tmp_path / "concept.npy"), "dim": 512}
    with torch.no_grad():
        cosine = float(torch.nn.functional.cosine_similarity(model(torch.from_numpy(x)), concept[None])[0])
    assert record["score"] == pytest.approx(cosine, abs=1e-5)
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        reference = cam(torch.from_numpy(x), targets=[SimilarityToConceptTarget(concept)])[0]
    diff = float(np.abs(np.load(record["heatmap"]) - _minmax(reference)).max())
    print(f"cli similar gradcam: max diff {diff:.2e}")
    assert diff <= 1e-4


def test_explainer_box_target_gradcam_is_autograd_of_the_box_score(yolo):
    """Grad-CAM of a box target (parsed from `box:x1,y1,x2,y2:label`) equals Grad-CAM's formula on
    the torch float64 autograd gradient of the box-matched score at the layer."""
    from camrt.explainer import Explainer
    from camrt.postprocess import finalize
    from camrt.target_parsing import parse_target

    model, path = yolo
    x = np.random.default_rng(4).standard_normal((1, 3, *DET_SIZE)).astype(np.float32)
    with torch.no_grad():
        head = model(torch.from_numpy(x)).numpy()
    target = _box_targets(head)[0]
    text = "box:" + ",".join(f"{v:.6f}" for v in target.box) + f":{target.label}"
    request = parse_target(text)
    got = Explainer(path, method="gradcam", layer="stem").explain_request(x, request)[0][0]
    box = request.target.box
    one = BoxTarget(0, box, target.label)
    act, grad = _layer_autograd(model, "stem", torch.from_numpy(x), lambda out: _torch_box_score(out, one))
    reference = finalize([(grad.mean(axis=(2, 3))[0][:, None, None] * act[0]).sum(0)], DET_SIZE)
    diff = float(np.abs(got.heatmap - reference).max())
    print(f"explainer box gradcam: max diff {diff:.2e}")
    assert diff <= 1e-4
    assert got.record()["target_params"]["box"] == list(box) and got.target == target.label
    with torch.no_grad():
        assert got.score == pytest.approx(float(_torch_box_score(torch.from_numpy(head).double(), one)), rel=1e-4)


def test_eigencam_is_refused_a_seed(lraspp):
    from camrt.errors import UsageError
    from camrt.explainer import Explainer
    from camrt.seeds.targets import SegmentationTarget

    _, path = lraspp
    with pytest.raises(UsageError, match=r"method 'eigencam' cannot explain a seg target: it reads no gradient, so "
                                         r"its map would not depend on the target"):
        Explainer(path, method="eigencam", layer=SEG_LAYER).explain(_seg_inputs()[:1], targets=SegmentationTarget(1))


class _GapFcClassifier(torch.nn.Module):
    """conv-bn-relu (feat) -> global average pooling -> linear: the head CAM is defined for."""

    def __init__(self):
        super().__init__()
        self.feat = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.feat(x).mean(dim=(2, 3)))


def test_cam_is_refused_a_seed_naming_its_class_weights(tmp_path_factory):
    """A seeded GAP + FC classifier has CAM's class weights, but a seed (here the cosine of its
    score to a concept) has no class: CAM is refused, naming why and Grad-CAM, which serves it."""
    from camrt.errors import UsageError
    from camrt.explainer import Explainer
    from camrt.seeds.targets import SimilarityTarget

    torch.manual_seed(0)
    path = _export(tmp_path_factory, _GapFcClassifier().eval(), "feat", (16, 16), "gapfc")
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    target = SimilarityTarget(np.array([1.0, 0.5, -0.2, 0.1]))
    assert Explainer(path, method="cam", layer="feat").explain(x)[0].target is not None  # the class path has CAM
    with pytest.raises(UsageError, match=r"method 'cam' cannot explain a similar target: it reads the target class's "
                                         r"classifier weights \(camrt/cam_weights\), which a seed has not: CAM is "
                                         r"defined for a class of a global-average-pooling \+ linear head"):
        Explainer(path, method="cam", layer="feat").explain(x, targets=target)
    assert Explainer(path, method="gradcam", layer="feat").explain(x, targets=target)[0].record()["target_kind"] == \
        "similar"


def test_which_registered_methods_explain_seeds():
    """A method explains a seed unless it reads what follows the class path (CAM's class weights),
    LeGrad's layer scores, or nothing that depends on the target (EigenCAM, attention rollout); methods with further
    passes (Score-CAM's family, Ablation-CAM, SmoothGrad, Smooth Grad-CAM++, Integrated Gradients)
    get the target through ExplainContext. Each refusal's message is asserted."""
    from camrt.plugins.registry import build_method_registry
    from camrt.seeds.targets import method_refusal

    registry = build_method_registry()
    refusals = {name: method_refusal(registry.get(name)) for name in registry.names()}
    served = {name for name, reason in refusals.items() if reason is None}
    assert {"gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigengradcam", "gradcam-elementwise",
            "guided-gradcam", "saliency", "guided-backprop", "deconvnet", "fullgrad", "scorecam", "sscam", "iscam",
            "ablationcam", "smoothgrad", "integrated-gradients", "smooth-gradcam++", "generic-attention"} <= served
    assert refusals["cam"].startswith("reads the target class's classifier weights (camrt/cam_weights)")
    for name in ("eigencam", "attention-rollout"):
        assert refusals[name] == "reads no gradient, so its map would not depend on the target"
    assert refusals["legrad"].startswith("reads the gradients of each block's own class scores (LeGrad's layer scores")
    assert set(refusals) - served == {"cam", "eigencam", "attention-rollout", "legrad"}


def test_a_method_with_further_passes_that_does_not_declare_them_target_agnostic_is_refused(lraspp):
    """A plugin method whose further passes may read the class path (``context.gradients`` with class
    indices) is refused a seed unless it declares scores_seeded_targets; the context refuses the
    class call on a seeded target instead of differentiating a placeholder class."""
    from camrt import contract
    from camrt.errors import PluginError, UsageError
    from camrt.execution.context import ExplainContext
    from camrt.execution.session import ExplainSession
    from camrt.explainer import Explainer
    from camrt.methods.base import Method, Requirements
    from camrt.seeds.targets import SeededPasses, SegmentationTarget

    class ClassPasses(Method):
        name = "class-passes"
        requires = Requirements(input_gradient=contract.RULE_VANILLA, extra_passes=True)

        def explain(self, outputs, *, layer):
            return outputs.input_gradient(contract.RULE_VANILLA).sum(axis=1)

    _, path = lraspp
    with pytest.raises(UsageError, match=r"method 'class-passes' cannot explain a seg target: it runs further passes "
                                         r"that do not declare scores_seeded_targets"):
        Explainer(path, method=ClassPasses()).explain(_seg_inputs()[:1], targets=SegmentationTarget(1))
    x = _seg_inputs()[:1]
    seeded = ExplainContext(ExplainSession(path), x, np.full(1, contract.TOP1_TARGET),
                            seeded=SeededPasses(SegmentationTarget(1), np.ones((1, 21, *SEG_SIZE), np.float32)))
    with pytest.raises(PluginError, match=r"differentiates class logits, but this call explains a seeded target: "
                                          r"use target_gradients"):
        seeded.gradients(x, [1], [contract.input_gradient_output(contract.RULE_VANILLA)])


def test_seeded_target_errors(lraspp, tiny, tmp_path):
    """A file without the seed entry, a seeded target option on a class target, bad target text,
    an empty region, and device_postprocess: each refused with its message."""
    from camrt.errors import ModelError, UsageError
    from camrt.explainer import Explainer
    from camrt.seeds.targets import SegmentationTarget
    from camrt.target_parsing import parse_target

    with pytest.raises(ModelError, match=r"has no seed entry .*needed by a seg target: re-export it with "
                                         r"`camrt export \.\.\. --seed`"):
        Explainer(tiny.path).explain(np.zeros((1, 3, 12, 16), np.float32), targets=SegmentationTarget(0))
    result = _cli("explain", tiny.path, str(tmp_path), "--target", "seg:0")
    assert result.exit_code == 3 and "camrt export ... --seed" in result.output
    with pytest.raises(UsageError, match=r"--region applies to --target seg:..., not to '3'"):
        parse_target("3", region="mask.png")
    with pytest.raises(UsageError, match=r"box:x1,y1,x2,y2\[:label\] needs 4 numbers"):
        parse_target("box:1,2,3")
    with pytest.raises(UsageError, match=r"seg:CLASS needs a class index"):
        parse_target("seg:cat")
    with pytest.raises(UsageError, match=r"similar:missing.npy: cannot read the concept embedding"):
        parse_target("similar:missing.npy")
    _, path = lraspp
    with pytest.raises(UsageError, match=r"--target seg:999 is out of range"):
        parse_target("seg:999").check(Explainer(path).num_classes, path)
    from camrt.errors import InputError

    with pytest.raises(InputError, match=r"segmentation class 1 has an empty region mask"):
        Explainer(path).explain(_seg_inputs()[:1], targets=SegmentationTarget(1, np.zeros((4, 4))))
    import json

    from tests.helpers import write_image

    write_image(str(tmp_path / "img.png"), np.zeros((*SEG_SIZE, 3), np.uint8))
    write_image(str(tmp_path / "mask.png"), np.zeros((8, 8, 3), np.uint8) + 255)
    result = _cli("explain", path, str(tmp_path / "img.png"), "--target", "seg:1", "--region", str(tmp_path / "mask.png"),
                  "--format", "npy", "-o", str(tmp_path / "out"), "-q")  # a region where the image is all black
    assert result.exit_code == 0 and json.loads(result.stdout)["target_kind"] == "seg"
    result = _cli("explain", path, str(tmp_path / "img.png"), "--target", "seg:1", "-o", str(tmp_path / "out"), "-q")
    failed = json.loads(result.stdout)  # an image where class 1 is the argmax nowhere: an error record
    assert result.exit_code == 1 and failed["status"] == "error" and "is the argmax at no pixel" in failed["error"]
    assert failed["target_kind"] == "seg" and failed["target_params"] == {"class": 1, "region": "argmax"}
    with pytest.raises(UsageError, match=r"device_postprocess runs the class path; a seg target needs "
                                         r"device_postprocess off"):
        Explainer(path, device_postprocess=True).explain(_seg_inputs()[:1], targets=SegmentationTarget(1))


def test_regions_pair_with_the_seg_targets_in_order(tiny, tmp_path):
    """--region once: every seg target's region; once per seg target: paired in the order of --target
    (class targets between them take none; `argmax` is the default region); any other count, or
    --region with no seg target, is a usage error naming --region, in the library and the CLI."""
    from camrt.errors import UsageError
    from camrt.target_parsing import parse_targets
    from tests.helpers import write_image

    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    for name, columns in ((a, slice(0, 8)), (b, slice(8, 16))):
        mask = np.zeros((16, 16, 3), np.uint8)
        mask[:, columns] = 255
        write_image(name, mask)

    def regions(texts, region):
        return [part.target.parameters()["region"] if hasattr(part, "target") else None
                for part in parse_targets(texts, region=region).requests]

    assert regions(["seg:1", "seg:2"], a) == regions(["seg:1", "seg:2"], [a]) == [a, a]
    assert regions(["seg:1", "seg:2"], [a, b]) == [a, b]
    assert regions(["seg:1", "3", "seg:2"], [b, "argmax"]) == [b, None, "argmax"]
    assert regions(["seg:1", "seg:1"], [a, b]) == [a, b]  # one class, two regions: two maps
    left = parse_targets(["seg:1", "seg:2"], region=[a, b]).requests[0].target.region
    assert left[:, :8].all() and not left[:, 8:].any()
    with pytest.raises(UsageError, match=r"--region is given 3 times for 2 --target values that take a region "
                                         r"\(seg:1, seg:2\): give it once .* or once for each, in the order of --target"):
        parse_targets(["seg:1", "3", "seg:2"], region=[a, b, a])
    with pytest.raises(UsageError, match=r"--region applies to --target seg:..., not to '3'"):
        parse_targets(["3", "5"], region=[a, b])
    result = _cli("explain", tiny.path, a, "--target", "seg:1", "--target", "seg:2", "--region", a, "--region", b,
                  "--region", a, "-q")
    assert result.exit_code == 2 and "--region is given 3 times for 2 --target values" in result.output


def test_inspect_lists_the_target_kinds(lraspp, embedder, yolo, tiny):
    """`camrt inspect`: class for every file; the seeded kind whose score shape the file has."""
    import json

    kinds = {name: json.loads(_cli("inspect", path, "--json").stdout)["targets"]
             for name, path in (("seg", lraspp[1]), ("similar", embedder[1]), ("box", yolo[1]), ("plain", tiny.path))}
    assert kinds == {"seg": ["class", "seg"], "similar": ["class", "similar"], "box": ["class", "box"],
                     "plain": ["class"]}
    assert "targets:          class, seg" in _cli("inspect", lraspp[1]).stdout
    assert "seg/similar/box need a file exported with --seed" in _cli("inspect", tiny.path).stdout


# --- target kinds as plugins (the register_targets hook) -------------------------------------
def _docs_plugin_example():
    """The plugin example of docs/targets.md, run as written (a module holding its hook)."""
    import re
    import types
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "targets.md").read_text(encoding="utf-8")
    code = next(block for block in re.findall(r"```python\n(.*?)```", page, re.S) if "register_targets" in block)
    module = types.ModuleType("docs_target_plugin")
    exec(compile(code, "docs/targets.md", "exec"), module.__dict__)
    return module


def test_builtin_target_kinds_are_registered_through_the_hook():
    from camrt.plugins.registry import build_target_registry

    registry = build_target_registry()
    assert registry.names() == ["box", "seg", "similar"]
    assert {registry.get(k).plugin for k in registry.names()} == {"camrt.seeds.plugin"}
    assert registry.get("seg").options == ("region",)


def test_a_plugin_target_kind_runs_through_the_cli(yolo, plugin, tmp_path):
    """A third-party kind (docs/targets.md's example, run as written: the sum of one candidate's
    class scores, a seed made from the forward outputs) is parsed from --target and explained; Grad-CAM equals its formula on torch float64
    autograd of the same L. A duplicate kind is left out, an unknown kind names the registered ones,
    and --region is refused for a kind that does not take it."""
    import json

    from camrt.errors import UsageError
    from camrt.hookspecs import hookimpl
    from camrt.plugins.registry import build_target_registry
    from camrt.postprocess import finalize
    from camrt.target_parsing import parse_target
    from tests.helpers import random_image, write_image

    plugin(_docs_plugin_example(), "test-candidate")

    class Clash:
        @hookimpl
        def register_targets(self, register):
            register("seg", lambda value: None)

    plugin(Clash(), "test-clash")
    registry = build_target_registry()
    assert "candidate" in registry.names() and registry.get("seg").plugin == "camrt.seeds.plugin"
    assert "target kind 'seg' is already registered by plugin 'camrt.seeds.plugin'" in registry.failures["test-clash"]
    with pytest.raises(UsageError, match=r"unknown target kind 'nope'; registered kinds: box, candidate, seg, similar"):
        parse_target("nope:1")
    with pytest.raises(UsageError, match=r"--region does not apply to --target candidate:"):
        parse_target("candidate:3", region="mask.png")

    model, path = yolo
    image = random_image(np.random.default_rng(7), *DET_SIZE)
    write_image(str(tmp_path / "img.png"), image)
    result = _cli("explain", path, str(tmp_path / "img.png"), "--target", "candidate:5", "--layer", "stem",
                  "--format", "npy", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["target_kind"] == "candidate" and record["target_params"] == {"index": 5}
    from camrt.execution.session import ExplainSession
    from camrt.imaging.preprocess import preprocess

    x = preprocess([image], ExplainSession(path).info.preprocessing)
    act, grad = _layer_autograd(model, "stem", torch.from_numpy(x), lambda out: out[0, 4:, 5].sum())
    reference = finalize([(grad.mean(axis=(2, 3))[0][:, None, None] * act[0]).sum(0)], DET_SIZE)
    assert np.abs(np.load(record["heatmap"]) - reference).max() <= 1e-4


# --- Score-CAM with seeded targets: the target's L scored on the masked inputs ---------------
class _TinySegmenter(torch.nn.Module):
    """conv-bn-relu (feat, 6 channels) -> 1x1 conv: logits [B, 3, 32, 32]."""

    def __init__(self):
        super().__init__()
        self.feat = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.head(self.feat(x))


class _TinyEmbedder(_TinySegmenter):
    """The segmenter's logits averaged over the image: an embedding [B, 3]."""

    def forward(self, x):
        return super().forward(x).mean(dim=(2, 3))


@pytest.mark.parametrize("kind", ["seg", "similar"])
def test_scorecam_of_a_seeded_target_matches_pytorch_grad_cam(kind, tmp_path_factory, monkeypatch):
    """Score-CAM scores L on each masked input: a region fixed from the unmasked input (as
    pytorch-grad-cam's SemanticSegmentationTarget) or the cosine to the concept; equal to
    pytorch-grad-cam's ScoreCAM (with the paper's upsampling patched in, as for class targets)."""
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from camrt.explainer import Explainer
    from camrt.seeds.targets import SegmentationTarget, SimilarityTarget

    from .test_perturbation_methods import _patch_score_cam_upsampling

    torch.manual_seed(3)
    model = (_TinySegmenter() if kind == "seg" else _TinyEmbedder()).eval()
    path = _export(tmp_path_factory, model, "feat", (32, 32), f"tiny{kind}")
    x = np.random.default_rng(8).standard_normal((2, 3, 32, 32)).astype(np.float32)
    if kind == "seg":
        with torch.no_grad():
            argmax = model(torch.from_numpy(x)).argmax(1).numpy()
        category = int(np.bincount(argmax.ravel()).argmax())
        target = SegmentationTarget(category)
        references = [SemanticSegmentationTarget(category, (argmax[b] == category).astype(np.float32))
                      for b in range(len(x))]
    else:
        concept = torch.tensor([0.3, -1.0, 0.5])
        target = SimilarityTarget(concept.numpy())
        references = [SimilarityToConceptTarget(concept)] * len(x)
    ours = Explainer(path, method="scorecam", layer="feat").explain(x, targets=target)
    _patch_score_cam_upsampling(monkeypatch)
    with ScoreCAM(model=model, target_layers=[model.feat]) as cam:
        reference = cam(torch.from_numpy(x), targets=references)
    for b in range(len(x)):
        diff = float(np.abs(ours[b].heatmap - _minmax(reference[b])).max())
        print(f"scorecam {kind} image {b}: max diff {diff:.2e}")
        assert np.ptp(reference[b]) > 0.5 and diff <= 1e-4


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory):
    """The small segmenter exported with a seed and FullGrad's bias terms."""
    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(3)
    model = _TinySegmenter().eval()
    onnx_model, _ = export_torch(model, layers=["feat"], input_size=(32, 32), rules=[contract.RULE_VANILLA],
                                 seed=True, fullgrad=True)
    path = tmp_path_factory.mktemp("tinyseg") / "tinyseg.camrt.onnx"
    write_model(onnx_model, path)
    return model, str(path)


@pytest.mark.parametrize("method, reference_class", [
    ("gradcam++", "GradCAMPlusPlus"), ("xgradcam", "XGradCAM"), ("hirescam", "HiResCAM"),
    ("gradcam-elementwise", "GradCAMElementWise"), ("layercam", "LayerCAM"), ("eigengradcam", "EigenGradCAM"),
    ("fullgrad", "FullGrad"),
])
def test_gradient_methods_of_a_seg_target_match_pytorch_grad_cam(tiny_segmenter, method, reference_class):
    """Every gradient method pytorch-grad-cam has, on a seg target through the Explainer, equals
    that class with SemanticSegmentationTarget (FullGrad: every bias term of the model)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from camrt.explainer import Explainer
    from camrt.seeds.targets import SegmentationTarget

    model, path = tiny_segmenter
    x = np.random.default_rng(9).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        argmax = model(torch.from_numpy(x)).argmax(1).numpy()
    category = int(np.bincount(argmax.ravel()).argmax())
    ours = Explainer(path, method=method).explain(x, targets=SegmentationTarget(category))
    layers = [] if method == "fullgrad" else [model.feat]
    with getattr(pytorch_grad_cam, reference_class)(model=model, target_layers=layers) as cam:
        reference = cam(torch.from_numpy(x), targets=[
            SemanticSegmentationTarget(category, (argmax[b] == category).astype(np.float32)) for b in range(len(x))])
    for b in range(len(x)):
        diff = float(np.abs(_minmax(ours[b].heatmap) - _minmax(reference[b])).max())
        print(f"{method} seg image {b}: max diff {diff:.2e}")
        assert np.ptp(reference[b]) > 0.5 and diff <= 1e-4


# --- several seeded targets per image, a concept given as an image -----------------------------
def test_several_seg_targets_per_image_from_the_cli(lraspp, tmp_path):
    """`--target seg:A --target seg:B --region a.png --region b.png`: one record and map per (image,
    target), each with its own region (paired in order; the record names it), equal to pytorch-grad-cam's
    GradCAM + SemanticSegmentationTarget with that region; in the library the two targets of two images
    with one region for both are one forward run and one backward run of 4 seed rows, each map its single
    run's, and with two regions each its own region's."""
    import json

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from camrt.explainer import Explainer
    from camrt.seeded_explain import seeded_fetch
    from camrt.seeds.targets import SegmentationTarget
    from camrt.target_parsing import parse_targets
    from tests.helpers import write_image

    model, path = lraspp
    # the image and region of test_cli_seg_target_with_region: rng 9 with another region gives raw Grad-CAM
    # maps of range 3e-8 at backbone.16, where torch float32's gradient is 1.8e-2 (max-relative) from
    # torch float64's (camrt's 3e-7) and pytorch-grad-cam's normalised maps up to 5e-3 from camrt's
    _, region, x = _image_and_region(tmp_path, path)
    other = np.zeros(SEG_SIZE, np.float32)
    other[64:128, 0:72] = 1
    write_image(str(tmp_path / "other.png"), np.repeat(other[..., None] * 255, 3, axis=2).astype(np.uint8))
    masks = [str(tmp_path / "mask.png"), str(tmp_path / "other.png")]
    first = _frequent_class(model, x)
    classes = [first, (first + 5) % 21]
    args = [arg for c in classes for arg in ("--target", f"seg:{c}")]
    result = _cli("explain", path, str(tmp_path / "img.png"), *args, "--region", masks[0], "--region", masks[1],
                  "--format", "npy", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["rank"], r["target"], r["target_kind"], r["target_params"]) for r in records] == [
        (1, classes[0], "seg", {"class": classes[0], "region": masks[0]}),
        (2, classes[1], "seg", {"class": classes[1], "region": masks[1]})]
    with GradCAM(model=_SegOut(model), target_layers=[model.backbone["16"]]) as cam:
        for record, category, mask, swapped in zip(records, classes, (region, other), (other, region)):
            assert record["heatmap"] == str(tmp_path / "out" / f"img.target{record['rank']}.heatmap.npy")
            heatmap = np.load(record["heatmap"])
            reference = cam(torch.from_numpy(x), targets=[SemanticSegmentationTarget(category, mask)])[0]
            diff = float(np.abs(heatmap - _minmax(reference)).max())
            wrong = cam(torch.from_numpy(x), targets=[SemanticSegmentationTarget(category, swapped)])[0]
            apart = float(np.abs(heatmap - _minmax(wrong)).max())
            print(f"cli seg:{category} of two seeded targets, region {record['target_params']['region']}: "
                  f"max diff {diff:.2e} (the other region's map: {apart:.2f})")
            assert diff <= 1e-4 and apart > 0.1
    explainer = Explainer(path)
    plan = explainer.session.seeded_plan(seeded_fetch(explainer))
    forward_runs, backward_runs = count_runs(plan.forward_session), count_runs(plan.backward_session)
    both = explainer.explain_request(_seg_inputs(), parse_targets([f"seg:{c}" for c in classes],
                                                                  region=str(tmp_path / "mask.png")))
    assert (len(forward_runs), len(backward_runs)) == (1, 1)
    paired = explainer.explain_request(_seg_inputs(), parse_targets([f"seg:{c}" for c in classes], region=masks))
    for b, results in enumerate(both):
        for result, category in zip(results, classes):
            single = explainer.explain(_seg_inputs()[b:b + 1], targets=SegmentationTarget(category, region))[0]
            assert result.target == category and np.abs(result.heatmap - single.heatmap).max() <= 1e-5
        for result, category, mask in zip(paired[b], classes, (region, other)):
            single = explainer.explain(_seg_inputs()[b:b + 1], targets=SegmentationTarget(category, mask))[0]
            assert np.abs(result.heatmap - single.heatmap).max() <= 1e-5


def test_cli_similar_target_with_a_concept_image(embedder, tmp_path):
    """`--target similar:concept.png`: the concept is the file's embedding of that image (one forward
    pass); the map equals pytorch-grad-cam's with SimilarityToConceptTarget of the torch model's
    embedding of the same preprocessed image, the score its cosine."""
    import json

    from pytorch_grad_cam import GradCAM

    from camrt.execution.session import ExplainSession
    from camrt.imaging.preprocess import preprocess
    from tests.helpers import random_image, write_image

    model, path = embedder
    rng = np.random.default_rng(10)
    image, concept_image = random_image(rng, *EMB_SIZE), random_image(rng, 80, 112)
    write_image(str(tmp_path / "img.png"), image)
    write_image(str(tmp_path / "concept.png"), concept_image)
    preprocessing = ExplainSession(path).info.preprocessing
    x, concept_x = preprocess([image], preprocessing), preprocess([concept_image], preprocessing)
    result = _cli("explain", path, str(tmp_path / "img.png"), "--target", f"similar:{tmp_path / 'concept.png'}",
                  "--format", "npy", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["target_kind"] == "similar"
    assert record["target_params"] == {"concept": str(tmp_path / "concept.png"), "dim": 512}
    with torch.no_grad():
        concept = model(torch.from_numpy(concept_x))[0]
        cosine = float(torch.nn.functional.cosine_similarity(model(torch.from_numpy(x)), concept[None])[0])
    assert record["score"] == pytest.approx(cosine, abs=1e-5)
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        reference = cam(torch.from_numpy(x), targets=[SimilarityToConceptTarget(concept)])[0]
    diff = float(np.abs(np.load(record["heatmap"]) - _minmax(reference)).max())
    print(f"cli similar:concept.png gradcam: max diff {diff:.2e}")
    assert diff <= 1e-4
    missing = _cli("explain", path, str(tmp_path / "img.png"), "--target", "similar:nothing.png", "-q")
    assert missing.exit_code == 2 and "similar:nothing.png: no such concept file" in missing.output
