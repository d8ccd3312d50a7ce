"""ViT-ReciproCAM equals the authors' formula written in torch.

Models: timm's vit_tiny_patch16_224 (class token) and deit_tiny_distilled_patch16_224 (class and
distillation tokens) at img_size=112 (a 7x7 token grid), random weights (seed 0), exported from
torch with their default layer (the last block's norm1). Input: scikit-image's chelsea and coffee.
The oracle (Byun & Lee 2023, section 3, as the authors' OpenVINO XAI 1.1 computes it) runs the torch
model up to the last block, builds the 49 masks itself (the 3x3 kernel (2 - |di|)(2 - |dj|) / 16
around each grid token, 0 elsewhere, 1 on the extra tokens), multiplies the block's input (the
residual stream) and its norm1 output by each, finishes the block, the final norm and the head, and
reads the target logit: S(i, j). Criterion: camrt's raw map [B, 7, 7] within 1e-4 of the oracle's,
relative to its largest magnitude. (Against OpenVINO XAI 1.1 itself on an OpenVINO model of the same
ONNX file: docs/transformer-methods.md.)
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract
from tests.helpers import imagenet_photos

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")
pytest.importorskip("skimage")

SIZE = 112
GRID = 7
TOLERANCE = 1e-4
TARGETS = [281, 7]
#: model -> its extra tokens (class; class and distillation)
MODELS = {"vit_tiny_patch16_224": (0,), "deit_tiny_distilled_patch16_224": (0, 1)}



def _token_weights(extra: int) -> torch.Tensor:
    """[h*w masks, tokens]: the weight of every token under the mask centred at each grid token."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    di = np.abs(rows[:, None] - rows[None, :])
    dj = np.abs(cols[:, None] - cols[None, :])
    grid = np.where((di <= 1) & (dj <= 1), (2 - di) * (2 - dj) / 16.0, 0.0)
    return torch.from_numpy(np.concatenate([np.ones((GRID * GRID, extra)), grid], axis=1)).float()


def _oracle(model, x: np.ndarray, targets, extra: int) -> np.ndarray:
    weights = _token_weights(extra)
    maps = []
    with torch.no_grad():
        for image, target in zip(torch.from_numpy(x), targets):
            tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))
            for block in model.blocks[:-1]:
                tokens = block(tokens)
            last = model.blocks[-1]
            stream = tokens * weights[:, :, None]  # [masks, T, C]
            normed = last.norm1(tokens) * weights[:, :, None]
            y = stream + last.drop_path1(last.ls1(last.attn(normed)))
            y = y + last.drop_path2(last.ls2(last.mlp(last.norm2(y))))
            logits = model.forward_head(model.norm(y))
            maps.append(logits[:, target].reshape(GRID, GRID).numpy())
    return np.stack(maps)


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, img_size=SIZE).eval()
    onnx_model, _ = export_torch(model, input_size=(SIZE, SIZE), rules=[])
    path = tmp_path_factory.mktemp("reciprocam") / "model.camrt.onnx"
    write_model(onnx_model, path)
    return request.param, model, str(path)


def _raw_maps(path: str, x: np.ndarray, targets, **options) -> tuple[np.ndarray, str]:
    from camrt import Explainer
    from camrt.execution.context import ExplainContext
    from camrt.methods.base import GraphOutputs

    explainer = Explainer(path, method="vit-reciprocam", **options)
    values = explainer.session.run(x, targets, explainer.fetch)
    context = ExplainContext(explainer.session, x, values[contract.TARGET_INDEX_OUTPUT])
    layer = explainer.layers[0]
    return explainer.method.explain(GraphOutputs(values, x, context), layer=layer), layer


@pytest.mark.parametrize("batch_size", [32, 7])
def test_vit_reciprocam_matches_the_formula(exported, batch_size):
    name, model, path = exported
    x = imagenet_photos(SIZE)
    ours, layer = _raw_maps(path, x, TARGETS, batch_size=batch_size)
    reference = _oracle(model, x, TARGETS, len(MODELS[name]))
    assert layer == "blocks.11.norm1"
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"{name} batch_size {batch_size}: max relative difference {error:.2e}")
    assert error <= TOLERANCE, f"{name}: {error:.2e}"
    assert np.ptp(reference) > 1e-3 * np.abs(reference).max(), "degenerate reference"


def test_vit_reciprocam_explains_a_similarity_target(tmp_path):
    """On a headless vit_tiny exported with --seed (its score: the [B, 192] embedding), `similar:`
    makes S(i, j) the cosine of the masked pass's embedding with the concept: the oracle above with
    that score. The Explainer serves it end to end, L being torch's cosine."""
    from camrt import Explainer
    from camrt.execution.context import ExplainContext
    from camrt.methods.base import GraphOutputs
    from camrt.seeds.targets import SeededPasses, SimilarityTarget
    from camrt.targets import ClassTarget
    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, num_classes=0).eval()
    onnx_model, _ = export_torch(model, input_size=(SIZE, SIZE), rules=[], seed=True)
    path = str(tmp_path / "headless.camrt.onnx")
    write_model(onnx_model, path)
    x = imagenet_photos(SIZE)
    with torch.no_grad():
        embeddings = model(torch.from_numpy(x)).double()
    concept = embeddings[1].numpy() + np.random.default_rng(0).normal(0, 0.1, embeddings.shape[1])
    target = SimilarityTarget(concept)
    explainer = Explainer(path, method="vit-reciprocam")
    values = explainer.session.run(x, ClassTarget(), explainer.fetch)
    seeds, _ = target.seeds(values)
    context = ExplainContext(explainer.session, x, np.full(len(x), contract.TOP1_TARGET),
                             seeded=SeededPasses(target, seeds.values))
    ours = explainer.method.explain(GraphOutputs(values, x, context), layer=explainer.layers[0])

    weights = _token_weights(1)
    reference = []
    with torch.no_grad():
        for image in torch.from_numpy(x):
            tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))
            for block in model.blocks[:-1]:
                tokens = block(tokens)
            last = model.blocks[-1]
            normed = last.norm1(tokens) * weights[:, :, None]
            y = tokens * weights[:, :, None] + last.drop_path1(last.ls1(last.attn(normed)))
            y = y + last.drop_path2(last.ls2(last.mlp(last.norm2(y))))
            masked = model.forward_head(model.norm(y)).double()
            reference.append(torch.nn.functional.cosine_similarity(masked, torch.from_numpy(concept)[None], dim=1)
                             .reshape(GRID, GRID).numpy())
    reference = np.stack(reference)
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"similar: max relative difference {error:.2e}")
    assert error <= TOLERANCE and np.ptp(reference) > 1e-3 * np.abs(reference).max()
    results = explainer.explain(x, targets=target)
    expected = torch.nn.functional.cosine_similarity(embeddings, torch.from_numpy(concept)[None], dim=1).numpy()
    assert [r.record()["target_kind"] for r in results] == ["similar", "similar"]
    np.testing.assert_allclose([r.score for r in results], expected, rtol=1e-5)


def test_masks_are_the_kernel_around_each_token():
    """Closed form: a corner token's mask keeps 4 of the 9 kernel weights, an interior one all 9."""
    from camrt.methods.vit_reciprocam import gaussian_masks

    masks = gaussian_masks(3, 4)
    assert masks.shape == (12, 3, 4)
    assert np.allclose(masks[0], [[4, 2, 0, 0], [2, 1, 0, 0], [0, 0, 0, 0]] / np.float32(16))
    assert np.isclose(masks[5].sum(), 1.0) and masks[5][1, 1] == 0.25
