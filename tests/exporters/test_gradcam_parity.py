"""camrt's Grad-CAM equals pytorch-grad-cam 1.5.7's GradCAM on the same model, layer, input, targets.

Both maps are min-max normalised; criterion max|camrt - pytorch-grad-cam| <= 1e-4. The input is
already 224x224 (no resampling on either side). Targets: explicit classes, and -1 (top-1), which
must resolve to the argmax of the logits as pytorch-grad-cam's default does.

densenet121's `features` is not in the list: torchvision applies an in-place ReLU to that module's
output, so pytorch-grad-cam's tensor hook sees the gradient of the pre-ReLU version while its
activation is post-ReLU; camrt (like torch autograd on the layer output) uses the post-ReLU tensor
for both.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract

from .models import load

pytest.importorskip("pytorch_grad_cam")
CASES = [("resnet18", "layer4"), ("mobilenet_v3_large", "features"), ("regnet_y_400mf", "trunk_output"),
         ("efficientnet_lite0", "_bn1")]


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)


@pytest.mark.parametrize("name,layer", CASES)
def test_gradcam_matches_pytorch_grad_cam(tmp_path, name, layer):
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer
    from camrt_exporters.export import export_torch, write_model
    from camrt_exporters.torch_frontend import parse_layer

    model = load(name)
    onnx_model, _ = export_torch(model, layers=[layer], rules=[contract.RULE_VANILLA])
    path = tmp_path / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    x = np.random.default_rng(3).standard_normal((3, 3, 224, 224)).astype(np.float32)
    explainer = Explainer(str(path), method="gradcam")
    explicit = [7, 250, 999]
    ours = explainer.explain(x, targets=explicit)
    top1 = explainer.explain(x)
    with torch.no_grad():
        argmax = model(torch.from_numpy(x)).argmax(1).tolist()
    assert [r.target for r in top1] == argmax
    module = dict(model.named_modules())[parse_layer(model, layer).module]
    with GradCAM(model=model, target_layers=[module]) as cam:
        for targets, results in [(explicit, ours), (argmax, top1)]:
            reference = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in targets])
            for i, result in enumerate(results):
                diff = np.abs(_minmax(result.heatmap) - _minmax(reference[i])).max()
                assert diff <= 1e-4, f"{name}/{layer} sample {i} target {targets[i]}: max diff {diff:.2e}"
