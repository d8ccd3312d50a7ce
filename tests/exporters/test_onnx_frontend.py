"""The ONNX front end on a model that never saw torch (onnx.helper, Constant weights, Softmax head)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from camrt import contract
from camrt_exporters.errors import ExportError, UnsupportedOpError
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
    relu.op_type = "Atan"  # a valid op with no backward rule
    path = tmp_path / "celu.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpError) as info:
        export_onnx(path, layers=["conv"], rules=["vanilla"], preprocessing=contract.Preprocessing(16, 16))
    message = str(info.value)
    assert "'Atan'" in message and "'relu'" in message and "pool" in message and "fc" in message


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


def _head_model(pool: str, flatten: str, linear: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """image -> Conv -> Relu ("relu", 4 channels) -> pool -> flatten -> linear -> logits (5 classes);
    returns the model and the [classes, channels] weights of the class scores over the pooled channels."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(7)  # seeds 5, 11: finite-difference validation of "conv" trips on a ReLU kink
    conv_w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight = rng.standard_normal((5, 4)).astype(np.float32)  # class x channel
    inits = {"conv_w": conv_w, "bias": rng.standard_normal(5).astype(np.float32),
             "shape": np.array([-1, 4], dtype=np.int64), "axes": np.array([2, 3], dtype=np.int64)}
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"])]
    nodes.append({
        "gap": helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        "reducemean": helper.make_node("ReduceMean", ["relu"], ["pooled"], axes=[2, 3], keepdims=1),
        "averagepool": helper.make_node("AveragePool", ["relu"], ["pooled"], kernel_shape=[8, 8]),
    }[pool])
    nodes.append({
        "flatten": helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        "reshape": helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
        "squeeze": helper.make_node("Squeeze", ["pooled", "axes"], ["flat"]),
    }[flatten])
    expected = weight
    if linear == "gemm":
        inits["w"] = weight
        nodes.append(helper.make_node("Gemm", ["flat", "w", "bias"], ["logits"], transB=1))
    elif linear == "gemm_alpha":
        inits["w"] = weight.T.copy()
        nodes.append(helper.make_node("Gemm", ["flat", "w", "bias"], ["logits"], alpha=2.0))
        expected = 2 * weight
    elif linear == "matmul_add":
        inits["w"] = weight.T.copy()
        nodes += [helper.make_node("MatMul", ["flat", "w"], ["product"]),
                  helper.make_node("Add", ["product", "bias"], ["logits"])]
    elif linear == "two_layers":
        inits["w"], inits["w2"] = rng.standard_normal((4, 4)).astype(np.float32), weight
        nodes += [helper.make_node("Gemm", ["flat", "w"], ["hidden"], transB=1),
                  helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
                  helper.make_node("Gemm", ["hidden_relu", "w2", "bias"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), expected


@pytest.mark.parametrize("pool, flatten, linear, layer, has_head", [
    ("gap", "flatten", "gemm", "relu", True),
    ("reducemean", "reshape", "matmul_add", "relu", True),
    ("averagepool", "squeeze", "gemm_alpha", "relu", True),
    ("gap", "flatten", "gemm", "conv", False),  # the Relu lies between the layer and the pooling
    ("gap", "flatten", "two_layers", "relu", False),
])
def test_cam_weights_only_for_a_gap_and_linear_head(tmp_path, pool, flatten, linear, layer, has_head):
    """CAM's class weights (Zhou et al. 2016) exist for a layer that feeds global average pooling ->
    flatten -> one linear layer, in each of the forms ONNX files spell them; the output is the
    target's row of the linear layer's weights over the channels (times Gemm's alpha). Any other
    layer or head gets no CAM weights."""
    model, weight = _head_model(pool, flatten, linear)
    path = tmp_path / "head.onnx"
    onnx.save(model, path)
    exported, _ = export_onnx(path, layers=[layer], rules=["vanilla"])
    meta = {p.key: p.value for p in exported.metadata_props}
    assert meta[contract.META_CAM_LAYERS] == (f'["{layer}"]' if has_head else "[]")
    names = [o.name for o in exported.graph.output]
    assert (contract.cam_weights_output(layer) in names) == has_head
    if has_head:
        x = np.random.default_rng(4).standard_normal((3, 3, 8, 8)).astype(np.float32)
        got = run_contract(exported, "image", x, np.array([4, 0, 2]))
        np.testing.assert_array_equal(got[contract.cam_weights_output(layer)], weight[[4, 0, 2]])


def test_cli_export_fullgrad_adds_the_bias_terms_and_the_vanilla_input_gradient(source, tmp_path):
    """`camrt export --fullgrad`: one bias term per bias-carrying Conv (here the one Conv), the vanilla
    input gradient added to the requested rule sets, and `fullgrad` runs on the file; the term is
    d score / d conv * b, checked against d score / d conv from the same file exported with the layer."""
    from click.testing import CliRunner

    from camrt import Explainer
    from camrt.cli import build_cli
    from camrt.modelfile.metadata import read_contract
    from camrt_exporters.autodiff.graph import GraphIndex
    from camrt_exporters.plugin import register_commands

    cli = build_cli()
    register_commands(cli=cli)  # the exporters' plugin hook (entry-point autoloading is off in tests)
    out = tmp_path / "fullgrad.camrt.onnx"
    result = CliRunner().invoke(cli, ["export", str(source), "--fullgrad", "--rules", "guided",
                                              "--layer", "conv", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = read_contract(out)
    assert info.bias_terms == ["conv"] and info.rule_sets == ["guided", "vanilla"]
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got = run_contract(onnx.load(out), "image", x, np.array([-1, 2]))
    bias = GraphIndex(onnx.load(source)).value("conv_b")  # a Constant node
    np.testing.assert_allclose(got[contract.bias_gradient_output("conv")],
                               got[contract.gradient_output("conv")] * bias[None, :, None, None], rtol=1e-6)
    assert Explainer(out, method="fullgrad").explain(x)[0].heatmap.shape == (16, 16)
