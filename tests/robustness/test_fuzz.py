"""Property tests (hypothesis) over hostile bytes and mutated ONNX graphs: the image loader, the
contract reader and session, and the exporter's ONNX front end either work (and the result is
checked) or raise camrt's own error types; nothing else escapes.

CI runs a short fuzz (about 20 s on a 2-core machine). A longer run, e.g. 50x the examples:

    CAMRT_FUZZ_SCALE=50 python -m pytest tests/robustness/test_fuzz.py -q

With CAMRT_FUZZ_SCALE set, hypothesis draws fresh random examples each run (CI is derandomized).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camrt import contract
from camrt.errors import CamrtError
from camrt.imaging.decode import decode_image
from camrt.imaging.headers import image_header

from .tally import fuzzed

SCALE = int(os.environ.get("CAMRT_FUZZ_SCALE", "0") or 0)


def fuzz_settings(examples: int):
    """`examples` in CI (derandomized); `examples * CAMRT_FUZZ_SCALE` random ones when it is set."""
    return settings(max_examples=examples * max(SCALE, 1), deadline=None, derandomize=not SCALE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large], database=None)


# --- image bytes ----------------------------------------------------------------------------------

FUZZ_PIXEL_LIMIT = 1 << 16  # mutated headers may claim any size: keep what a decoder may allocate small


def _seeds() -> list[bytes]:
    base = cv2.resize(np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8), (40, 24))
    seeds = []
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm", ".pam", ".sr", ".gif", ".jp2", ".avif"):
        try:
            ok, data = cv2.imencode(ext, base)
        except cv2.error:
            continue
        if ok:
            seeds.append(data.tobytes())
    return seeds


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "header"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "header" and len(data) > 32:  # the bytes where sizes live
            data[draw(st.integers(0, 31))] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
    return bytes(data)


def _decode_checked(data: bytes) -> None:
    try:
        image = decode_image(data, "fuzz", max_pixels=FUZZ_PIXEL_LIMIT)
    except CamrtError:
        fuzzed(True)
        return
    fuzzed(False)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.flags.c_contiguous
    _, width, height = image_header(data)
    assert image.shape[0] * image.shape[1] <= FUZZ_PIXEL_LIMIT
    assert sorted(image.shape[:2]) == sorted((height, width)) or image.shape[:2] == (height, width)


@fuzz_settings(300)
@given(mutated_images())
def test_mutated_image_files(data):
    _decode_checked(data)


@fuzz_settings(150)
@given(st.one_of(st.binary(max_size=512), st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF89a",
                                                           b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00", b"P6\n",
                                                           b"\x00\x00\x00\x0cjP  \r\n\x87\n"]).flatmap(
    lambda magic: st.binary(max_size=256).map(lambda tail: magic + tail))))
def test_random_bytes_and_bare_signatures(data):
    _decode_checked(data)


# --- ONNX graphs ------------------------------------------------------------------------------------


@st.composite
def graph_mutations(draw, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with 1-3 of: wrong dims, a dangling input, a cycle, a node removed, an
    op type swapped, an initializer removed, an output renamed."""
    mutated = onnx.ModelProto()
    mutated.CopyFrom(model)
    graph = mutated.graph
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["dims", "dangling", "cycle", "drop_node", "op_type", "drop_initializer",
                                     "rename_output"]))
        nodes = list(graph.node)
        if kind == "dims":
            values = [*graph.input, *graph.output, *graph.value_info]
            if values:
                value = values[draw(st.integers(0, len(values) - 1))]
                dims = value.type.tensor_type.shape.dim
                if len(dims):
                    dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.sampled_from([0, 1, 2, 7, 1000]))
        elif kind in ("dangling", "cycle") and nodes:
            at = draw(st.integers(0, len(nodes) - 1))
            node = graph.node[at]
            if node.input:
                later = [o for n in nodes[at:] for o in n.output]
                slot = draw(st.integers(0, len(node.input) - 1))
                node.input[slot] = draw(st.sampled_from(later)) if kind == "cycle" else "camrt_fuzz/nowhere"
        elif kind == "drop_node" and nodes:
            del graph.node[draw(st.integers(0, len(nodes) - 1))]
        elif kind == "op_type" and nodes:
            graph.node[draw(st.integers(0, len(nodes) - 1))].op_type = draw(
                st.sampled_from(["Relu", "Sigmoid", "Identity", "Softmax", "Flatten", "Celu", "NoSuchOp"]))
        elif kind == "drop_initializer" and len(graph.initializer):
            del graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        elif kind == "rename_output" and len(graph.output):
            graph.output[draw(st.integers(0, len(graph.output) - 1))].name = "camrt_fuzz/renamed"
    return mutated


@pytest.fixture(scope="module")
def camrt_model(tiny):
    return onnx.load(tiny.path)


@fuzz_settings(60)
@given(data=st.data())
def test_mutated_camrt_files_in_the_session_and_explainer(camrt_model, tmp_path_factory, data):
    """Mutated contract files: opened, explained for two images; either heatmaps in [0, 1] of
    the images' size, or a camrt error."""
    from camrt.explainer import Explainer

    mutated = data.draw(graph_mutations(camrt_model))
    path = str(tmp_path_factory.mktemp("fuzz") / "mutated.onnx")
    onnx.save(mutated, path)
    images = [np.full((12, 16, 3), 90, np.uint8), np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)]
    try:
        results = Explainer(path, device="cpu").explain(images)
    except CamrtError:
        fuzzed(True)
        return
    fuzzed(False)
    for image, result in zip(images, results):
        assert result.heatmap.shape == image.shape[:2]
        assert np.isfinite(result.heatmap).all() and result.heatmap.min() >= 0 and result.heatmap.max() <= 1


@fuzz_settings(60)
@given(data=st.data())
def test_mutated_bytes_of_camrt_files_in_the_contract_reader(tiny, tmp_path_factory, data):
    from camrt.execution.session import ExplainSession
    from camrt.modelfile.metadata import read_contract

    raw = bytearray(open(tiny.path, "rb").read())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            del raw[at:]
            if not raw:
                break
    path = str(tmp_path_factory.mktemp("fuzzbytes") / "mutated.onnx")
    with open(path, "wb") as handle:
        handle.write(bytes(raw))
    try:
        info = read_contract(path)
        session = ExplainSession(path, device="cpu")
        session.run(np.zeros((1, 3, 12, 16), np.float32), [-1], [contract.LOGITS_OUTPUT])
    except CamrtError:
        fuzzed(True)
        return
    fuzzed(False)
    assert info.input_name and session.num_classes >= 1


@fuzz_settings(25)
@given(data=st.data())
def test_mutated_graphs_in_the_exporter(tmp_path_factory, exporter, data):
    """The ONNX front end on mutated classifiers: a validated camrt file or a camrt error."""
    from camrt_exporters.export import export_onnx
    from tests.exporters.tiny_models import conv_relu_maxpool_gap_gemm_softmax

    mutated = data.draw(graph_mutations(conv_relu_maxpool_gap_gemm_softmax()))
    path = str(tmp_path_factory.mktemp("fuzzexport") / "mutated.onnx")
    onnx.save(mutated, path)
    try:
        model, checks = export_onnx(path, rules=["vanilla"])
    except CamrtError:
        fuzzed(True)
        return
    fuzzed(False)
    assert checks and all(check.ok for check in checks)
    assert {p.key: p.value for p in model.metadata_props}[contract.META_CONTRACT_VERSION] == str(contract.CONTRACT_VERSION)
