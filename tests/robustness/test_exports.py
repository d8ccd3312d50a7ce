"""Exports that must fail cleanly (nothing written), models whose graph produces NaN (refused at
export validation; at run time an error record per input, never a heatmap), 16-bit float,
integer and quantized models (refused by name)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from camrt import contract
from camrt.errors import ExitCode, NonFiniteError
from camrt_exporters.errors import ExportError, ValidationError
from camrt_exporters.export import export_onnx
from tests.exporters.tiny_models import conv_relu_maxpool_gap_gemm_softmax

from .tally import record, refused


def _cli():
    """The camrt CLI with the exporter's `camrt export` (its plugin registered explicitly: the test
    environment disables entry-point autoloading)."""
    from camrt.cli import build_cli
    from camrt.plugins import ensure_registered, get_plugin_manager

    ensure_registered(get_plugin_manager(), "camrt_exporters.plugin")
    return build_cli()


def _export_fails(tmp_path, source: str, *args: str) -> str:
    """`camrt export` must exit 3 with one error line and leave the output folder empty."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = CliRunner().invoke(_cli(), ["export", source, "-o", str(out / "model.camrt.onnx"), *args],
                                catch_exceptions=False)
    assert result.exit_code == ExitCode.MODEL_ERROR, result.output
    assert os.listdir(out) == []  # nothing written, no temporary file left behind
    errors = [line for line in result.stderr.splitlines() if line.startswith("camrt: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    record(tried=1, clear=1)
    return errors[0]


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_unsupported_op_unknown_layer_and_layer_off_the_path(tmp_path):
    model = conv_relu_maxpool_gap_gemm_softmax()
    next(n for n in model.graph.node if n.name == "relu").op_type = "Atan"
    message = _export_fails(tmp_path, _save(model, tmp_path / "atan.onnx"), "--layer", "conv")
    assert "no backward rule for op type 'Atan' (node 'relu'" in message
    source = _save(conv_relu_maxpool_gap_gemm_softmax(), tmp_path / "ok.onnx")
    message = _export_fails(tmp_path, source, "--layer", "reluu")
    assert "tensor 'reluu' does not exist" in message and "relu" in message
    side = helper.make_node("Relu", ["conv"], ["side_branch"], name="side")
    source = _save(conv_relu_maxpool_gap_gemm_softmax(extra_nodes=[side]), tmp_path / "side.onnx")
    message = _export_fails(tmp_path, source, "--layer", "side_branch")
    assert "side_branch" in message and "no differentiable path" in message


def _sqrt_model(batch="N") -> onnx.ModelProto:
    """image -> Sqrt -> Conv -> Relu -> GAP -> Flatten -> Gemm -> Softmax: NaN wherever a
    preprocessed pixel is negative (a dark pixel), finite for bright images."""
    rng = np.random.default_rng(3)
    weights = {"w1": rng.normal(0, 0.5, (4, 3, 3, 3)), "b1": rng.normal(0, 0.1, 4),
               "w2": rng.normal(0, 1, (5, 4)), "b2": rng.normal(0, 0.1, 5)}
    nodes = [
        helper.make_node("Sqrt", ["image"], ["root"], name="sqrt"),
        helper.make_node("Conv", ["root", "w1", "b1"], ["conv"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["feat"], name="relu"),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "sqrt", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 12, 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 5])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_nan_on_the_validation_input_is_refused_at_export(tmp_path):
    source = _save(_sqrt_model(batch=1), tmp_path / "sqrt.onnx")
    error = refused(lambda: export_onnx(source, layers=["feat"], rules=["vanilla"]), ValidationError,
                    "camrt/logits", "NaN/inf value(s)", "the graph itself produces them")
    assert any(m.startswith(contract.activation_output("feat") + ": 1536 NaN") for m in error.mismatches)
    message = _export_fails(tmp_path, source, "--layer", "feat", "--rules", "vanilla")
    assert "export validation failed, nothing was written" in message


@pytest.fixture(scope="module")
def sqrt_camrt(tmp_path_factory) -> str:
    """The Sqrt model as a camrt file, built without validation (it would refuse it): a file that
    is finite on some images and NaN on others, as a model with a Log or Div can be."""
    from camrt_exporters.autodiff.graph import GraphIndex
    from camrt_exporters.autodiff.rules import VANILLA
    from camrt_exporters.contract_file import build_contract_model, choose_score, contract_metadata, prepare

    model = prepare(_sqrt_model())
    score = choose_score(GraphIndex(model), "probs")
    meta = contract_metadata(layers=["feat"], default="feat", preprocessing=contract.Preprocessing(12, 16),
                             rule_sets=["vanilla"], labels=None, source={"framework": "onnx", "model": "sqrt"},
                             score=score, image_input="image", exporter_version="test")
    built = build_contract_model(model, image_input="image", score=score, layers={"feat": "feat"},
                                 input_rule_sets=[VANILLA], vanilla=VANILLA, metadata=meta, keep_outputs=["probs"])
    path = str(tmp_path_factory.mktemp("sqrt") / "sqrt.camrt.onnx")
    onnx.save(built, path)
    return path


def test_nan_at_run_time_is_an_error_record_never_a_heatmap(tmp_path, sqrt_camrt, rng):
    """Bright images (every preprocessed value >= 0) are explained; dark ones get an error record
    saying the model produced NaN, and no heatmap or overlay file. The bright ones' heatmaps equal
    those of explaining each alone."""
    from camrt.cli import build_cli
    from camrt.explainer import Explainer
    from tests.helpers import write_image

    folder = tmp_path / "in"
    folder.mkdir()
    bright = [rng.integers(130, 256, (12, 16, 3), dtype=np.uint8) for _ in range(3)]
    dark = [rng.integers(0, 100, (12, 16, 3), dtype=np.uint8) for _ in range(2)]
    order = ["b0", "d0", "b1", "b2", "d1"]
    arrays = {"b0": bright[0], "b1": bright[1], "b2": bright[2], "d0": dark[0], "d1": dark[1]}
    for name in order:
        write_image(str(folder / f"{name}.png"), arrays[name])
    out = tmp_path / "out"
    result = CliRunner().invoke(build_cli(), ["explain", sqrt_camrt, str(folder), "-o", str(out), "--batch-size", "5",
                                              "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == ExitCode.SOME_INPUTS_FAILED
    records = {os.path.basename(r["input"])[:2]: r for r in map(json.loads, result.stdout.splitlines())}
    assert sorted(records) == sorted(order)
    explainer = Explainer(sqrt_camrt, device="cpu")
    for name in order:
        rec = records[name]
        if name.startswith("d"):
            assert rec["status"] == "error" and "produced NaN or inf" in rec["error"] and "camrt/logits" in rec["error"]
            assert rec["heatmap"] is None and not (out / f"{name}.heatmap.npy").exists()
            assert not (out / f"{name}.overlay.png").exists()
            record(tried=1, clear=1)
        else:
            assert rec["status"] == "ok"
            alone = explainer.explain([arrays[name]])[0]
            np.testing.assert_allclose(np.load(rec["heatmap"]), alone.heatmap, atol=1e-6)
    error = refused(lambda: explainer.explain([bright[0], dark[0], bright[1], dark[1]]), NonFiniteError,
                    "the model produced NaN or inf", "row 1: camrt/logits")
    assert error.rows == [1, 3]


def test_nan_at_run_time_in_eval_is_an_error_record_for_that_image_only(sqrt_camrt, rng):
    """`camrt eval`'s engine explains a chunk as one batch; an image the model turns into NaN gets an
    error record, and the others are scored as when evaluated without it."""
    from camrt.batch.evaluation import Evaluation

    bright = [rng.integers(130, 256, (12, 16, 3), dtype=np.uint8) for _ in range(2)]
    dark = rng.integers(0, 100, (12, 16, 3), dtype=np.uint8)
    runs = []
    for inputs in ([("b0", bright[0]), ("d0", dark), ("b1", bright[1])], [("b0", bright[0]), ("b1", bright[1])]):
        evaluation = Evaluation(sqrt_camrt, ["gradcam"], ["deletion"], metric_options={"deletion": {"steps": 3}},
                                images_per_batch=3, device="cpu")
        try:
            runs.append({r["input"]: r for r in evaluation.run(inputs)})
        finally:
            evaluation.close()
    evaluated, without = runs
    assert evaluated["d0"]["status"] == "error" and "produced NaN or inf" in evaluated["d0"]["error"]
    assert "deletion_auc" not in evaluated["d0"]
    for name in ("b0", "b1"):
        assert evaluated[name]["status"] == "ok"
        assert evaluated[name]["deletion_auc"] == pytest.approx(without[name]["deletion_auc"], rel=1e-6)
    record(tried=1, clear=1)


def _cast_model(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """`model` with its image input and constants converted to `elem_type`."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    for node in converted.graph.node:
        if node.op_type == "Constant":
            tensor = node.attribute[0].t
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np_type), tensor.name))
    converted.graph.input[0].type.tensor_type.elem_type = elem_type
    converted.graph.output[0].type.tensor_type.elem_type = elem_type
    return converted


def test_bfloat16_double_integer_and_operator_quantized_models_are_refused_by_name(tmp_path):
    """float16 and QDQ int8 models export (tests/exporters/test_float16.py, test_quantized.py); these do not."""
    base = conv_relu_maxpool_gap_gemm_softmax()
    double = _save(_cast_model(base, TensorProto.DOUBLE), tmp_path / "double.onnx")
    refused(lambda: export_onnx(double), ExportError, "image input 'image' is double", "float32 or float16")
    bf16_inside = conv_relu_maxpool_gap_gemm_softmax()
    bf16_inside.graph.node.insert(0, helper.make_node("Cast", ["image"], ["image_bf16"], to=TensorProto.BFLOAT16))
    bf16_inside.graph.node.insert(1, helper.make_node("Cast", ["image_bf16"], ["image_back"], to=TensorProto.FLOAT))
    path = _save(bf16_inside, tmp_path / "bf16_inside.onnx")
    refused(lambda: export_onnx(path), ExportError, "'image_bf16' is bfloat16", "float32 or float16")
    uint8 = conv_relu_maxpool_gap_gemm_softmax()
    uint8.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    path = _save(uint8, tmp_path / "uint8.onnx")
    refused(lambda: export_onnx(path), ExportError, "image input 'image' is uint8")
    # An integer op between QuantizeLinear and DequantizeLinear (QOperator-style): the integer step is named.
    qop = conv_relu_maxpool_gap_gemm_softmax()
    relu = next(n for n in qop.graph.node if n.name == "relu")
    relu.output[0] = "relu_float"
    qop.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "scale"),
                                  numpy_helper.from_array(np.uint8(0), "zero")])
    at = [n.name for n in qop.graph.node].index("relu") + 1
    qop.graph.node.insert(at, helper.make_node("DequantizeLinear", ["relu_q2", "scale", "zero"], ["relu"], name="dequantize"))
    qop.graph.node.insert(at, helper.make_node("Identity", ["relu_q"], ["relu_q2"], name="integer_identity"))
    qop.graph.node.insert(at, helper.make_node("QuantizeLinear", ["relu_float", "scale", "zero"], ["relu_q"], name="quantize"))
    path = _save(qop, tmp_path / "qop.onnx")
    refused(lambda: export_onnx(path, layers=["conv"], rules=["vanilla"]), ExportError,
            "no gradient reached tensor 'conv'", "node 'integer_identity' (Identity), whose output is uint8",
            "QuantFormat.QDQ")
