"""LeGrad equals torchcam 0.5's LeGrad.

torchcam's LeGrad hooks ``self_attention: nn.MultiheadAttention`` children and projects the tokens
with torchvision's ``heads(encoder.ln(tokens.mean(dim=1)))``: it runs on torchvision's
VisionTransformer only (not on timm's, whose attention modules it cannot hook). The model is
torchvision's VisionTransformer with vit_tiny's dimensions (12 layers, 3 heads, 192 channels, MLP
768) at 112x112 (a 7x7 patch grid), random weights (seed 0; torchvision initialises the classifier
to zeros, so it is redrawn: a zero head has zero gradients and would compare nothing), two of
scikit-image's photographs, explicit targets. camrt's file: `camrt export --attention-layer-scores`
(torchvision's nn.MultiheadAttention computes its attention with F.scaled_dot_product_attention,
written out at export). Criterion: raw maps [B, 7, 7] (torchcam ``normalized=False``) within 1e-4
of torchcam's, relative to its maximum; all blocks, and the last four (torchcam's documented use).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import imagenet_photos

from .test_attention_methods import SIZE, _assert_close, _raw_maps

pytest.importorskip("torchcam")
TARGETS = [3, 17]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(0)
    model = VisionTransformer(image_size=SIZE, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
                              mlp_dim=768, num_classes=20).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    onnx_model, _ = export_torch(model, input_size=(SIZE, SIZE), rules=[], attention=[], attention_layer_scores=True)
    path = tmp_path_factory.mktemp("legrad") / "tv-vit.camrt.onnx"
    write_model(onnx_model, path)
    return model, str(path)


@pytest.mark.parametrize("last_blocks", [0, 4])
def test_legrad_matches_torchcam(exported, last_blocks):
    import torch
    from torchcam.methods import LeGrad

    model, path = exported
    x = imagenet_photos(SIZE)
    blocks = list(model.encoder.layers)[-last_blocks:] if last_blocks else list(model.encoder.layers)
    with LeGrad(model, blocks) as cam:
        scores = model(torch.from_numpy(x))
        reference = cam(TARGETS, scores, normalized=False)[0].detach().numpy().astype(np.float64)
    ours = _raw_maps(path, "legrad", x, TARGETS, last_blocks=last_blocks)
    _assert_close(ours, reference, f"legrad vs torchcam, last_blocks={last_blocks}")
