"""ExplainSession and the contract reader: file checks, metadata, versions, targets, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from camrt import contract
from camrt.errors import ContractError, InputError, ModelError, UsageError
from camrt.execution.session import GRAPH_OPTIMIZATIONS, ExplainSession
from camrt.imaging.preprocess import preprocess
from camrt.modelfile.metadata import read_contract, read_metadata
from tests.helpers import CLASSES, HEIGHT, LABELS, WIDTH, numpy_forward


def _batch(model, rng, n):
    images = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(n)]
    return preprocess(images, model.preprocessing)


def test_metadata_reader_matches_onnx(tiny):
    import onnx

    expected = {p.key: p.value for p in onnx.load(tiny.path).metadata_props}
    assert read_metadata(tiny.path) == expected


def test_contract_round_trip(tiny):
    info = read_contract(tiny.path)
    assert info.version == contract.CONTRACT_VERSION
    assert info.input_name == "image"
    assert info.layers == ["feat", "conv"] and info.default_layer == "feat"
    assert info.rule_sets == ["vanilla", "guided"]
    assert info.preprocessing == tiny.preprocessing
    assert info.labels == LABELS
    assert info.score == {"tensor": "logits", "output": "probs", "softmax": True, "activation": "Softmax"}


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"hello, this is text and not a model\n", "not an ONNX file"),
    (bytes(range(256)) * 4, "not an ONNX file"),
])
def test_not_onnx(tmp_path, content, reason):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not an ONNX file") as info:
        ExplainSession(str(path))
    assert str(path) in str(info.value) and reason in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        read_contract(tmp_path / "absent.onnx")
    with pytest.raises(ModelError, match="not a file"):
        read_contract(tmp_path)


def test_plain_onnx_is_not_a_camrt_file(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ModelError, match=r"valid ONNX but not a camrt file.*camrt export") as info:
        read_contract(path)
    assert not isinstance(info.value, ContractError)


@pytest.mark.parametrize("version", ["99", "0", "one"])
def test_unknown_contract_version(make_model, version):
    model = make_model(metadata_overrides={contract.META_CONTRACT_VERSION: version})
    with pytest.raises(ContractError, match=r"re-export the model with this camrt version's `camrt export`") as info:
        ExplainSession(model.path)
    assert repr(version) in str(info.value)


def test_malformed_metadata(make_model):
    model = make_model(metadata_overrides={contract.META_LAYERS: "[not json"})
    with pytest.raises(ContractError, match=contract.META_LAYERS):
        read_contract(model.path)
    model = make_model(metadata_overrides={contract.META_PREPROCESSING: None})
    with pytest.raises(ContractError, match=contract.META_PREPROCESSING):
        read_contract(model.path)


def test_run_fetches_only_what_is_asked(tiny, rng):
    session = ExplainSession(tiny.path, device="cpu", threads=1)
    assert session.num_classes == CLASSES
    x = _batch(tiny, rng, 3)
    out = session.run(x, np.array([-1, 2, 0]), [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT])
    assert set(out) == {contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT}
    logits = numpy_forward(tiny, x)["logits"]
    np.testing.assert_allclose(out[contract.LOGITS_OUTPUT], logits, rtol=1e-4, atol=1e-5)
    # -1 resolves to the argmax of the logits; explicit targets pass through.
    assert out[contract.TARGET_INDEX_OUTPUT].tolist() == [int(logits[0].argmax()), 2, 0]


@pytest.mark.parametrize("targets, match", [
    ([0, 1], "2 target"),
    ([CLASSES, 0, 0], r"out of range.*0\.\.4"),
    ([-2, 0, 0], "out of range"),
    ([0.5, 0, 0], "integers"),
])
def test_bad_targets(tiny, rng, targets, match):
    session = ExplainSession(tiny.path, device="cpu")
    with pytest.raises(InputError, match=match):
        session.run(_batch(tiny, rng, 3), targets, [contract.LOGITS_OUTPUT])


def test_bad_inputs_and_options(tiny, rng):
    with pytest.raises(UsageError, match="unknown device"):
        ExplainSession(tiny.path, device="tpu")
    with pytest.raises(UsageError, match="threads"):
        ExplainSession(tiny.path, threads=0)
    session = ExplainSession(tiny.path, device="cpu")
    with pytest.raises(InputError, match="expects"):
        session.run(np.zeros((1, 3, HEIGHT + 1, WIDTH), np.float32), [-1], [contract.LOGITS_OUTPUT])
    with pytest.raises(ModelError, match="no output"):
        session.run(_batch(tiny, rng, 1), [-1], ["camrt/act/absent"])


@pytest.mark.parametrize("level", GRAPH_OPTIMIZATIONS)
def test_graph_optimization_levels_compute_the_model(tiny, rng, level):
    """Every onnxruntime optimisation level computes the model (float64 numpy forward) and its
    gradient (closed form for the tiny model: d logit_c / d feat = w2[c] / (h w)); an unknown level
    is refused with the valid ones."""
    session = ExplainSession(tiny.path, device="cpu", graph_optimization=level)
    x = _batch(tiny, rng, 2)
    feat = contract.activation_output("feat")
    out = session.run(x, np.array([1, 3]), [contract.LOGITS_OUTPUT, feat, contract.gradient_output("feat")])
    expected = numpy_forward(tiny, x)
    np.testing.assert_allclose(out[contract.LOGITS_OUTPUT], expected["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[feat], expected["feat"], rtol=1e-4, atol=1e-5)
    area = expected["feat"].shape[2] * expected["feat"].shape[3]
    grad = np.broadcast_to(tiny.w2[[1, 3], :, None, None] / area, expected["feat"].shape)
    np.testing.assert_allclose(out[contract.gradient_output("feat")], grad, rtol=1e-5, atol=1e-7)


def test_unknown_graph_optimization(tiny):
    with pytest.raises(UsageError, match="unknown graph_optimization 'fast'; choose one of all, extended, basic, none"):
        ExplainSession(tiny.path, graph_optimization="fast")


def test_cuda_without_gpu_provider(tiny, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # as the PyPI wheel has
    with pytest.raises(UsageError, match="no GPU provider"):
        ExplainSession(tiny.path, device="cuda")


def test_provider_hook_is_used(tiny, plugin):
    from camrt.hookspecs import hookimpl

    calls = []

    class Providers:
        @hookimpl
        def choose_execution_providers(self, device, available):
            calls.append((device, tuple(available)))
            return ["CPUExecutionProvider"]

    plugin(Providers(), "test-providers")
    session = ExplainSession(tiny.path, device="auto")
    assert calls and calls[0][0] == "auto"
    assert session.providers == ["CPUExecutionProvider"]


def test_static_batch_runs_in_chunks(make_model, rng):
    """A graph with a fixed batch of 2 still explains 3 images (padded chunk), same numbers."""
    model = make_model(batch=2)
    session = ExplainSession(model.path, device="cpu")
    assert session.static_batch == 2
    x = _batch(model, rng, 3)
    out = session.run(x, [-1, 1, -1], [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT])
    logits = numpy_forward(model, x)["logits"]
    np.testing.assert_allclose(out[contract.LOGITS_OUTPUT], logits, rtol=1e-4, atol=1e-5)
    assert out[contract.TARGET_INDEX_OUTPUT].tolist() == [int(logits[0].argmax()), 1, int(logits[2].argmax())]


def test_contract_summary_json(tiny):
    from camrt.cli.inspect import contract_summary

    summary = contract_summary(tiny.path)
    json.dumps(summary)
    assert summary["layers"] == ["feat", "conv"] and summary["labels"] == CLASSES
    assert summary["preprocessing"]["height"] == HEIGHT and "gradcam" in summary["methods"]


def test_each_fetch_set_runs_only_its_subgraph(tiny, rng):
    """Oracle: one onnxruntime session over the whole file. The pruned session for Grad-CAM's outputs
    gives the same numbers without the input-gradient subgraphs (onnxruntime would run them all)."""
    import onnx
    import onnxruntime as ort

    from camrt.execution.subgraphs import subgraph

    session = ExplainSession(tiny.path, device="cpu")
    x = _batch(tiny, rng, 3)
    targets = np.array([-1, 1, 0])
    layer = session.info.default_layer
    fetch = [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT, contract.activation_output(layer),
             contract.gradient_output(layer)]
    ours = session.run(x, targets, fetch)
    whole = ort.InferenceSession(tiny.path, providers=["CPUExecutionProvider"])
    reference = dict(zip(fetch, whole.run(fetch, {session.info.input_name: x, contract.TARGET_INPUT: targets})))
    for name in fetch:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)

    model = onnx.load(tiny.path)
    kept = {n.name for n in subgraph(model, fetch).graph.node}
    # the input gradients' nodes are in the file but not in the Grad-CAM session's graph
    assert any(n.name.startswith("camrt_bwd/guided") for n in model.graph.node)
    assert not any(name.startswith("camrt_bwd/guided") for name in kept)
    assert {o.name for o in session.prepare(fetch).get_outputs()} == set(fetch)
    only_logits = session.prepare([contract.LOGITS_OUTPUT])
    assert {i.name for i in only_logits.get_inputs()} == {session.info.input_name}
