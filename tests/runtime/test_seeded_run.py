"""Seeded runs on small ONNX-source files (`export_onnx(..., seed=True)`, validated by finite
differences fed a random seed): the gradients of L = <seed, score> against closed forms, the
forward pass run once, and the errors of files and seeds that cannot serve."""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract
from camrt.errors import InputError, ModelError
from camrt.seeds import SeedBatch
from tests.helpers import CHANNELS, CLASSES, HEIGHT, WIDTH, TinyModel, numpy_forward, tiny_onnx


def _segmenter(seed: int = 0):
    """image [N, 3, 12, 16] -> Conv(3x3, stride 2) -> Relu (feat) -> Conv(1x1) -> logits [N, 5, 6, 8]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (CHANNELS, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 1.0, (CLASSES, CHANNELS, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["conv"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["feat"], name="relu"),
        helper.make_node("Conv", ["feat", "w2"], ["seg"], name="classifier", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "segmenter", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, HEIGHT, WIDTH])],
        [helper.make_tensor_value_info("seg", TensorProto.FLOAT, ["N", CLASSES, HEIGHT // 2, WIDTH // 2])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), w2[:, :, 0, 0]


def _export(tmp_path, model, name: str) -> str:
    import onnx

    from camrt_exporters.export import export_onnx, write_model

    source = tmp_path / f"{name}.onnx"
    onnx.save(model, source)
    exported, _ = export_onnx(source, layers=["feat"], rules=["vanilla"], seed=True)
    write_model(exported, tmp_path / f"{name}.camrt.onnx")
    return str(tmp_path / f"{name}.camrt.onnx")


@pytest.fixture(scope="module")
def segmenter_file(exporter, tmp_path_factory):
    model, w2 = _segmenter()
    return _export(tmp_path_factory.mktemp("seg"), model, "segmenter"), w2


def test_rank4_score_needs_a_seed(exporter, tmp_path):
    import onnx

    from camrt_exporters.errors import ExportError
    from camrt_exporters.export import export_onnx

    onnx.save(_segmenter()[0], tmp_path / "seg.onnx")
    with pytest.raises(ExportError, match="has rank 4.*--seed"):
        export_onnx(tmp_path / "seg.onnx", layers=["feat"], rules=["vanilla"])


def test_segmentation_seeded_gradient_is_the_closed_form(segmenter_file, rng):
    """d <s, W2 feat> / d feat = sum_c s_c W2[c, k]: the 1x1 classifier transposed."""
    from camrt.execution.session import ExplainSession
    from camrt.seeds.segmentation import segmentation_seed

    path, w2 = segmenter_file
    session = ExplainSession(path)
    x = rng.standard_normal((3, 3, HEIGHT, WIDTH)).astype(np.float32)
    fetch = [contract.gradient_output("feat")]
    plan = session.seeded_plan(fetch)
    runs = []
    original = plan.forward_session.run
    plan.forward_session.run = lambda *a, **k: (runs.append(1), original(*a, **k))[1]
    made = {}

    def make_seed(outputs):
        made["seed"] = segmentation_seed(outputs[contract.LOGITS_OUTPUT], 2)
        return made["seed"]

    got = session.run_seeded(x, make_seed, fetch)[fetch[0]]
    assert len(runs) == 1
    expected = np.einsum("bchw,ck->bkhw", made["seed"].values.astype(np.float64), w2.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_target_path_of_a_rank4_score_sums_the_class_channel(segmenter_file, rng):
    """Without a seed the file explains the class channel summed over the image (top-1 on those sums)."""
    from camrt.execution.session import ExplainSession

    path, w2 = segmenter_file
    x = rng.standard_normal((2, 3, HEIGHT, WIDTH)).astype(np.float32)
    got = ExplainSession(path).run(x, [-1, 3], [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT,
                                                contract.gradient_output("feat")])
    totals = got[contract.LOGITS_OUTPUT].sum(axis=(2, 3))
    assert got[contract.TARGET_INDEX_OUTPUT].tolist() == [int(totals[0].argmax()), 3]
    for b, t in enumerate(got[contract.TARGET_INDEX_OUTPUT]):
        expected = np.broadcast_to(w2[t][:, None, None], got[contract.gradient_output("feat")].shape[1:])
        np.testing.assert_allclose(got[contract.gradient_output("feat")][b], expected, rtol=1e-5)


def test_classifier_seeded_rows_several_per_image(exporter, tmp_path, rng):
    """Any seed of a [B, classes] classifier: d <s, logits> / d feat = (s @ W2) / (h w) at every
    position; two seed rows of image 1 and one of image 0, one forward pass."""
    from camrt.execution.session import ExplainSession

    plain, (w1, b1, w2, b2) = tiny_onnx()
    path = _export(tmp_path, plain, "tiny")
    x = rng.standard_normal((2, 3, HEIGHT, WIDTH)).astype(np.float32)
    seeds = SeedBatch(rng.standard_normal((3, CLASSES)).astype(np.float32), np.array([1, 0, 1]))
    fetch = [contract.activation_output("feat"), contract.gradient_output("feat")]
    got = ExplainSession(path).run_seeded(x, lambda outputs: seeds, fetch)
    feat = numpy_forward(TinyModel(path, w1, b1, w2, b2, None), x)["feat"]
    np.testing.assert_allclose(got[fetch[0]], feat[seeds.samples], rtol=1e-5, atol=1e-6)
    area = feat.shape[2] * feat.shape[3]
    expected = np.broadcast_to((seeds.values.astype(np.float64) @ w2)[:, :, None, None] / area, got[fetch[1]].shape)
    np.testing.assert_allclose(got[fetch[1]], expected, rtol=1e-5, atol=1e-7)


def test_files_and_seeds_that_cannot_serve(tiny, segmenter_file, rng):
    from camrt.execution.session import ExplainSession

    x = rng.standard_normal((2, 3, HEIGHT, WIDTH)).astype(np.float32)
    grad = [contract.gradient_output("feat")]
    with pytest.raises(ModelError, match="no seed entry.*--seed"):
        ExplainSession(tiny.path).run_seeded(x, lambda outputs: None, grad)
    session = ExplainSession(segmenter_file[0])
    with pytest.raises(InputError, match=r"seed row\(s\) \[1\] are all zeros"):
        session.run_seeded(x, lambda out: np.concatenate([np.ones_like(out[contract.LOGITS_OUTPUT][:1]),
                                                          np.zeros_like(out[contract.LOGITS_OUTPUT][:1])]), grad)
    with pytest.raises(InputError, match="seed rows have shape"):
        session.run_seeded(x, lambda out: np.ones((2, CLASSES)), grad)
    with pytest.raises(InputError, match="nothing to differentiate"):
        session.run_seeded(x, lambda out: np.ones_like(out[contract.LOGITS_OUTPUT]), [contract.activation_output("feat")])
    with pytest.raises(InputError, match="follow `camrt/target`"):
        session.run_seeded(x, lambda out: np.ones_like(out[contract.LOGITS_OUTPUT]), [contract.TARGET_INDEX_OUTPUT])


@pytest.mark.usefixtures("exporters_plugin")
def test_export_cli_seed_flag(exporter, tmp_path, rng):
    """`camrt export --seed` writes the seed entry; the seeded gradient is the closed form."""
    import onnx
    from click.testing import CliRunner

    from camrt.cli import build_cli
    from camrt.execution.session import ExplainSession

    model, w2 = _segmenter()
    onnx.save(model, tmp_path / "seg.onnx")
    result = CliRunner().invoke(build_cli(), ["export", str(tmp_path / "seg.onnx"), "--seed", "--layer", "feat",
                                              "--rules", "vanilla", "-o", str(tmp_path / "seg.camrt.onnx")])
    assert result.exit_code == 0, result.output
    session = ExplainSession(tmp_path / "seg.camrt.onnx")
    assert session.info.seed == {"tensor": contract.SEED_TENSOR, "shape": ["batch", CLASSES, HEIGHT // 2, WIDTH // 2]}
    x = rng.standard_normal((1, 3, HEIGHT, WIDTH)).astype(np.float32)
    seed = rng.standard_normal((1, CLASSES, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    grad = session.run_seeded(x, lambda outputs: seed, [contract.gradient_output("feat")])
    np.testing.assert_allclose(grad[contract.gradient_output("feat")], np.einsum("bchw,ck->bkhw", seed, w2),
                               rtol=1e-5, atol=1e-6)
