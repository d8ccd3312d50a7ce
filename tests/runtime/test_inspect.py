"""`camrt inspect` on a plain ONNX file: the layer candidates with their shapes, and the default,
which must be the layer `camrt export` then chooses (the exporter is the oracle)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from camrt.cli import build_cli
from camrt.errors import ExitCode


def run(*args: str):
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def _branchy_classifier(path: str) -> None:
    """conv -> sigmoid -> avgpool -> conv1x1 -> sigmoid -> GAP (1x1) -> fc -> softmax, plus a side
    branch from the image to a second output that does not feed the score. Smooth activations:
    the export's finite-difference validation needs no ReLU kinks near its random input."""
    rng = np.random.default_rng(3)
    weights = {
        "w1": rng.normal(0, 0.5, (4, 3, 3, 3)), "w2": rng.normal(0, 0.5, (6, 4, 1, 1)),
        "ws": rng.normal(0, 0.5, (2, 3, 3, 3)), "fc": rng.normal(0, 0.5, (3, 6)), "fb": np.zeros(3),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["a1"]),
        helper.make_node("AveragePool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"]),
        helper.make_node("Sigmoid", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("Conv", ["image", "ws"], ["side"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "branchy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 20])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 2, 16, 20])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def test_plain_onnx_candidates_and_the_exporters_default(exporter, tmp_path):
    from camrt_exporters.export import export_onnx, write_model

    plain = str(tmp_path / "branchy.onnx")
    _branchy_classifier(plain)
    result = run("inspect", plain, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["camrt_file"] is False and summary["input"] == "image" and summary["output"] == "probs"
    # Hand-derived: 3x3 pad 1 keeps 16x20, the 2x2 pool halves it; GAP's 1x1 and the side branch are out.
    # The batch is made dynamic, as `camrt export` makes it.
    nchw = {"layout": "nchw"}
    assert summary["candidates"] == [
        {"layer": "c1", "shape": ["batch", 4, 16, 20], "layout": nchw},
        {"layer": "a1", "shape": ["batch", 4, 16, 20], "layout": nchw},
        {"layer": "p1", "shape": ["batch", 4, 8, 10], "layout": nchw},
        {"layer": "c2", "shape": ["batch", 6, 8, 10], "layout": nchw},
        {"layer": "a2", "shape": ["batch", 6, 8, 10], "layout": nchw},
    ]
    model, _ = export_onnx(plain, rules=["vanilla"], log=lambda message: None)
    exported = str(tmp_path / "branchy.camrt.onnx")
    write_model(model, exported)
    assert summary["default_layer"] == json.loads(run("inspect", exported, "--json").stdout)["default_layer"] == "a2"
    text = run("inspect", plain).stdout
    assert "plain ONNX" in text and "  a2 (nchw)  [batch, 6, 8, 10]   (default)" in text


def test_plain_onnx_without_an_image_input(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "flat",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])
    path = tmp_path / "flat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = run("inspect", str(path))
    assert result.exit_code == ExitCode.MODEL_ERROR and "no rank-4 (NCHW or NHWC) graph input" in result.stderr
