"""Channels-last (NHWC) image inputs end to end, and the layout of the layers camrt explains.

Oracles: (1) the same onnx.helper network with an NCHW input and with an NHWC input behind a
Transpose must give every registered method the same maps; (2) TensorFlow's GradientTape
gradients of small random-weight Keras models converted by tf2onnx (tests/fixtures/keras, made
by tests/fixtures/make_keras_fixtures.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from camrt import contract
from camrt.cli import build_cli
from camrt.errors import ContractError
from camrt.execution.session import ExplainSession
from camrt.explainer import Explainer
from camrt.modelfile.metadata import parse_contract
from camrt.modelfile.token_layout import infer_layer_layouts
from camrt.plugins.registry import build_method_registry
from camrt_exporters.errors import ExportError
from camrt_exporters.export import export_onnx, write_model
from camrt_exporters.validate import run_contract
from tests.helpers import random_image, write_image

from .tiny_models import conv_relu_maxpool_gap_gemm_softmax

KERAS = Path(__file__).parent.parent / "fixtures" / "keras"
KERAS_MODELS = ("rgb32", "gray28", "mobile24x48", "flatten16")


def export_checked(path: Path, **options) -> onnx.ModelProto:
    """export_onnx's model, its finite-difference self-check passed (the oracles here are the NCHW
    twin and TensorFlow)."""
    model, _ = export_onnx(path, **options)
    return model


def channels_last(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (NCHW input 'image') taking [B, H, W, C] instead: a Transpose to NCHW first."""
    nhwc = onnx.ModelProto()
    nhwc.CopyFrom(model)
    graph = nhwc.graph
    for node in graph.node:
        node.input[:] = ["image_nchw" if name == "image" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Transpose", ["image"], ["image_nchw"], name="to_nchw",
                                          perm=list(contract.NHWC_TO_NCHW)))
    dims = graph.input[0].type.tensor_type.shape.dim
    batch, channels, height, width = (d.dim_param or d.dim_value for d in dims)
    graph.input[0].CopyFrom(helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, height, width, channels]))
    return nhwc


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(NCHW file, NHWC file) of one network, with every rule set and FullGrad's terms."""
    folder = tmp_path_factory.mktemp("twins")
    nchw = conv_relu_maxpool_gap_gemm_softmax(batch="b")
    paths = []
    for name, model in (("nchw", nchw), ("nhwc", channels_last(nchw))):
        onnx.save(model, folder / f"{name}.onnx")
        exported = export_checked(folder / f"{name}.onnx", layers=["pool", "relu"],
                                             rules=["vanilla", "guided", "deconvnet"], fullgrad=True)
        write_model(exported, folder / f"{name}.camrt.onnx")
        paths.append(folder / f"{name}.camrt.onnx")
    return paths


def test_nhwc_input_is_detected_and_recorded(twins):
    nchw, nhwc = (parse_contract({p.key: p.value for p in onnx.load(path).metadata_props}) for path in twins)
    assert (nchw.preprocessing.layout, nhwc.preprocessing.layout) == ("nchw", "nhwc")
    assert (nhwc.preprocessing.height, nhwc.preprocessing.width) == (16, 16)
    assert nhwc.cam_layers == nchw.cam_layers == ["pool"]


CNN_METHODS = [cls.name for cls in build_method_registry() if not cls.requires.uses_attention and cls.target_kinds is None]


@pytest.mark.parametrize("method", CNN_METHODS)
def test_every_method_gives_the_same_maps_on_the_nhwc_file(twins, method):
    x = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)
    maps = [np.stack([e.heatmap for e in Explainer(path, method=method, device="cpu").explain(x, targets=[0, 1, 2, 3])])
            for path in twins]
    assert np.ptp(maps[0], axis=(1, 2)).max() > 0  # constant maps would make the comparison vacuous
    np.testing.assert_allclose(maps[1], maps[0], rtol=0, atol=1e-5)


def test_heatmaps_made_in_the_session_are_the_same_on_the_nhwc_file(twins):
    x = np.random.default_rng(7).standard_normal((3, 3, 16, 16)).astype(np.float32)
    maps = [np.stack([e.heatmap for e in Explainer(path, device="cpu", device_postprocess=True).explain(x, [0, 1, 2])])
            for path in twins]
    assert np.ptp(maps[0], axis=(1, 2)).max() > 0  # (a class whose Grad-CAM is all negative gives zeros)
    np.testing.assert_allclose(maps[1], maps[0], rtol=0, atol=1e-5)


def test_nhwc_input_gradients_come_back_nchw(twins):
    x = np.random.default_rng(4).standard_normal((3, 3, 16, 16)).astype(np.float32)
    fetch = [contract.input_gradient_output(rule) for rule in ("vanilla", "guided", "deconvnet")]
    on_nchw, on_nhwc = (ExplainSession(path, device="cpu").run(x, [0, 2, -1], fetch) for path in twins)
    for name in fetch:
        assert on_nhwc[name].shape == x.shape
        np.testing.assert_allclose(on_nhwc[name], on_nchw[name], rtol=0, atol=1e-6 * np.abs(on_nchw[name]).max())


def _head_through_nhwc(reduce_axes: list[int]) -> onnx.ModelProto:
    """Conv -> Relu -> Transpose to NHWC -> Relu -> ReduceMean over H, W -> Gemm, as tf2onnx writes a
    Keras head it could not keep in NCHW."""
    nchw = conv_relu_maxpool_gap_gemm_softmax(batch="b")
    graph = nchw.graph
    keep = [n for n in graph.node if n.op_type == "Constant" or n.name in ("conv", "relu")]
    fc = next(n for n in graph.node if n.name == "fc")
    fc.input[0] = "pooled"
    tail = [
        helper.make_node("Transpose", ["relu"], ["relu_nhwc"], name="to_nhwc", perm=list(contract.NCHW_TO_NHWC)),
        helper.make_node("Relu", ["relu_nhwc"], ["relu_nhwc_2"], name="relu_nhwc"),
        helper.make_node("ReduceMean", ["relu_nhwc_2"], ["pooled"], name="gap", axes=reduce_axes, keepdims=0),
        fc,
    ]
    del graph.node[:]
    graph.node.extend([*keep, *tail])
    graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5]))
    return nchw


def test_default_layer_may_be_channels_last_and_is_recorded_so(tmp_path):
    """The last candidate is the NHWC relu_nhwc_2 [B, 16, 16, 8] (which, read as NCHW, would be
    H=16, W=8 of stripes); it is the default, recorded as nhwc, and CAM finds its head (ReduceMean
    over axes 1, 2 -> Gemm). The maps of channels-last layers: tests/exporters/test_layer_layouts.py."""
    model = _head_through_nhwc([1, 2])
    onnx.save(model, tmp_path / "m.onnx")
    exported = export_checked(tmp_path / "m.onnx", rules=["vanilla"])
    info = parse_contract({p.key: p.value for p in exported.metadata_props})
    assert info.default_layer == "relu_nhwc_2"
    assert info.layer_layout("relu_nhwc_2").layout == contract.LAYOUT_NHWC
    assert info.cam_layers == ["relu_nhwc_2"]


def test_layouts_propagate_through_a_convnext_style_channels_last_block():
    """Conv -> to NHWC -> LayerNormalization -> MatMul by weights -> to NCHW -> Add to the Conv
    output; a MatMul over the width and other permutations establish nothing."""
    node = helper.make_node
    nodes = [
        node("Conv", ["image", "w"], ["conv"]),
        node("Transpose", ["conv"], ["nhwc"], perm=list(contract.NCHW_TO_NHWC)),
        node("LayerNormalization", ["nhwc", "gamma"], ["norm"], axis=-1),
        node("MatMul", ["norm", "fc"], ["linear"]),
        node("Transpose", ["linear"], ["nchw"], perm=list(contract.NHWC_TO_NCHW)),
        node("Add", ["conv", "nchw"], ["residual"]),
        node("MatMul", ["residual", "fc_width"], ["mixes_width"]),
        node("Transpose", ["residual"], ["swapped"], perm=[0, 1, 3, 2]),
    ]
    nchw, nhwc = ("batch", 16, 8, 6), ("batch", 8, 6, 16)
    shapes = {"image": ("batch", 3, 8, 6), "conv": nchw, "nhwc": nhwc, "norm": nhwc, "fc": (16, 16), "linear": nhwc,
              "nchw": nchw, "residual": nchw, "fc_width": (6, 6), "mixes_width": nchw, "swapped": ("batch", 16, 6, 8)}
    layouts = infer_layer_layouts(nodes, shapes.get, "image", contract.LAYOUT_NCHW)
    assert {name: layout.layout for name, layout in layouts.items()} == {
        "image": "nchw", "conv": "nchw", "nhwc": "nhwc", "norm": "nhwc", "linear": "nhwc", "nchw": "nchw",
        "residual": "nchw"}


def test_named_layer_behind_a_reshape_is_refused_as_unestablished(tmp_path):
    model = conv_relu_maxpool_gap_gemm_softmax(batch=1)
    shape = helper.make_node("Constant", [], ["shape"], name="shape",
                             value=numpy_helper.from_array(np.array([0, 8, 8, 16], np.int64)))
    reshape = helper.make_node("Reshape", ["pool", "shape"], ["reshaped"], name="reshape")
    gap = next(n for n in model.graph.node if n.name == "gap")
    gap.input[0] = "reshaped"
    position = list(model.graph.node).index(gap)
    model.graph.node.insert(position, reshape)
    model.graph.node.insert(position, shape)
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"layer 'reshaped' .*cannot establish how it maps onto the image.*--layout reshaped=.*such as 'pool'"):
        export_onnx(tmp_path / "m.onnx", layers=["reshaped"], rules=["vanilla"])


@pytest.mark.parametrize("dims, given, expected", [
    (["b", 3, 16, 3], None, "cannot tell NCHW from NHWC"),
    (["b", 16, 16, 16], None, "cannot tell NCHW from NHWC"),
    (["b", 3, 16, 3], "nhwc", None),
])
def test_ambiguous_input_layout_needs_the_flag(tmp_path, dims, given, expected):
    nchw = conv_relu_maxpool_gap_gemm_softmax(batch="b")
    model = channels_last(nchw)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("image", TensorProto.FLOAT, dims))
    onnx.save(model, tmp_path / "m.onnx")
    if expected is None:
        exported = export_checked(tmp_path / "m.onnx", rules=["vanilla"], input_layout=given, layers=["relu"])
        pre = parse_contract({p.key: p.value for p in exported.metadata_props}).preprocessing
        assert (pre.layout, pre.height, pre.width) == ("nhwc", 3, 16)
    else:
        with pytest.raises(ExportError, match=f"image input 'image' .*{expected}.*--input-layout nchw or nhwc"):
            export_onnx(tmp_path / "m.onnx", rules=["vanilla"], input_layout=given)


def _metadata(preprocessing: str) -> dict[str, str]:
    return {contract.META_CONTRACT_VERSION: "1", contract.META_INPUT: "image",
            contract.META_PREPROCESSING: preprocessing}


def test_layout_in_the_contract_is_optional_and_checked():
    old = json.dumps({"height": 8, "width": 8, "mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1.0,
                      "channel_order": "rgb"})
    assert parse_contract(_metadata(old)).preprocessing.layout == "nchw"  # files from before the field
    nchw = contract.Preprocessing(8, 8)
    assert "layout" not in json.loads(nchw.to_json())  # NCHW files stay readable by older runtimes
    nhwc = contract.Preprocessing(8, 8, layout="nhwc")
    assert parse_contract(_metadata(nhwc.to_json())).preprocessing == nhwc
    with pytest.raises(ContractError, match="layout 'nwhc' is not nchw or nhwc"):
        parse_contract(_metadata(contract.Preprocessing(8, 8, layout="nwhc").to_json()))


# --- Keras models converted by tf2onnx, against TensorFlow's gradients -------------------------


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", KERAS_MODELS)
def test_keras_gradients_equal_tensorflow(name, opset):
    oracle = np.load(KERAS / f"{name}.npz")
    model = export_checked(KERAS / f"{name}_opset{opset}.onnx", rules=["vanilla", "guided"])
    info = parse_contract({p.key: p.value for p in model.metadata_props})
    assert info.preprocessing.layout == "nhwc"
    assert (info.preprocessing.height, info.preprocessing.width) == oracle["x"].shape[1:3]
    got = run_contract(model, "image", oracle["x"], oracle["target"])
    # the default layer is the Keras block's output: NCHW where tf2onnx kept the block in NCHW, else NHWC
    act, grad = (got[prefix + info.default_layer] for prefix in (contract.ACTIVATION_PREFIX, contract.GRADIENT_PREFIX))
    if info.layer_layout(info.default_layer).layout == contract.LAYOUT_NCHW:
        act, grad = act.transpose(contract.NCHW_TO_NHWC), grad.transpose(contract.NCHW_TO_NHWC)
    for value, reference in [(got[contract.LOGITS_OUTPUT], oracle["logits"]),
                             (got[contract.input_gradient_output("vanilla")], oracle["input_grad"]),
                             (act, oracle["layer_act"]), (grad, oracle["layer_grad"])]:
        # float32 against float32 through a handful of layers: 1e-5 of the largest magnitude
        np.testing.assert_allclose(value, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("name", KERAS_MODELS)
def test_keras_file_explains_through_the_runtime(name, tmp_path):
    oracle = np.load(KERAS / f"{name}.npz")
    write_model(export_checked(KERAS / f"{name}_opset17.onnx", rules=["vanilla", "guided"]),
                tmp_path / "k.camrt.onnx")
    x = np.ascontiguousarray(oracle["x"].transpose(contract.NHWC_TO_NCHW))
    explainer = Explainer(tmp_path / "k.camrt.onnx", method="saliency", device="cpu")
    saliency = [e.heatmap for e in explainer.explain(x, targets=oracle["target"])]
    gradient = explainer.session.run(x, oracle["target"], [contract.input_gradient_output("vanilla")])
    reference = oracle["input_grad"].transpose(contract.NHWC_TO_NCHW)
    np.testing.assert_allclose(gradient[contract.input_gradient_output("vanilla")], reference, rtol=0,
                               atol=1e-5 * np.abs(reference).max())
    # saliency is max |gradient| over channels, min-max normalised
    expected = np.abs(reference).max(axis=1)
    expected = (expected - expected.min(axis=(1, 2), keepdims=True)) / np.ptp(expected, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.stack(saliency), expected, rtol=0, atol=1e-4)
    images = [np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8)]
    (result,) = Explainer(tmp_path / "k.camrt.onnx", method="gradcam", device="cpu").explain(images)
    assert result.heatmap.shape == (40, 30) and np.ptp(result.heatmap) > 0


@pytest.mark.parametrize("name", KERAS_MODELS)
def test_keras_export_passes_the_self_check(name):
    """The finite-difference self-check (issue 13 item 1) accepts these correct gradients (the old
    check refused rgb32, mobile24x48 and gray28 with errors 0.03-0.06 > 0.02)."""
    checks = export_onnx(KERAS / f"{name}_opset17.onnx", rules=["vanilla"])[1]
    assert checks and all(check.ok for check in checks)


def test_cli_explains_a_keras_file(exporters_plugin, tmp_path):
    write_model(export_checked(KERAS / "mobile24x48_opset13.onnx", rules=["vanilla"]),
                tmp_path / "k.camrt.onnx")
    write_image(str(tmp_path / "photo.png"), random_image(np.random.default_rng(6), 60, 90))
    for method in ("gradcam", "saliency"):
        result = CliRunner().invoke(build_cli(), ["explain", str(tmp_path / "k.camrt.onnx"), str(tmp_path / "photo.png"),
                                                  "-m", method, "-o", str(tmp_path / method), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        heatmap = np.load(tmp_path / method / "photo.heatmap.npy")
        assert heatmap.shape == (60, 90) and np.ptp(heatmap) > 0


def test_cli_input_layout_flag(exporters_plugin, tmp_path):
    model = channels_last(conv_relu_maxpool_gap_gemm_softmax(batch="b"))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, 16, 3]))
    onnx.save(model, tmp_path / "m.onnx")
    cli = build_cli()
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code != 0 and "give --input-layout nchw or nhwc" in result.output
    result = CliRunner().invoke(cli, ["export", "torchvision.models:resnet18", "--input-layout", "nhwc",
                                      "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code != 0 and "--input-layout applies to ONNX sources" in result.output
