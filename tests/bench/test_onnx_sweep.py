"""bench/onnx_sweep.py's harness: its independent finite-difference checker against closed-form
gradients, a refusal of `camrt export` as a row of the table, and one small model end to end."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "exporters")]

from bench import onnx_sweep  # noqa: E402

CLASSES, SHAPE = 5, (1, 3, 8, 8)


def linear_classifier(weights: np.ndarray, elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """logits = flatten(image) @ weights.T: the gradient of logit t is weights[t]."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("Gemm", ["flat", "weights"], ["logits"], transB=1)],
        "linear",
        [helper.make_tensor_value_info("input", elem_type, ["batch", *SHAPE[1:]])],
        [helper.make_tensor_value_info("logits", elem_type, ["batch", CLASSES])],
        [numpy_helper.from_array(weights, "weights")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_checker_accepts_the_exact_gradient_and_refuses_wrong_ones():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((CLASSES, int(np.prod(SHAPE)))).astype(np.float32)
    session = ort.InferenceSession(linear_classifier(weights).SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal(SHAPE).astype(np.float32)
    target = 3

    def score(points):
        return session.run(["logits"], {"input": points})[0][:, target]

    exact = weights[target].reshape(SHAPE)
    assert onnx_sweep.directional_error(score, x, exact, onnx_sweep.check_directions(exact)).error < 1e-4
    wrong = {"sign": -exact, "other class": weights[0].reshape(SHAPE), "half": exact * 0.5,
             "transposed": exact.transpose(0, 1, 3, 2)}
    for name, gradient in wrong.items():
        checked = onnx_sweep.directional_error(score, x, gradient, onnx_sweep.check_directions(gradient))
        assert checked.error > 0.3 > 10 * checked.noise, (name, checked)


def test_checker_on_a_curved_score_with_a_known_gradient():
    """f(x) = sum(tanh(x) * w): gradient (1 - tanh(x)^2) * w; large steps see the curvature, the
    chosen step pair must not."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal(SHAPE)
    x = rng.standard_normal(SHAPE).astype(np.float32) * 3

    def score(points):
        return (np.tanh(points.astype(np.float32)) * w.astype(np.float32)).sum(axis=(1, 2, 3))

    exact = (1 - np.tanh(x.astype(np.float64)) ** 2) * w
    assert onnx_sweep.directional_error(score, x, exact, onnx_sweep.check_directions(exact)).error < 1e-3


def _args() -> argparse.Namespace:
    return argparse.Namespace(timeout=120.0, skip_torch_export=True, threads=1)


def test_a_refusal_becomes_a_row(tmp_path, monkeypatch):
    """A float64 classifier: `camrt export` refuses it (exit code != 0); the sweep records the
    message and goes on."""
    monkeypatch.setattr(onnx_sweep, "CACHE", tmp_path)
    weights = np.ones((CLASSES, int(np.prod(SHAPE))), np.float64)
    onnx.save(linear_classifier(weights, TensorProto.DOUBLE), tmp_path / "double.legacy.onnx")
    (tmp_path / "double.legacy.json").write_text(json.dumps({"torch_error": None, "torch_export_s": 0.0}))
    row = onnx_sweep.sweep_one("double", "legacy", _args(), onnx_sweep.subprocess_env(1), tmp_path)
    assert row.result.startswith("refused: ") and "double" in row.result, row
    assert row.exit_code not in (0, None) and row.input_grad_error is None
    missing = onnx_sweep.sweep_one("absent", "dynamo", _args(), onnx_sweep.subprocess_env(1), tmp_path)
    assert missing.result == "no plain file: not cached (--skip-torch-export)"


def test_one_torchvision_model_end_to_end(tmp_path, monkeypatch):
    """squeezenet1_1 through torch's legacy exporter and `camrt export` (about 10 s): the file camrt
    writes (or would write, with its self-check off) has the gradient of the plain file's logit."""
    monkeypatch.setattr(onnx_sweep, "CACHE", tmp_path / "cache")
    assert onnx_sweep.main(["--models", "squeezenet1_1", "--exporters", "legacy", "--threads", "1",
                            "--results", str(tmp_path), "--name", "sweep"]) == 0
    (row,) = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert row["result"] == "ok" or row["result"].startswith("refused: "), row
    assert row["input_grad_error"] < 1e-2 and row["layer_grad_error"] < 1e-2, row
    assert row["autograd_error"] < 1e-3, row
    assert "| squeezenet1_1 | legacy |" in (tmp_path / "sweep.md").read_text()


def test_refusals_group_by_construct_not_by_file():
    rows = [onnx_sweep.Row("a", "legacy", "refused: no backward rule for op type 'ReduceL2' (node '/x/ReduceL2', rule set "
                                          "'vanilla'); it lies on the differentiated path /x/ReduceL2 -> /y"),
            onnx_sweep.Row("b", "dynamo", "refused: no backward rule for op type 'ReduceL2' (node 'node_norm_11', rule set "
                                          "'vanilla'); it lies on the differentiated path node_norm_11 -> n3"),
            onnx_sweep.Row("c", "legacy", "refused: export validation failed, nothing was written; camrt/input_grad/vanilla: "
                                          "finite-difference error 0.08 > tolerance 0.02"),
            onnx_sweep.Row("d", "dynamo", "refused: export validation failed, nothing was written; camrt/input_grad/vanilla: "
                                          "finite-difference error 0.3 > tolerance 0.02; camrt/grad/relu_3: finite-difference "
                                          "error 0.1 > tolerance 0.02"),
            onnx_sweep.Row("e", "legacy", "ok")]
    assert onnx_sweep.refusal_groups(rows) == {
        "no backward rule for op type 'ReduceL2' (node '…', rule set '…')": ["a/legacy", "b/dynamo"],
        "camrt's finite-difference self-check refuses the input gradient": ["c/legacy"],
        "camrt's finite-difference self-check refuses the input gradient and the layer gradient": ["d/dynamo"],
    }
