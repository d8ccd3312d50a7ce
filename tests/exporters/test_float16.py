"""Float16 models (onnxconverter-common's `convert_float_to_float16`): the forward stays float16.

Oracles: torch autograd in float64 on the torch model the float16 file was converted from, the file
being no further from it than twice torch's own float16 autograd (float16's tolerance: a float16
forward pass flips ReLU and Hardswish switches and rounds the values the backward multiplies by, so
torch float16 itself is 16-17% off float64 in input gradients), and the float32 file's Grad-CAM
heatmaps on the photographs (the runtime feeds the float16 image itself).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from camrt import Explainer, contract
from camrt_exporters.export import export_onnx, write_model

from . import edge_models, models

pytest.importorskip("onnxconverter_common")

#: ONNX default layer -> the torch module whose output it is.
TORCH_LAYERS = {"resnet18": "layer4", "mobilenet_v3_large": "features"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (torch model, float32 ONNX path, float16 ONNX path), made once per module."""
    made = {}

    def make(name: str):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            model = models.load(name)
            float_path = edge_models.export_float(model, folder / "float.onnx")
            made[name] = model, float_path, edge_models.convert_float16(float_path, folder / "fp16.onnx")
        return made[name]

    return make


def _torch_gradients(model, x: np.ndarray, targets: np.ndarray, layer: str, dtype: torch.dtype):
    """(layer gradient, input gradient) in float64 numpy of torch autograd computing in `dtype`."""
    model = model.to(dtype)
    captured = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, out: captured.update(out=out))
    try:
        image = torch.from_numpy(x).to(dtype).requires_grad_(True)
        logits = model(image)
        captured["out"].retain_grad()
        logits[torch.arange(len(x)), torch.from_numpy(targets)].sum().backward()
    finally:
        handle.remove()
        model.float()
    return captured["out"].grad.double().numpy(), image.grad.double().numpy()


def _rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


@pytest.mark.slow  # 40-100 s each (torch's float16 autograd is slow on CPUs)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_float16_gradients_match_torch_float64(name, converted):
    """The float16 file's layer and input gradients on four photographs against torch autograd in float64,
    within twice torch float16's own relative L2 error. Measured (camrt, torch float16): resnet18 layer
    4.7e-4, 2.9e-4, input 0.12, 0.17; mobilenet_v3_large layer 1.8e-2, 2.2e-2, input 0.26, 0.16."""
    model, _, half_path = converted(name)
    exported, _ = export_onnx(half_path, rules=("vanilla",))
    layer = json_layers(exported)[0]
    x = edge_models.photo_batch()
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [contract.TARGET_INDEX_OUTPUT, contract.activation_output(layer), contract.gradient_output(layer),
             contract.input_gradient_output("vanilla")]
    targets, activation, layer_grad, input_grad = session.run(
        names, {"input": x.astype(np.float16), contract.TARGET_INPUT: np.full(len(x), contract.TOP1_TARGET, np.int64)})
    assert activation.dtype == layer_grad.dtype == input_grad.dtype == np.float16  # forward and backward in float16
    truth = _torch_gradients(model, x, targets, TORCH_LAYERS[name], torch.float64)
    torch_half = _torch_gradients(model, x, targets, TORCH_LAYERS[name], torch.float16)
    for got, want, own in zip((layer_grad, input_grad), truth, torch_half):
        assert _rel_l2(got, want) <= 2 * _rel_l2(own, want), (_rel_l2(got, want), _rel_l2(own, want))


def test_float16_gradcam_agrees_with_float32(converted, tmp_path):
    """Grad-CAM of the float16 file (fed float16 images by the runtime) against the float32 file's on the
    photographs: Pearson >= 0.999 and max abs <= 0.02 of the [0, 1] heatmaps (measured 0.99999, 4e-3)."""
    _, float_path, half_path = converted("resnet18")
    heatmaps = []
    for path in (float_path, half_path):
        write_model(export_onnx(path, rules=())[0], tmp_path / f"{path.stem}.camrt.onnx")
        explainer = Explainer(tmp_path / f"{path.stem}.camrt.onnx", method="gradcam", device="cpu")
        heatmaps.append(np.stack([e.heatmap for e in explainer.explain(list(edge_models.photo_pixels()))]))
    full, half = heatmaps
    pearson = np.corrcoef(full.ravel(), half.ravel())[0, 1]
    print(f"float16 vs float32 Grad-CAM: Pearson {pearson:.6f}, max abs {np.abs(full - half).max():.2e}")
    assert pearson >= 0.999 and np.abs(full - half).max() <= 0.02


def json_layers(model: onnx.ModelProto) -> list[str]:
    import json

    return json.loads({p.key: p.value for p in model.metadata_props}[contract.META_LAYERS])


def test_float16_file_with_a_seed_entry_matches_torch(tmp_path):
    """A float16 file exported with `seed=True` (the seed entry of main's seeded targets): the export
    self-check passes on a random seed too, and the runtime's seeded run (`run_seeded`: the float32
    seed and the forward's widened values cast back to the file's float16) gives the input gradient
    of <seed, logits> that torch autograd gives on the same network (float32), within float16's
    rounding: relative L2 <= 1e-2 (measured 5e-4)."""
    from camrt.execution.session import ExplainSession

    from .tiny_models import conv_relu_maxpool_gap_gemm_softmax, torch_equivalent

    base = conv_relu_maxpool_gap_gemm_softmax(batch="N")
    for constant in [n for n in base.graph.node if n.op_type == "Constant"]:  # weights as initializers, as exported
        value = onnx.helper.get_attribute_value(constant.attribute[0])
        value.name = constant.output[0]
        base.graph.initializer.append(value)
        base.graph.node.remove(constant)
    onnx.save(base, tmp_path / "float.onnx")
    half_path = edge_models.convert_float16(tmp_path / "float.onnx", tmp_path / "fp16.onnx")
    model, checks = export_onnx(half_path, seed=True)
    assert any(c.name.startswith("fed a random seed: ") for c in checks) and all(c.ok for c in checks)
    write_model(model, tmp_path / "fp16.camrt.onnx")

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float16).astype(np.float32)  # what the file is fed
    seed = rng.standard_normal((3, 5)).astype(np.float32)
    fetch = contract.input_gradient_output(contract.RULE_VANILLA)
    got = ExplainSession(tmp_path / "fp16.camrt.onnx", device="cpu").run_seeded(x, lambda forward: seed, [fetch])[fetch]

    image = torch.from_numpy(x).requires_grad_(True)
    (torch.from_numpy(seed) * torch_equivalent()(image)[2]).sum().backward()
    error = _rel_l2(got.astype(np.float64), image.grad.double().numpy())
    print(f"float16 seeded input gradient vs torch: relative L2 {error:.2e}")
    assert got.dtype == np.float32 and error <= 1e-2
