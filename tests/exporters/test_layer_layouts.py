"""Layer layouts (nchw, nhwc, tokens): stripes are impossible.

The issue this answers: a token tensor [B, T, C] or a channels-last tensor [B, h, w, C] read as
[B, C, H, W] gives a map of stripes with status ok. Oracle: twins. Each network below exposes one
map twice, as an NCHW tensor and as the same values rearranged (a Transpose to channels-last; a
flatten to tokens with a class token put in front), with nothing but that rearrangement between
them, so every layer method must give the same maps at both layers: reading the rearranged tensor
as NCHW would not. A layer whose layout cannot be established is refused at export, naming
`--layout`; with `--layout` it is recorded as given.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from camrt import contract
from camrt.contract import LayerLayout
from camrt.errors import ContractError, ModelError
from camrt.execution.feature_layout import from_nchw, to_nchw
from camrt.explainer import Explainer
from camrt.modelfile.metadata import parse_contract, read_contract
from camrt.plugins.registry import build_method_registry
from camrt_exporters.errors import ExportError
from camrt_exporters.export import export_onnx, write_model
from camrt_exporters.layouts import LayoutOverride, parse_attention_tokens, parse_layout_overrides

#: Every registered method that explains a layer (CAM needs a GAP + FC head the twins lack).
LAYER_METHODS = [name for name in build_method_registry().names()
                 if build_method_registry().get(name).requires.uses_layers
                 and not build_method_registry().get(name).requires.cam_weights]


def _model(nodes, initializers, output_shape=("b", 5)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "twins", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(output_shape))],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weights(seed: int, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 0.5).astype(np.float32) for name, shape in shapes.items()}


def channels_last_twin() -> onnx.ModelProto:
    """Conv -> Relu 'grid' [B, 8, 16, 16] -> Transpose 'grid_nhwc' [B, 16, 16, 8] -> Tanh ->
    ReduceMean over h, w -> Gemm."""
    node = helper.make_node
    nodes = [
        node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        node("Relu", ["conv"], ["grid"]),
        node("Transpose", ["grid"], ["grid_nhwc"], perm=list(contract.NCHW_TO_NHWC)),
        node("Tanh", ["grid_nhwc"], ["tanh"]),
        node("ReduceMean", ["tanh"], ["pooled"], axes=[1, 2], keepdims=0),
        node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    return _model(nodes, _weights(1, conv_w=(8, 3, 3, 3), conv_b=(8,), fc_w=(5, 8), fc_b=(5,)))


def token_twin() -> onnx.ModelProto:
    """Patch-embedding Conv (4x4, stride 4) -> Relu 'grid' [B, 8, 4, 4] -> flatten(2).transpose(1, 2)
    -> Concat after a class token 'tokens' [B, 17, 8] -> MatMul -> Tanh -> mean over the tokens ->
    Gemm: ViT's token layout, with a class token at position 0. The class token (the mean of the
    Conv's output) does not depend on 'grid', so the score's gradient with respect to 'grid' is that
    with respect to the grid tokens."""
    node = helper.make_node
    nodes = [
        node("Conv", ["image", "conv_w", "conv_b"], ["patches"], kernel_shape=[4, 4], strides=[4, 4]),
        node("Relu", ["patches"], ["grid"]),
        node("Reshape", ["grid", "flat_shape"], ["flat"]),
        node("Transpose", ["flat"], ["sequence"], perm=[0, 2, 1]),
        node("ReduceMean", ["patches"], ["grid_mean"], axes=[2, 3], keepdims=1),
        node("Reshape", ["grid_mean", "cls_shape"], ["cls"]),
        node("Concat", ["cls", "sequence"], ["tokens"], axis=1),
        node("MatMul", ["tokens", "mix_w"], ["mixed"]),
        node("Tanh", ["mixed"], ["tanh"]),
        node("ReduceMean", ["tanh"], ["pooled"], axes=[1], keepdims=0),
        node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    weights = _weights(2, conv_w=(8, 3, 4, 4), conv_b=(8,), mix_w=(8, 12), fc_w=(5, 12), fc_b=(5,))
    weights.update(flat_shape=np.array([0, 8, 16], np.int64), cls_shape=np.array([0, 1, 8], np.int64))
    return _model(nodes, weights)


@pytest.fixture(scope="module", params=["channels_last", "tokens"])
def twin(request, tmp_path_factory):
    """(contract file, the NCHW layer, its rearranged twin, the twin's expected layout)."""
    folder = tmp_path_factory.mktemp("twins")
    if request.param == "channels_last":
        model, twin_layer, layout = channels_last_twin(), "grid_nhwc", LayerLayout(contract.LAYOUT_NHWC)
    else:
        model, twin_layer, layout = token_twin(), "tokens", LayerLayout(contract.LAYOUT_TOKENS, (4, 4), (0,))
    onnx.save(model, folder / "m.onnx")
    exported, _ = export_onnx(folder / "m.onnx", layers=["grid", twin_layer], rules=["vanilla", "guided"])
    write_model(exported, folder / "m.camrt.onnx")
    return str(folder / "m.camrt.onnx"), "grid", twin_layer, layout


def test_the_rearranged_layer_records_its_layout(twin):
    path, nchw, rearranged, layout = twin
    info = read_contract(path)
    assert info.layer_layout(rearranged) == layout
    assert info.layer_layout(nchw) == LayerLayout(contract.LAYOUT_NCHW)


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_every_layer_method_gives_the_twin_maps(twin, method):
    path, nchw, rearranged, _ = twin
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    maps = [np.stack([e.heatmap for e in Explainer(path, method=method, layer=layer, device="cpu")
                      .explain(x, targets=[0, 3])]) for layer in (nchw, rearranged)]
    assert np.ptp(maps[0], axis=(1, 2)).min() > 0  # constant maps would make the comparison vacuous
    np.testing.assert_allclose(maps[1], maps[0], rtol=0, atol=1e-5)


def test_heatmaps_made_in_the_session_are_the_twin_maps(twin):
    path, nchw, rearranged, _ = twin
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    host = np.stack([e.heatmap for e in Explainer(path, layer=nchw, device="cpu").explain(x, [1, 2])])
    fused = np.stack([e.heatmap for e in Explainer(path, layer=rearranged, device="cpu", device_postprocess=True)
                      .explain(x, [1, 2])])
    assert np.ptp(host, axis=(1, 2)).min() > 0
    np.testing.assert_allclose(fused, host, rtol=0, atol=1e-5)


@pytest.mark.parametrize("builder", [channels_last_twin, token_twin], ids=["channels_last", "tokens"])
def test_seeded_runs_give_the_twin_feature_maps(builder, tmp_path):
    """`run_seeded` folds layers as `run` does: a random seed's activations and gradients of the
    rearranged layer are those of the NCHW one."""
    from camrt.execution.session import ExplainSession

    twin_layer = "grid_nhwc" if builder is channels_last_twin else "tokens"
    onnx.save(builder(), tmp_path / "m.onnx")
    exported, _ = export_onnx(tmp_path / "m.onnx", layers=["grid", twin_layer], rules=["vanilla"], seed=True)
    write_model(exported, tmp_path / "m.camrt.onnx")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    seed = rng.standard_normal((2, 5)).astype(np.float32)
    fetch = [name(layer) for layer in ("grid", twin_layer)
             for name in (contract.activation_output, contract.gradient_output)]
    got = ExplainSession(str(tmp_path / "m.camrt.onnx")).run_seeded(x, lambda outputs: seed, fetch)
    assert np.abs(got[fetch[1]]).min(axis=(1, 2, 3)).max() > 0
    np.testing.assert_allclose(got[fetch[2]], got[fetch[0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[fetch[3]], got[fetch[1]], rtol=1e-5, atol=1e-7)


def test_default_layers_carry_their_layout(tmp_path):
    """Without --layer the default is the last candidate, whatever its layout, recorded with it."""
    onnx.save(channels_last_twin(), tmp_path / "nhwc.onnx")
    onnx.save(token_twin(), tmp_path / "tokens.onnx")
    for name, default, layout in (("nhwc", "tanh", LayerLayout(contract.LAYOUT_NHWC)),
                                  ("tokens", "tanh", LayerLayout(contract.LAYOUT_TOKENS, (4, 4), (0,)))):
        exported, _ = export_onnx(tmp_path / f"{name}.onnx", rules=["vanilla"])
        info = parse_contract({p.key: p.value for p in exported.metadata_props})
        assert info.default_layer == default and info.layer_layout(default) == layout


def _scrambled() -> onnx.ModelProto:
    """'grid' [B, 8, 16, 16] reshaped (not transposed) to [B, 16, 16, 8]: it looks channels-last and is
    not; no layout a map can be read in."""
    model = channels_last_twin()
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([0, 16, 16, 8], np.int64), "scramble_shape"))
    graph.node[2].CopyFrom(helper.make_node("Reshape", ["grid", "scramble_shape"], ["scrambled"]))
    graph.node[3].input[0] = "scrambled"
    return model


def test_unestablished_layer_is_refused_naming_the_flag(tmp_path):
    onnx.save(_scrambled(), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"layer 'scrambled' \[.*\]: cannot establish .* --layout scrambled="):
        export_onnx(tmp_path / "m.onnx", layers=["scrambled"], rules=["vanilla"])
    exported, _ = export_onnx(tmp_path / "m.onnx", layers=["scrambled"], rules=["vanilla"],
                              layouts={"scrambled": LayoutOverride("nchw")})
    assert parse_contract({p.key: p.value for p in exported.metadata_props}).layer_layout("scrambled").layout == "nchw"


def test_token_override_is_checked_against_the_shape(tmp_path):
    onnx.save(token_twin(), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"17 tokens do not hold a 3x3 grid"):
        export_onnx(tmp_path / "m.onnx", layers=["tokens"], rules=["vanilla"],
                    layouts=parse_layout_overrides(["tokens=tokens:3x3:0"]))
    exported, _ = export_onnx(tmp_path / "m.onnx", layers=["tokens"], rules=["vanilla"],
                              layouts=parse_layout_overrides(["tokens=tokens:4x4"]))  # extras: the leading token
    assert parse_contract({p.key: p.value for p in exported.metadata_props}).layer_layout("tokens") == \
        LayerLayout(contract.LAYOUT_TOKENS, (4, 4), (0,))


@pytest.mark.parametrize("value, expected", [
    ("a.b=nhwc", LayoutOverride("nhwc")),
    ("x=tokens", LayoutOverride("tokens")),
    ("x=tokens:14x14:0,1", LayoutOverride("tokens", (14, 14), (0, 1))),
    ("x=tokens:7x7:", LayoutOverride("tokens", (7, 7), ())),
    ("a=b=nchw", LayoutOverride("nchw")),
])
def test_layout_flag_syntax(value, expected):
    layer = value.rpartition("=")[0]
    assert parse_layout_overrides([value]) == {layer: expected}


@pytest.mark.parametrize("value", ["x", "x=nhcw", "x=nchw:2x2", "x=tokens:14", "=nchw"])
def test_bad_layout_flag_is_refused(value):
    with pytest.raises(ExportError, match="--layout .*expected LAYER=nchw|nhwc|tokens"):
        parse_layout_overrides([value])


def test_attention_tokens_take_the_same_syntax():
    """One parser: `--attention-tokens SPEC` reads a tokens SPEC of `--layout LAYER=SPEC`."""
    for spec in ("tokens", "tokens:14x14:0,1", "tokens:7x7:"):
        assert parse_attention_tokens(spec) == parse_layout_overrides([f"x={spec}"])["x"]
    for spec in ("14,14,0", "nhwc", "tokens:14"):
        with pytest.raises(ExportError, match=rf"--attention-tokens '{spec}': expected tokens\[:HxW\[:P,P...\]\]"):
            parse_attention_tokens(spec)


def test_layer_layouts_metadata_is_optional_and_checked():
    base = {contract.META_CONTRACT_VERSION: "1", contract.META_INPUT: "image",
            contract.META_PREPROCESSING: contract.Preprocessing(8, 8).to_json()}
    assert parse_contract(base).layer_layout("any") == LayerLayout(contract.LAYOUT_NCHW)  # files from before
    good = {"t": LayerLayout(contract.LAYOUT_TOKENS, (2, 3), (0, 7)).to_dict()}
    assert parse_contract({**base, contract.META_LAYER_LAYOUTS: json.dumps(good)}).layer_layouts == \
        {"t": LayerLayout(contract.LAYOUT_TOKENS, (2, 3), (0, 7))}
    for bad, problem in (({"t": {"layout": "nwhc"}}, "layout 'nwhc'"),
                         ({"t": {"layout": "tokens", "grid": [2]}}, "grid of two positive ints"),
                         ({"t": {"layout": "tokens", "grid": [2, 2], "extra_tokens": [1, 1]}}, "distinct"),
                         ([1], "must be a JSON object")):
        with pytest.raises(ContractError, match=problem):
            parse_contract({**base, contract.META_LAYER_LAYOUTS: json.dumps(bad)})


def test_token_folding_against_explicit_indexing():
    """to_nchw / from_nchw against a loop over the grid: token 1 + i * w + j (class token at 0,
    a register at 7) is pixel (i, j)."""
    rng = np.random.default_rng(0)
    layout = LayerLayout(contract.LAYOUT_TOKENS, (2, 3), (0, 7))
    tokens = rng.standard_normal((2, 8, 5)).astype(np.float32)
    grid_tokens = [p for p in range(8) if p not in (0, 7)]
    expected = np.empty((2, 5, 2, 3), np.float32)
    for i in range(2):
        for j in range(3):
            expected[:, :, i, j] = tokens[:, grid_tokens[i * 3 + j], :]
    np.testing.assert_array_equal(to_nchw(tokens, layout), expected)
    edited = expected * 2
    back = from_nchw(edited, layout, tokens)
    np.testing.assert_array_equal(back[:, [0, 7]], tokens[:, [0, 7]])  # the extra tokens kept
    np.testing.assert_array_equal(to_nchw(back, layout), edited)
    with pytest.raises(ModelError, match="9 tokens cannot hold a 2x3 grid"):
        to_nchw(rng.standard_normal((1, 9, 5)).astype(np.float32), layout)


def test_inspect_shows_the_layouts(twin):
    from click.testing import CliRunner

    from camrt.cli import build_cli

    path, nchw, rearranged, layout = twin
    result = CliRunner().invoke(build_cli(), ["inspect", path])
    shown = "(nhwc)" if layout.layout == contract.LAYOUT_NHWC else "(tokens 4x4 + extra tokens at [0])"
    assert result.exit_code == 0 and f"layers:           {nchw}, {rearranged} {shown}" in result.output


def _patch_merging(step: int) -> onnx.ModelProto:
    """Conv [B, 8, 8, 8] -> channels-last -> the four x[:, i::step, j::step, :] (i, j < 2) -> Concat on
    channels (torchvision Swin's patch merging when step is 2)."""
    node = helper.make_node
    nodes = [node("Conv", ["image", "conv_w"], ["conv"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Transpose", ["conv"], ["nhwc"], perm=list(contract.NCHW_TO_NHWC))]
    parts = []
    for i in range(2):
        for j in range(2):
            nodes.append(node("Slice", ["nhwc", f"starts_{i}{j}", "ends", "axes", "steps"], [f"part_{i}{j}"]))
            parts.append(f"part_{i}{j}")
    nodes.append(node("Concat", parts, ["merged"], axis=-1))
    nodes.append(node("ReduceMean", ["merged"], ["pooled"], axes=[1, 2], keepdims=0))
    nodes.append(node("Gemm", ["pooled", "fc_w"], ["logits"], transB=1))
    weights = _weights(5, conv_w=(8, 3, 2, 2), fc_w=(5, 32))
    weights.update({f"starts_{i}{j}": np.array([i, j], np.int64) for i in range(2) for j in range(2)})
    weights.update(ends=np.array([8, 8], np.int64), axes=np.array([1, 2], np.int64), steps=np.array([step, step], np.int64))
    return _model(nodes, weights)


@pytest.mark.parametrize("step, expected", [(2, contract.LAYOUT_NHWC), (3, None)])
def test_strided_slices_subsample_the_grid_when_the_step_divides_it(step, expected):
    """Step 2 on an 8x8 map: four 4x4 grids of the same map, concatenated on channels: nhwc. Step 3
    does not divide 8 (the slices of 3, 3, 2... rows do not tile the map evenly): unestablished."""
    from camrt.modelfile.token_layout import infer_layer_layouts
    from camrt_exporters.autodiff.graph import GraphIndex

    index = GraphIndex(_patch_merging(step))
    layouts = infer_layer_layouts(index.nodes, index.shape, "image", contract.LAYOUT_NCHW, index.value)
    assert layouts["nhwc"].layout == contract.LAYOUT_NHWC
    assert (layouts["merged"].layout if "merged" in layouts else None) == expected


def test_sequence_layout_names_the_token_layout_of_a_length():
    """What an attention map [B, heads, T, T] of the token twin would be folded with."""
    from camrt.modelfile.token_layout import infer_layer_layouts, sequence_layout
    from camrt_exporters.autodiff.graph import GraphIndex

    index = GraphIndex(token_twin())
    layouts = infer_layer_layouts(index.nodes, index.shape, "image", contract.LAYOUT_NCHW, index.value)
    assert sequence_layout(layouts, 17) == LayerLayout(contract.LAYOUT_TOKENS, (4, 4), (0,))
    assert sequence_layout(layouts, 16) == LayerLayout(contract.LAYOUT_TOKENS, (4, 4), ())
    assert sequence_layout(layouts, 15) is None


def test_cli_layout_flag(exporters_plugin, tmp_path):
    from click.testing import CliRunner

    from camrt.cli import build_cli

    onnx.save(_scrambled(), tmp_path / "m.onnx")
    export = ["export", str(tmp_path / "m.onnx"), "--layer", "scrambled", "--rules", "vanilla", "-o", str(tmp_path / "o.onnx")]
    result = CliRunner().invoke(build_cli(), export)
    assert result.exit_code != 0 and "give it with --layout scrambled=" in result.output
    result = CliRunner().invoke(build_cli(), [*export, "--layout", "scrambled=nhwc"])
    assert result.exit_code == 0, result.output
    assert read_contract(tmp_path / "o.onnx").layer_layout("scrambled") == LayerLayout(contract.LAYOUT_NHWC)
    result = CliRunner().invoke(build_cli(), [*export, "--layout", "scrambled=tokens:4x4"])
    assert result.exit_code != 0 and "not [B, T, C]" in result.output


def test_pooled_maps_stay_nchw():
    """A [B, C, 1, 1] map (GlobalAveragePool, then a 1x1 Conv and a Sigmoid: a squeeze-and-excitation
    gate) is NCHW, as explicit layers of CNNs have always been."""
    from camrt.modelfile.token_layout import infer_layer_layouts
    from camrt_exporters.autodiff.graph import GraphIndex

    node = helper.make_node
    nodes = [node("Conv", ["image", "conv_w"], ["conv"], kernel_shape=[3, 3]),
             node("GlobalAveragePool", ["conv"], ["pooled"]),
             node("Conv", ["pooled", "se_w"], ["se"], kernel_shape=[1, 1]),
             node("Sigmoid", ["se"], ["gate"]),
             node("Flatten", ["gate"], ["flat"]),
             node("Gemm", ["flat", "fc_w"], ["logits"], transB=1)]
    index = GraphIndex(_model(nodes, _weights(6, conv_w=(8, 3, 3, 3), se_w=(8, 8, 1, 1), fc_w=(5, 8))))
    layouts = infer_layer_layouts(index.nodes, index.shape, "image", contract.LAYOUT_NCHW, index.value)
    assert {name: layouts[name].layout for name in ("conv", "pooled", "se", "gate")} == dict.fromkeys(
        ("conv", "pooled", "se", "gate"), contract.LAYOUT_NCHW)


def test_a_vector_layer_exports_without_a_layout_and_map_methods_refuse_it(tmp_path):
    """A classifier's hidden vector [B, C] (vgg's `classifier.1`) is no map: it exports (its gradient
    checked against torch autograd at export) with no layout entry, and Grad-CAM on it is refused."""
    import torch

    from camrt.errors import ModelError
    from camrt.explainer import Explainer
    from camrt.modelfile.metadata import read_contract
    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    exported, checks = export_torch(model, layers=["1", "4"], input_size=(8, 8), rules=["vanilla"])
    assert any(c.name == contract.gradient_output("4") for c in checks) and all(c.ok for c in checks)
    write_model(exported, tmp_path / "vector.camrt.onnx")
    info = read_contract(tmp_path / "vector.camrt.onnx")
    assert info.layers == ["1", "4"] and "4" not in (info.layer_layouts or {})
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ModelError, match="methods need NCHW feature maps"):
        Explainer(tmp_path / "vector.camrt.onnx", method="gradcam", layer="4", device="cpu").explain(x)
    assert Explainer(tmp_path / "vector.camrt.onnx", method="gradcam", layer="1", device="cpu").explain(x)
