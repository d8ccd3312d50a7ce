"""Attention rollout, Chefer et al.'s gradient-weighted rollout and LeGrad equal their authors' formulas.

Models: timm's vit_tiny_patch16_224 (class token) and deit_tiny_distilled_patch16_224 (class and
distillation tokens) at img_size=112 (a 7x7 patch grid), random weights (seed 0), exported with
`--attention` from torch (and vit_tiny from a plain ONNX file of it). Input: scikit-image's chelsea
at 112x112, ImageNet normalisation; explicit targets. The oracle runs the torch model with timm's
unfused attention (``fused_attn = False``), collects each block's attention probabilities at
``attn.attn_drop`` (the softmax output) with their gradient of the target logit from torch autograd,
and applies the formulas as the papers and the authors' code write them (written here, independently
of camrt): Abnar & Zuidema 2020 eq. 1, Chefer, Gur, Wolf, ICCV 2021 eqs. 5-6, and LeGrad (Bousselham
et al.; the layer score of block l is the model's final norm and head applied to the mean of the
block's tokens, differentiated with respect to the block's own attention). Criterion: camrt's raw
map [B, 7, 7] within 1e-4 of the oracle's, relative to the oracle's maximum. (LeGrad against
torchcam 0.5, which hooks torchvision's attention modules only: test_legrad_torchcam.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract
from camrt.errors import ModelError
from tests.helpers import imagenet_photos

timm = pytest.importorskip("timm")
pytest.importorskip("skimage")

SIZE = 112
GRID = (7, 7)
TOLERANCE = 1e-4
#: model -> the extra tokens before the patch tokens (class; class and distillation)
MODELS = {"vit_tiny_patch16_224": (0,), "deit_tiny_distilled_patch16_224": (0, 1)}
TARGETS = [281, 7]



def _model(name: str):
    import torch

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=SIZE).eval()


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """(model name, torch model, contract file with attention maps)."""
    from camrt_exporters.export import export_torch, write_model

    model = _model(request.param)
    onnx_model, _ = export_torch(model, input_size=(SIZE, SIZE), rules=[], attention=[], attention_layer_scores=True)
    path = tmp_path_factory.mktemp("attention") / f"{request.param}.camrt.onnx"
    write_model(onnx_model, path)
    return request.param, model, str(path)


def _torch_attention(model, x: np.ndarray, targets, layer_scores: bool = False, objective=None):
    """Each block's attention probabilities and d logit[target] / d them, from timm's unfused path;
    with `layer_scores`, instead d s^l[target] / d them, s^l LeGrad's score of block l: the mean of the
    block's output tokens through the final norm and the head (timm's forward_head, every token the mean);
    with `objective` (logits -> a scalar), d objective / d them."""
    import copy

    import torch

    model = copy.deepcopy(model)
    maps, outputs = [], []

    def collector(into: list):
        def collect(module, args, out) -> None:
            into.append(out)

        return collect

    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(collector(maps))
        block.register_forward_hook(collector(outputs))
    logits = model(torch.from_numpy(x))
    rows, columns = torch.arange(len(targets)), torch.tensor(targets)
    if objective is not None:
        grads = torch.autograd.grad(objective(logits), maps)
    elif not layer_scores:
        grads = torch.autograd.grad(logits[rows, columns].sum(), maps)
    else:
        scores = [model.forward_head(model.norm(out.mean(dim=1, keepdim=True).expand_as(out))) for out in outputs]
        grads = [torch.autograd.grad(score[rows, columns].sum(), attention, retain_graph=True)[0]
                 for score, attention in zip(scores, maps)]
    return [m.detach().double() for m in maps], [g.double() for g in grads]


def _legrad(layer_grads, extra: int):
    """LeGrad as the authors' code writes it: per block grad.clamp(min=0).mean over heads and queries,
    the patch keys, averaged over blocks."""
    import torch

    maps = [grad.clamp(min=0).mean(dim=1).mean(dim=1)[:, extra:] for grad in layer_grads]
    return torch.stack(maps).mean(dim=0).reshape(-1, *GRID).numpy()


def _rollout_paper(maps, extra: int, fusion: str = "mean", discard_ratio: float = 0.0):
    """Abnar & Zuidema 2020 eq. 1 (0.5 A + 0.5 I, rows re-normalised, product from the input up),
    with vit-explain's head fusion and discard_ratio (per sample), class-token row over the patches."""
    import torch

    tokens = maps[0].shape[-1]
    eye = torch.eye(tokens, dtype=torch.float64)
    result = eye.expand(maps[0].shape[0], tokens, tokens)
    for attention in maps:
        fused = {"mean": attention.mean(dim=1), "max": attention.max(dim=1)[0], "min": attention.min(dim=1)[0]}[fusion]
        if discard_ratio:
            flat = fused.reshape(fused.shape[0], -1).clone()
            for row in flat:
                _, indices = row.topk(int(row.numel() * discard_ratio), largest=False)
                row[indices[indices != 0]] = 0
            fused = flat.reshape(fused.shape)
        a = (fused + eye) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result[:, 0, extra:].reshape(-1, *GRID).numpy()


def _chefer_iccv(maps, grads, extra: int):
    """Chefer, Gur, Wolf ICCV 2021 eqs. 5-6 as their ViT code writes them (avg_heads,
    apply_self_attention_rules): R = I; R += mean_h((grad * A).clamp(min=0)) @ R; R[0, patches]."""
    import torch

    tokens = maps[0].shape[-1]
    relevance = torch.eye(tokens, dtype=torch.float64).repeat(maps[0].shape[0], 1, 1)
    for attention, grad in zip(maps, grads):
        cam = (grad * attention).clamp(min=0).mean(dim=1)
        relevance = relevance + torch.matmul(cam, relevance)
    return relevance[:, 0, extra:].reshape(-1, *GRID).numpy()


def _raw_maps(path: str, method: str, x: np.ndarray, targets, **options) -> np.ndarray:
    from camrt import Explainer
    from camrt.execution.context import ExplainContext
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(path, method=method, **options)
    values = explainer.session.run(x, targets, explainer.fetch)
    context = ExplainContext(explainer.session, x, values[contract.TARGET_INDEX_OUTPUT])
    return explainer.method.explain(GraphOutputs(values, x, context), layer=None)


def _assert_close(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert ours.shape == reference.shape, what
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"{what}: max relative difference {error:.2e}")
    assert error <= TOLERANCE, f"{what}: {error:.2e}"
    assert np.ptp(reference) > 1e-3 * np.abs(reference).max(), f"{what}: degenerate reference"


def test_metadata_lists_every_block_and_the_token_grid(exported):
    from camrt.modelfile.metadata import read_contract

    name, model, path = exported
    attention = read_contract(path).attention
    assert attention.maps == tuple(f"blocks.{i}.attn" for i in range(len(model.blocks)))
    assert attention.tokens == contract.LayerLayout(contract.LAYOUT_TOKENS, GRID, MODELS[name])


@pytest.mark.parametrize("fusion, discard_ratio", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.9)])
def test_rollout_matches_the_paper(exported, fusion, discard_ratio):
    name, model, path = exported
    x = imagenet_photos(SIZE)
    maps, _ = _torch_attention(model, x, TARGETS)
    reference = _rollout_paper(maps, len(MODELS[name]), fusion, discard_ratio)
    ours = _raw_maps(path, "attention-rollout", x, TARGETS, head_fusion=fusion, discard_ratio=discard_ratio)
    _assert_close(ours, reference, f"rollout {name} {fusion} discard {discard_ratio}")


def test_generic_attention_matches_chefer_iccv_2021(exported):
    name, model, path = exported
    x = imagenet_photos(SIZE)
    maps, grads = _torch_attention(model, x, TARGETS)
    ours = _raw_maps(path, "generic-attention", x, TARGETS)
    _assert_close(ours, _chefer_iccv(maps, grads, len(MODELS[name])), f"generic-attention {name}")


def test_generic_attention_explains_seeded_targets(tmp_path):
    """On a file with the seed entry the attention gradients are those of the target's L: similar:CONCEPT
    (the cosine of the logits to a concept) equals the formula on torch autograd of that cosine, and a class
    list (one forward pass, one stacked backward pass) equals each class explained alone (heatmaps, 1e-4)."""
    import torch

    from camrt import Explainer, postprocess
    from camrt.target_parsing import parse_target, parse_targets
    from camrt_exporters.export import export_torch, write_model

    model = _model("vit_tiny_patch16_224")
    onnx_model, _ = export_torch(model, input_size=(SIZE, SIZE), rules=[], attention=[], seed=True)
    path = tmp_path / "vit.camrt.onnx"
    write_model(onnx_model, path)
    x = imagenet_photos(SIZE)
    concept = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    np.save(tmp_path / "concept.npy", concept)
    explainer = Explainer(path, method="generic-attention")

    def cosine(logits):
        return torch.nn.functional.cosine_similarity(logits, torch.from_numpy(concept)[None], dim=1).sum()

    maps, grads = _torch_attention(model, x, TARGETS, objective=cosine)
    reference = _chefer_iccv(maps, grads, 1)
    similar = explainer.explain_request(x, parse_target(f"similar:{tmp_path / 'concept.npy'}"))
    for i, [explained] in enumerate(similar):
        expected = postprocess.finalize([reference[i]], (SIZE, SIZE), apply_relu=explainer.method.relu,
                                        fusion=explainer.method.layer_fusion())
        np.testing.assert_allclose(explained.heatmap, expected, rtol=0, atol=1e-4)
    stacked = explainer.explain_request(x, parse_targets(["281,7"]))
    for rank, target in enumerate((281, 7)):
        alone = explainer.explain_request(x, parse_target(str(target)))
        for i in range(len(x)):
            np.testing.assert_allclose(stacked[i][rank].heatmap, alone[i][0].heatmap, rtol=0, atol=1e-4)


def test_legrad_matches_the_authors_formula(exported):
    name, model, path = exported
    x = imagenet_photos(SIZE)
    _, layer_grads = _torch_attention(model, x, TARGETS, layer_scores=True)
    _assert_close(_raw_maps(path, "legrad", x, TARGETS), _legrad(layer_grads, len(MODELS[name])), f"legrad {name}")
    _assert_close(_raw_maps(path, "legrad", x, TARGETS, last_blocks=4), _legrad(layer_grads[-4:], len(MODELS[name])),
                  f"legrad {name}, last 4 blocks")


def _plain_onnx(model, path, opset: int | None = None) -> str:
    import torch

    torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=True, input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
                      **({"opset_version": opset} if opset else {}))
    return str(path)


@pytest.fixture
def camrt_cli(exporters_plugin):
    """`camrt ARGS...` through click's runner, with `camrt export` registered."""
    from click.testing import CliRunner

    from camrt.cli import build_cli

    return lambda *args: CliRunner().invoke(build_cli(), list(args))


@pytest.mark.slow
def test_plain_onnx_file_gives_the_same_maps(tmp_path, camrt_cli):
    """vit_tiny through torch.onnx.export and `camrt export --attention` (the ONNX front end: maps
    found as Softmax nodes, the token grid established from the graph, every map's gradient validated
    by finite differences): the same maps as the oracle; legrad is refused (no layer scores)."""
    from camrt import Explainer

    model = _model("vit_tiny_patch16_224")
    path = str(tmp_path / "vit.camrt.onnx")
    result = camrt_cli("export", _plain_onnx(model, tmp_path / "vit.onnx"), "-o", path, "--rules", "", "--attention")
    assert result.exit_code == 0, result.output
    assert "over 7x7 patches and extra tokens at [0]" in result.output
    validated = [line for line in result.output.splitlines() if line.startswith("validated camrt/attn_grad/")]
    assert len(validated) == len(model.blocks) and all("finite-difference" in line for line in validated)
    x = imagenet_photos(SIZE)
    maps, grads = _torch_attention(model, x, TARGETS)
    _assert_close(_raw_maps(path, "attention-rollout", x, TARGETS), _rollout_paper(maps, 1), "rollout onnx")
    _assert_close(_raw_maps(path, "generic-attention", x, TARGETS), _chefer_iccv(maps, grads, 1),
                  "generic-attention onnx")
    with pytest.raises(ModelError, match=r"camrt/attn_layer_grad/.*"
                                         r"`camrt export \.\.\. --attention --attention-layer-scores` from the torch "
                                         r"model"):
        Explainer(path, method="legrad")


def test_fused_attention_op_is_refused_with_the_fix(tmp_path, camrt_cli):
    """torch.onnx.export at opset 23 writes timm's fused attention as one ONNX Attention op."""
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, depth=1).eval()
    plain = _plain_onnx(model, tmp_path / "fused.onnx", opset=23)
    result = camrt_cli("export", plain, "-o", str(tmp_path / "out.camrt.onnx"), "--rules", "", "--attention")
    assert result.exit_code != 0
    assert "(Attention) computes attention probabilities inside one fused op" in result.output
    assert "opset_version <= 22, or timm's attention modules with fused_attn=False" in result.output
    assert not (tmp_path / "out.camrt.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--attention-layer-scores"], "--attention-layer-scores applies to torch sources"),
    (["--attention", "--attention-tokens", "7,7,0"], "--attention-tokens '7,7,0': expected tokens[:HxW[:P,P...]]"),
    (["--layout", "x=tokens:7"], "--layout 'x=tokens:7': expected LAYER=nchw|nhwc|tokens[:HxW[:P,P...]]"),
], ids=["layer-scores-onnx", "bad-tokens", "bad-layout"])
def test_attention_flags_are_checked(tmp_path, camrt_cli, args, message):
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(b"")
    result = camrt_cli("export", str(plain), "-o", str(tmp_path / "out.camrt.onnx"), *args)
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("spec, expected", [
    ("tokens:7x7:0", ((7, 7), (0,))),  # as the graph establishes it
    ("tokens:7x7", ((7, 7), (0,))),  # the extra tokens: the leading ones of the maps' 50
    ("tokens:7x7:49", ((7, 7), (49,))),  # a trailing extra token, as given (the graph is not consulted)
])
def test_attention_tokens_take_the_layout_syntax(tmp_path, spec, expected):
    """`--attention-tokens` is a tokens SPEC of `--layout`, completed against the maps' length T = 50
    (a one-block vit_tiny at 112 px: 7x7 patches and a class token) and stored as given."""
    from camrt.modelfile.metadata import parse_contract
    from camrt_exporters.export import export_onnx
    from camrt_exporters.layouts import parse_attention_tokens

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, depth=1).eval()
    plain = _plain_onnx(model, tmp_path / "plain.onnx")
    exported, _ = export_onnx(plain, rules=[], attention=[], attention_tokens=parse_attention_tokens(spec))
    attention = parse_contract({p.key: p.value for p in exported.metadata_props}).attention
    assert attention.tokens == contract.LayerLayout(contract.LAYOUT_TOKENS, *expected)


def test_attention_tokens_that_the_maps_cannot_hold_are_refused(tmp_path):
    from camrt_exporters.errors import ExportError
    from camrt_exporters.export import export_onnx
    from camrt_exporters.layouts import parse_attention_tokens

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, depth=1).eval()
    plain = _plain_onnx(model, tmp_path / "plain.onnx")
    with pytest.raises(ExportError, match=r"no attention map attends over the 37 tokens"):
        export_onnx(plain, rules=[], attention=[], attention_tokens=parse_attention_tokens("tokens:6x6:0"))
    with pytest.raises(ExportError, match=r"--attention-tokens: 51 tokens do not hold a 7x7 grid and the extra tokens at \[0, 60\]"):
        export_onnx(plain, rules=[], attention=[], attention_tokens=parse_attention_tokens("tokens:7x7:0,60"))


def test_file_without_attention_maps_is_refused(tmp_path):
    from camrt import Explainer
    from camrt_exporters.export import export_torch, write_model

    model = _model("vit_tiny_patch16_224")
    onnx_model, _ = export_torch(model, input_size=(SIZE, SIZE), rules=[], layers=["blocks.11.norm1"])
    path = tmp_path / "no-attention.camrt.onnx"
    write_model(onnx_model, path)
    for method in ("attention-rollout", "generic-attention", "legrad"):
        with pytest.raises(ModelError, match=r"attention maps.*re-export it with `camrt export \.\.\. --attention"):
            Explainer(str(path), method=method)
