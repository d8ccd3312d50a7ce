"""The ONNX front end on a model that never saw torch (onnx.helper, Constant weights, Softmax head)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from camrt import contract
from camrt.errors import ExportError, UnsupportedOpError
from camrt_exporters.export import export_onnx
from camrt_exporters.validate import run_contract

from .tiny_models import conv_relu_maxpool_gap_gemm_softmax, torch_equivalent


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_relu_maxpool_gap_gemm_softmax(batch=1), path)  # fixed batch 1, made dynamic on export
    return path


def test_gradients_equal_torch_autograd_through_the_softmax_input(source):
    torch = pytest.importorskip("torch")
    model, checks = export_onnx(source, layers=["relu", "pool"], rules=["vanilla", "guided"],
                                preprocessing=contract.Preprocessing(16, 16))
    assert {c.name for c in checks} >= {contract.gradient_output("relu"), contract.input_gradient_output("vanilla")}
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    targets = np.array([-1, 0, 3, -1])
    got = run_contract(model, "image", x, targets)
    forward = torch_equivalent()
    xt = torch.from_numpy(x).requires_grad_(True)
    relu, pooled, logits = forward(xt)
    resolved = torch.where(torch.from_numpy(targets) < 0, logits.argmax(1), torch.from_numpy(targets))
    # the score is the logit (Softmax input), not the probability
    score = logits.gather(1, resolved[:, None]).sum()
    g_relu, g_pool, g_x = torch.autograd.grad(score, [relu, pooled, xt])
    np.testing.assert_array_equal(got[contract.TARGET_INDEX_OUTPUT], resolved.numpy())
    for name, ref in [(contract.LOGITS_OUTPUT, logits), (contract.activation_output("relu"), relu),
                      (contract.gradient_output("relu"), g_relu), (contract.gradient_output("pool"), g_pool),
                      (contract.input_gradient_output("vanilla"), g_x)]:
        ref = ref.detach().numpy()
        np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)
    probabilities = got["probabilities"]
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 1).detach().numpy(), rtol=1e-5)


def test_default_layer_is_last_spatial_tensor_and_is_recorded(source):
    model, _ = export_onnx(source, rules=["vanilla"], preprocessing=contract.Preprocessing(16, 16))
    meta = {p.key: p.value for p in model.metadata_props}
    # pool is 8x8 and feeds GlobalAveragePool (1x1): the last tensor with H, W > 1
    assert meta[contract.META_DEFAULT_LAYER] == "pool"
    assert contract.gradient_output("pool") in [o.name for o in model.graph.output]


def test_one_file_serves_batch_1_and_64(source):
    model, _ = export_onnx(source, layers=["relu"], rules=["vanilla"], preprocessing=contract.Preprocessing(16, 16))
    x = np.random.default_rng(2).standard_normal((64, 3, 16, 16)).astype(np.float32)
    big = run_contract(model, "image", x, np.full(64, -1))
    one = run_contract(model, "image", x[5:6], np.full(1, -1))
    np.testing.assert_allclose(one[contract.gradient_output("relu")][0], big[contract.gradient_output("relu")][5],
                               rtol=1e-5, atol=1e-7)


def test_unknown_layer_lists_nearest_names(source):
    with pytest.raises(ExportError, match=r"'reluu' does not exist.*relu"):
        export_onnx(source, layers=["reluu"], preprocessing=contract.Preprocessing(16, 16))


def test_op_without_rule_names_op_node_and_path(tmp_path):
    model = conv_relu_maxpool_gap_gemm_softmax(batch=1)
    relu = next(n for n in model.graph.node if n.name == "relu")
    relu.op_type = "Celu"  # a valid op with no backward rule
    path = tmp_path / "celu.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpError) as info:
        export_onnx(path, layers=["conv"], rules=["vanilla"], preprocessing=contract.Preprocessing(16, 16))
    message = str(info.value)
    assert "'Celu'" in message and "'relu'" in message and "pool" in message and "fc" in message


def test_layer_without_path_to_score_is_refused(tmp_path):
    side = helper.make_node("Relu", ["conv"], ["side_branch"], name="side")
    path = tmp_path / "side.onnx"
    onnx.save(conv_relu_maxpool_gap_gemm_softmax(batch=1, extra_nodes=[side]), path)
    with pytest.raises(ExportError, match="no differentiable path"):
        export_onnx(path, layers=["side_branch"], preprocessing=contract.Preprocessing(16, 16))


def test_not_onnx_is_refused(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_text("this is not a model")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        export_onnx(path)
