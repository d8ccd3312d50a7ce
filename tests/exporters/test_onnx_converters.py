"""The ONNX front end on files as converters write them: torch.onnx.export (legacy exporter) with
dynamic axes, weights as Constant nodes or behind Identity nodes, constant subgraphs, computed
padding, hard-coded batches, old opsets, several outputs, grayscale and BGR inputs.

The oracle is torch autograd on the module the file was exported from (or the same network built
from the file's own arrays)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from camrt import contract
from camrt.modelfile.metadata import parse_contract
from camrt_exporters.errors import ExportError
from camrt_exporters.export import export_onnx
from camrt_exporters.validate import run_contract

from .tiny_models import conv_relu_maxpool_gap_gemm_softmax, torch_equivalent

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter, used on purpose


class TinyCnn(torch.nn.Module):
    """Conv -> ReLU -> Conv(stride 2) -> ReLU -> global average pooling -> linear head.

    head: "linear" (Flatten + nn.Linear: Gemm), "matmul" (pooled @ W + b: MatMul + Add), with the
    pooling written as x.mean((2, 3)) (ReduceMean); `activation` (softmax/sigmoid) after the logits."""

    def __init__(self, channels: int = 3, classes: int = 5, head: str = "linear", activation: str | None = None,
                 pad: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(channels, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        with torch.no_grad():  # non-trivial BatchNorm statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
        self.fc = torch.nn.Linear(8, classes)
        self.head, self.activation, self.pad = head, activation, pad

    def features(self, x):
        x = F.relu(self.conv1(x))
        if self.pad == "computed":  # pads computed from Shape at run time (EfficientNet's "same" padding)
            p = x.shape[-1] % 3 + 1
            x = F.pad(x, (0, p, 0, p))
        return F.relu(self.bn(self.conv2(x)))

    def logits(self, x):
        pooled = self.features(x).mean((2, 3))
        if self.head == "matmul":
            return pooled @ self.fc.weight.t() + self.fc.bias
        return self.fc(pooled)

    def forward(self, x):
        logits = self.logits(x)
        if self.activation == "softmax":
            return torch.softmax(logits, 1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits


def torch_export(module, path, shape, dynamic_axes=None, opset: int = 17, output_names=None,
                 keep_initializers_as_inputs: bool = False):
    module.eval()
    torch.onnx.export(module, torch.zeros(shape), str(path), dynamo=False, input_names=["input"],
                      output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                      keep_initializers_as_inputs=keep_initializers_as_inputs)
    return path


def autograd(module, x: np.ndarray, targets: np.ndarray, logits=None):
    """(logits, resolved targets, d logit[target] / d x) in torch."""
    xt = torch.from_numpy(x).requires_grad_(True)
    scores = (logits or module.logits)(xt)
    resolved = torch.where(torch.from_numpy(targets) < 0, scores.argmax(1), torch.from_numpy(targets))
    grad, = torch.autograd.grad(scores.gather(1, resolved[:, None]).sum(), xt)
    return scores.detach().numpy(), resolved.numpy(), grad.numpy()


def assert_matches_autograd(model, module, x: np.ndarray, input_name: str = "input", logits=None):
    """The file's logits, targets and vanilla input gradient equal torch autograd's."""
    targets = np.array([-1, 1, 0, -1][:len(x)], dtype=np.int64)
    got = run_contract(model, input_name, x, targets)
    ref_logits, resolved, ref_grad = autograd(module, x, targets, logits)
    np.testing.assert_array_equal(got[contract.TARGET_INDEX_OUTPUT], resolved)
    np.testing.assert_allclose(got[contract.LOGITS_OUTPUT], ref_logits, rtol=0, atol=1e-5 * np.abs(ref_logits).max())
    vanilla = got[contract.input_gradient_output(contract.RULE_VANILLA)]
    np.testing.assert_allclose(vanilla, ref_grad, rtol=0, atol=1e-4 * np.abs(ref_grad).max())
    return got


def meta(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def normal(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- dynamic dimensions -------------------------------------------------------------------------

DYNAMIC_HW = {"input": {0: "b", 2: "h", 3: "w"}}


def test_open_height_width_without_input_size_is_one_line_naming_the_flag(tmp_path):
    path = torch_export(TinyCnn(), tmp_path / "dyn.onnx", (1, 3, 16, 16), DYNAMIC_HW)
    with pytest.raises(ExportError) as info:
        export_onnx(path, rules=["vanilla"])
    message = str(info.value)
    assert "\n" not in message and "--input-size" in message and "dim_param" not in message
    assert "'input' ['b', 3, 'h', 'w']" in message


def test_open_height_width_are_pinned_by_input_size_non_square(tmp_path):
    """A [b, 3, h, w] file pinned at 24x64 (non-square): gradients equal torch autograd at that size,
    the preprocessing records it, and one file serves batch 1 and 3 alike."""
    module = TinyCnn()
    path = torch_export(module, tmp_path / "dyn.onnx", (1, 3, 16, 16), DYNAMIC_HW)
    model, _ = export_onnx(path, rules=["vanilla"], input_size=(24, 64))
    p = contract.Preprocessing.from_json(meta(model)[contract.META_PREPROCESSING])
    assert (p.height, p.width) == (24, 64)
    x = normal((3, 3, 24, 64))
    got = assert_matches_autograd(model, module, x)
    one = run_contract(model, "input", x[2:], np.array([-1]))
    np.testing.assert_allclose(one[contract.LOGITS_OUTPUT][0], got[contract.LOGITS_OUTPUT][2], rtol=1e-5, atol=1e-6)


def test_literal_minus_one_batch_and_size_are_open_dimensions(tmp_path):
    model = conv_relu_maxpool_gap_gemm_softmax(batch=1)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (-1, 3, -1, -1)):
        dim.dim_value = value
    path = tmp_path / "minus_one.onnx"
    onnx.save(model, path)
    with pytest.raises(ExportError, match=r"\[-1, 3, -1, -1\] has open height/width: pin them with --input-size"):
        export_onnx(path, rules=["vanilla"])
    exported, _ = export_onnx(path, layers=["relu"], rules=["vanilla"], input_size=(16, 16))
    forward = torch_equivalent()
    x = normal((2, 3, 16, 16), seed=3)
    assert_matches_autograd(exported, None, x, input_name="image", logits=lambda t: forward(t)[2])


def test_input_size_that_contradicts_a_static_size_is_refused(tmp_path):
    path = torch_export(TinyCnn(), tmp_path / "static.onnx", (1, 3, 16, 16), {"input": {0: "b"}})
    with pytest.raises(ExportError, match=r"--input-size 32,32 differs from the model's 16,16"):
        export_onnx(path, rules=["vanilla"], input_size=(32, 32))


# --- converter styles ---------------------------------------------------------------------------

def _weights_behind_identity(model: onnx.ModelProto) -> None:
    """Each Constant weight becomes an initializer read through an Identity node (torch's legacy
    exporter writes deduplicated initializers that way)."""
    for node in [n for n in model.graph.node if n.op_type == "Constant"]:
        name = node.output[0]
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t),
                                                               name + "_shared"))
        node.CopyFrom(helper.make_node("Identity", [name + "_shared"], [name], name=f"identity_{name}"))


def _weights_behind_subgraphs(model: onnx.ModelProto) -> None:
    """The conv weight stored transposed behind a Transpose, the classifier bias as the sum of two
    halves (constant subgraphs as tf2onnx and other converters leave them)."""
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    conv_w = numpy_helper.to_array(constants["conv_w"].attribute[0].t)
    fc_b = numpy_helper.to_array(constants["fc_b"].attribute[0].t)
    model.graph.initializer.extend([numpy_helper.from_array(conv_w.transpose(2, 3, 1, 0).copy(), "conv_w_hwio"),
                                    numpy_helper.from_array(fc_b / 2, "fc_b_half")])
    constants["conv_w"].CopyFrom(helper.make_node("Transpose", ["conv_w_hwio"], ["conv_w"], name="to_oihw",
                                                  perm=[3, 2, 0, 1]))
    constants["fc_b"].CopyFrom(helper.make_node("Add", ["fc_b_half", "fc_b_half"], ["fc_b"], name="bias_sum"))


@pytest.mark.parametrize("style", ["constant_nodes", "identity", "subgraphs"])
def test_weight_styles_give_the_gradients_of_torch_autograd(tmp_path, style):
    model = conv_relu_maxpool_gap_gemm_softmax(batch=1)
    {"constant_nodes": lambda m: None, "identity": _weights_behind_identity,
     "subgraphs": _weights_behind_subgraphs}[style](model)
    path = tmp_path / f"{style}.onnx"
    onnx.save(model, path)
    exported, _ = export_onnx(path, layers=["relu"], rules=["vanilla"], input_size=(16, 16))
    forward = torch_equivalent()
    x = normal((2, 3, 16, 16), seed=4)
    got = assert_matches_autograd(exported, None, x, input_name="image", logits=lambda t: forward(t)[2])
    xt = torch.from_numpy(x).requires_grad_(True)
    relu, _, logits = forward(xt)
    targets = torch.from_numpy(got[contract.TARGET_INDEX_OUTPUT])
    g_relu, = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), relu)
    # the user's layer name survives the folding, and its gradient is right
    np.testing.assert_allclose(got[contract.gradient_output("relu")], g_relu.numpy(), rtol=0,
                               atol=1e-5 * float(g_relu.abs().max()))


class SharedBatchNorm(torch.nn.Module):
    """Conv -> ReLU -> BatchNorm -> ReLU -> BatchNorm: BatchNorms after a ReLU cannot be fused into
    a Conv, and their equal (default) scales and biases are deduplicated by torch's legacy exporter
    into one initializer read through Identity nodes, as densenet121's are."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn1, self.bn2 = torch.nn.BatchNorm2d(6), torch.nn.BatchNorm2d(6)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        self.fc = torch.nn.Linear(6, 4)

    def logits(self, x):
        return self.fc(self.bn2(F.relu(self.bn1(F.relu(self.conv(x))))).mean((2, 3)))

    forward = logits


def test_deduplicated_batchnorm_weights_behind_identity_nodes(tmp_path):
    module = SharedBatchNorm()
    path = torch_export(module, tmp_path / "shared.onnx", (1, 3, 12, 12), {"input": {0: "b"}})
    source = onnx.load(path)
    identity_fed = {n.input[0] for n in source.graph.node if n.op_type == "Identity"}
    assert identity_fed, "precondition: the exporter deduplicated the BatchNorm weights behind Identity nodes"
    exported, _ = export_onnx(path, rules=["vanilla"])
    assert_matches_autograd(exported, module, normal((2, 3, 12, 12), seed=5))


def test_shapes_onnx_cannot_infer_are_measured(tmp_path):
    """Pads computed from Shape at run time: ONNX shape inference leaves the spatial dims after the
    Pad unknown; they are measured at the pinned size, and the layer after it is explainable."""
    module = TinyCnn(pad="computed")
    path = torch_export(module, tmp_path / "computed_pad.onnx", (1, 3, 16, 16), {"input": {0: "b"}})
    plain = onnx.load(path)
    del plain.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(plain, data_prop=True)
    pad_out = next(n.output[0] for n in plain.graph.node if n.op_type == "Pad")
    pad_dims = next(v for v in inferred.graph.value_info if v.name == pad_out).type.tensor_type.shape.dim
    assert not pad_dims[2].HasField("dim_value"), "precondition: ONNX shape inference cannot derive the Pad's size"
    exported, _ = export_onnx(path, rules=["vanilla"])
    default = meta(exported)[contract.META_DEFAULT_LAYER]
    assert default.endswith("Relu_1_output_0")  # the last ReLU, after the Pad (8x8 at the pinned 16x16)
    assert_matches_autograd(exported, module, normal((3, 3, 16, 16), seed=6))


class Tokens(torch.nn.Module):
    """A per-position linear layer over flattened tokens [B*h*w, C] (as LeViT's layers are
    exported): ONNX shape inference cannot tell the token count, a multiple of the batch."""

    def __init__(self):
        super().__init__()
        self.net = TinyCnn()
        torch.manual_seed(3)
        self.mix = torch.nn.Linear(8, 8)

    def logits(self, x):
        features = self.net.features(x)
        b, c, h, w = features.shape
        tokens = F.relu(self.mix(features.permute(0, 2, 3, 1).flatten(0, 2)))
        return self.net.fc(tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).mean((2, 3)))

    forward = logits


def test_measured_dimensions_proportional_to_the_batch_stay_symbolic(tmp_path):
    """Measured at two batch sizes, the token count is batch*64, not the 128 of one run at batch 2
    (which would read as a hard-coded batch); the file exports and its gradients are right. The
    [b, h, w, c] Reshape of the tokens is channels-last: recorded so, never read as NCHW."""
    module = Tokens()
    path = torch_export(module, tmp_path / "tokens.onnx", (1, 3, 16, 16), {"input": {0: "b"}})
    flat = next(n.output[0] for n in onnx.load(path).graph.node if n.op_type == "Flatten")
    from camrt_exporters.autodiff.graph import GraphIndex
    from camrt_exporters.contract_file import prepare

    source = onnx.load(path)
    del source.graph.value_info[:]
    assert GraphIndex(prepare(source)).shape(flat) == ("b*64", 8)
    named, _ = export_onnx(path, layers=["/Reshape_output_0"], rules=["vanilla"])
    assert parse_contract({p.key: p.value for p in named.metadata_props}).layer_layout("/Reshape_output_0").layout == "nhwc"
    exported, _ = export_onnx(path, rules=["vanilla"])
    assert_matches_autograd(exported, module, normal((3, 3, 16, 16), seed=12))


class FlattenTo(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.net, self.shape = TinyCnn(), shape

    def logits(self, x):
        return self.net.fc(self.net.features(x).mean((2, 3), keepdim=True).reshape(*self.shape))

    forward = logits


def test_minus_one_batch_in_reshape_serves_every_batch(tmp_path):
    """Exported at a static batch 1 with reshape(-1, 8): the batch is dynamic in the file."""
    module = FlattenTo((-1, 8))
    path = torch_export(module, tmp_path / "minus_one.onnx", (1, 3, 16, 16))
    exported, _ = export_onnx(path, rules=["vanilla"])
    assert_matches_autograd(exported, module, normal((4, 3, 16, 16), seed=7))


def per_sample(module):
    """The module applied to each sample alone: what a graph exported at batch 1 computes for each."""
    return lambda x: torch.cat([module.logits(x[i:i + 1]) for i in range(len(x))])


def test_reshape_hard_coding_the_exported_batch_copies_the_batch(tmp_path):
    """reshape(1, -1) exported at a static batch 1 (tf2onnx writes such shapes for every TFLite file):
    the Reshape is rewritten to copy the batch, and each sample of a batch of 4 gets the graph's
    answer for that sample alone."""
    module = FlattenTo((1, -1))
    path = torch_export(module, tmp_path / "batch_one.onnx", (1, 3, 16, 16))
    told: list[str] = []
    exported, _ = export_onnx(path, rules=["vanilla"], log=told.append)
    assert any("'/Reshape' hard-coded the exported batch size ([1, -1]): it now copies the batch ([0, -1])" in line
               for line in told)
    assert_matches_autograd(exported, module, normal((4, 3, 16, 16), seed=7), logits=per_sample(module))


class MixesBatchIntoChannels(torch.nn.Module):
    """reshape(1, -1) after moving the channels to axis 0: at batch 1 the reshaped tensor is [8, 1, 1, 1],
    its axis 0 the channels, so copying axis 0 would be wrong."""

    def __init__(self):
        super().__init__()
        self.net = TinyCnn()

    def logits(self, x):
        pooled = self.net.features(x).mean((2, 3), keepdim=True).transpose(0, 1)
        return self.net.fc(pooled.reshape(1, -1))

    forward = logits


def test_reshape_hard_coding_the_batch_is_refused_by_node(tmp_path):
    """A Reshape that hard-codes the batch where the reshaped axis 0 is not the batch is refused, naming it."""
    path = torch_export(MixesBatchIntoChannels(), tmp_path / "batch_one.onnx", (1, 3, 16, 16))
    with pytest.raises(ExportError, match=r"node '/Reshape' \(Reshape\) turns the batch dimension into 1.*"
                                          r"hard-codes the batch size"):
        export_onnx(path, rules=["vanilla"])


class UpsampledToInputSize(torch.nn.Module):
    """F.interpolate(features, size=x.shape[-2:]) (decoders, saliency heads): exported with a dynamic batch,
    the Resize's sizes are Concat(Shape(features)[:2], Shape(x)[2:]): a batch piece and a size piece."""

    def __init__(self):
        super().__init__()
        self.net = TinyCnn()

    def logits(self, x):
        features = self.net.features(x)
        upsampled = torch.nn.functional.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.net.fc(upsampled.mean((2, 3)))

    forward = logits


def test_resize_to_the_input_size_with_a_dynamic_batch(tmp_path):
    """The size piece folds to a constant while the batch piece stays Shape(features)[:2]: the Resize's
    backward rule sees every axis it resizes as static (refused as 'not static' before)."""
    module = UpsampledToInputSize()
    path = torch_export(module, tmp_path / "upsampled.onnx", (1, 3, 16, 16), {"input": {0: "batch"}})
    exported, _ = export_onnx(path, rules=["vanilla"])
    assert_matches_autograd(exported, module, normal((3, 3, 16, 16), seed=5))


@pytest.mark.parametrize(("opset", "weights_as_inputs"), [(11, False), (11, True), (13, False)])
def test_old_opsets_are_converted(tmp_path, opset, weights_as_inputs):
    """Opsets 11-13 are converted to 17; old exports also list their weights as graph inputs."""
    module = TinyCnn()
    path = torch_export(module, tmp_path / f"opset{opset}.onnx", (1, 3, 16, 16), {"input": {0: "b"}}, opset=opset,
                        keep_initializers_as_inputs=weights_as_inputs)
    assert (len(onnx.load(path).graph.input) > 1) == weights_as_inputs
    exported, _ = export_onnx(path, rules=["vanilla"])
    assert next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")) >= 16
    assert_matches_autograd(exported, module, normal((2, 3, 16, 16), seed=8))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_reducemean_matmul_head_behind_an_activation(tmp_path, activation):
    """A converter's ReduceMean + MatMul + Add head behind Softmax/Sigmoid: the logits before the
    activation are explained, and the head is recognised for CAM (its weights are the classifier's)."""
    module = TinyCnn(head="matmul", activation=activation)
    path = torch_export(module, tmp_path / "head.onnx", (1, 3, 16, 16), {"input": {0: "b"}})
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"ReduceMean", "MatMul", "Add"} <= ops and "Gemm" not in ops
    exported, _ = export_onnx(path, rules=["vanilla"])
    info = meta(exported)
    score = json.loads(info[contract.META_SCORE])
    assert score["activation"] == activation.capitalize() and score["softmax"] == (activation == "softmax")
    layer = info[contract.META_DEFAULT_LAYER]
    assert json.loads(info[contract.META_CAM_LAYERS]) == [layer]
    got = assert_matches_autograd(exported, module, normal((2, 3, 16, 16), seed=9))
    rows = module.fc.weight.detach().numpy()[got[contract.TARGET_INDEX_OUTPUT]]
    np.testing.assert_allclose(got[contract.cam_weights_output(layer)], rows, rtol=1e-6)


# --- several outputs ----------------------------------------------------------------------------

class ThreeHeads(torch.nn.Module):
    """A face-detector-like head: box regression [B, 4], landmarks [B, 10], class probabilities
    softmax([B, 5]), in that order."""

    def __init__(self, probabilities: bool = True):
        super().__init__()
        self.net, self.probabilities = TinyCnn(), probabilities
        torch.manual_seed(2)
        self.boxes, self.landmarks = torch.nn.Linear(8, 4), torch.nn.Linear(8, 10)

    def pooled(self, x):
        return self.net.features(x).mean((2, 3))

    def logits(self, x):
        return self.net.fc(self.pooled(x))

    def forward(self, x):
        pooled = self.pooled(x)
        scores = self.net.fc(pooled)
        return self.boxes(pooled), self.landmarks(pooled), torch.softmax(scores, 1) if self.probabilities else scores


HEADS = ["boxes", "landmarks", "probabilities"]


def test_the_output_behind_a_softmax_is_explained_and_said(tmp_path):
    module = ThreeHeads()
    path = torch_export(module, tmp_path / "heads.onnx", (1, 3, 16, 16), {"input": {0: "b"}}, output_names=HEADS)
    said = []
    exported, _ = export_onnx(path, rules=["vanilla"], log=said.append)
    assert any(line.startswith("explained output: probabilities") and "--score-output" in line for line in said)
    score = json.loads(meta(exported)[contract.META_SCORE])
    assert score["output"] == "probabilities" and score["softmax"]
    got = assert_matches_autograd(exported, module, normal((2, 3, 16, 16), seed=10))
    assert {"boxes", "landmarks", "probabilities"} <= set(got)  # the model's own outputs stay


def test_score_output_chooses_another_output(tmp_path):
    module = ThreeHeads()
    path = torch_export(module, tmp_path / "heads.onnx", (1, 3, 16, 16), {"input": {0: "b"}}, output_names=HEADS)
    exported, _ = export_onnx(path, rules=["vanilla"], output="landmarks")
    assert json.loads(meta(exported)[contract.META_SCORE])["output"] == "landmarks"
    assert_matches_autograd(exported, module, normal((2, 3, 16, 16), seed=11),
                            logits=lambda t: module.landmarks(module.pooled(t)))
    with pytest.raises(ExportError, match=r"--score-output 'scores' is not an output.*'boxes', 'landmarks'"):
        export_onnx(path, rules=["vanilla"], output="scores")


def test_several_plausible_outputs_without_an_activation_are_refused(tmp_path):
    path = torch_export(ThreeHeads(probabilities=False), tmp_path / "heads.onnx", (1, 3, 16, 16),
                        {"input": {0: "b"}}, output_names=HEADS)
    with pytest.raises(ExportError) as info:
        export_onnx(path, rules=["vanilla"])
    message = str(info.value)
    assert "--score-output" in message and "['boxes', 'landmarks', 'probabilities']" in message
    assert "\n" not in message


# --- preprocessing: what the runtime feeds the model ---------------------------------------------

def _photo(height: int = 40, width: int = 56) -> np.ndarray:
    """A smooth, colourful HWC uint8 RGB image (each channel different)."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([(rows * 255 // height), (cols * 255 // width), ((rows + cols) * 7) % 256], -1).astype(np.uint8)


def _source_logits(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _explain_cli(tmp_path, source, *flags):
    from click.testing import CliRunner

    from camrt.cli import build_cli
    from camrt.explainer import Explainer

    target = tmp_path / "model.camrt.onnx"
    result = CliRunner().invoke(build_cli(), ["export", str(source), "-o", str(target), "--rules", "vanilla", *flags],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Explainer(target, method="gradcam", device="cpu")


def test_bgr_and_127_5_preprocessing_feed_the_model_what_it_expects(tmp_path, exporters_plugin):
    """--channel-order bgr --scale 1 --mean 127.5 --std 127.5 (a Caffe/TF-style model): the
    explained input is (bgr - 127.5) / 127.5, resized to the pinned 24x32 (non-square)."""
    import cv2

    path = torch_export(TinyCnn(), tmp_path / "bgr.onnx", (1, 3, 16, 16), DYNAMIC_HW)
    explainer = _explain_cli(tmp_path, path, "--input-size", "24,32", "--channel-order", "bgr", "--scale", "1",
                             "--mean", "127.5", "--std", "127.5")
    image = _photo()
    resized = cv2.resize(image, (32, 24), interpolation=cv2.INTER_LINEAR)
    expected = ((resized[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    fed, _ = explainer.prepare([image])
    np.testing.assert_allclose(fed, expected, rtol=0, atol=1e-6)
    logits = _source_logits(path, expected)
    explanation, = explainer.explain([image])
    assert explanation.target == int(logits.argmax())
    assert explanation.score == pytest.approx(float(logits.max()), rel=1e-5)


def test_grayscale_model_takes_one_mean_and_std_and_is_fed_the_luma(tmp_path, exporters_plugin):
    module = TinyCnn(channels=1)
    path = torch_export(module, tmp_path / "gray.onnx", (1, 1, 20, 20), {"input": {0: "b"}})
    explainer = _explain_cli(tmp_path, path, "--mean", "0.5", "--std", "0.25")
    p = explainer.info.preprocessing
    assert (p.mean, p.std) == ((0.5,), (0.25,))
    image = _photo(20, 20)
    luma = 0.299 * image[:, :, 0] + 0.587 * image[:, :, 1] + 0.114 * image[:, :, 2]  # ITU-R BT.601
    expected = ((luma / 255 - 0.5) / 0.25).astype(np.float32)[None, None]
    fed, _ = explainer.prepare([image])
    assert fed.shape == (1, 1, 20, 20)
    # OpenCV rounds the luma to 8 bits: at most half a grey level apart
    np.testing.assert_allclose(fed, expected, rtol=0, atol=0.5 / 255 / 0.25 + 1e-6)
    logits = _source_logits(path, fed)
    explanation, = explainer.explain([image])
    assert explanation.target == int(logits.argmax())
    assert explanation.score == pytest.approx(float(logits.max()), rel=1e-5)
    assert explanation.heatmap.shape == (20, 20)


def test_grayscale_mean_with_three_values_is_refused(tmp_path):
    path = torch_export(TinyCnn(channels=1), tmp_path / "gray.onnx", (1, 1, 20, 20), {"input": {0: "b"}})
    with pytest.raises(ExportError, match=r"3/3 values for a model with 1 input channel"):
        export_onnx(path, rules=["vanilla"], preprocessing=contract.Preprocessing(20, 20))


def test_an_old_opset_that_cannot_be_converted_is_refused_by_node(tmp_path):
    """ImageScaler (opset <= 9, since removed from ONNX) has nothing to be converted to."""
    graph = helper.make_graph(
        [helper.make_node("ImageScaler", ["image"], ["scaled"], name="scaler", scale=2.0),
         helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"], name="gap"),
         helper.make_node("Flatten", ["pooled"], ["logits"], name="flatten")],
        "old", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    path = tmp_path / "opset9.onnx"
    onnx.save(model, path)
    with pytest.raises(ExportError, match=r"opset 9; camrt needs >= 16, and node 'scaler' \(ImageScaler\) has no "
                                          r"counterpart.*Re-export the model with opset 17 or newer"):
        export_onnx(path, rules=["vanilla"])


def test_folding_keeps_the_names_control_flow_subgraphs_read(tmp_path):
    """A constant behind an Identity that an If branch reads keeps its name: the folded model runs
    and computes what the source does."""
    import onnxruntime as ort

    from camrt_exporters.contract_file import prepare

    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Add", ["x", "scale"], [name], name=f"{name}_add")], name, [],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["scale_shared"], ["scale"], name="dedup"),
         helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul"),
         helper.make_node("If", ["flag"], ["chosen"], name="if", then_branch=branch("then_out"),
                          else_branch=branch("else_out"))],
        "control_flow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("chosen", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "scale_shared")])
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source.ir_version = 8
    folded = prepare(source)
    onnx.checker.check_model(folded, full_check=True)
    feeds = {"x": np.array([1.0, -1.0], np.float32), "flag": np.array(True)}
    run = lambda model: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, feeds)
    for got, expected in zip(run(folded), [np.array([2.0, -3.0]), np.array([3.0, 2.0])]):
        np.testing.assert_array_equal(got, expected)


def test_a_batch_moved_to_another_axis_is_carried(tmp_path):
    """Attention layers permute the batch off axis 0 ([3, batch*64, heads, tokens, dim]); that is no
    hard-coded batch: the file exports and its input gradient equals the closed form (the model is
    linear: the score's gradient is the chosen class's weights pushed back through the Conv)."""
    rng = np.random.default_rng(4)
    conv_w, fc_w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["conv"], name="conv"),
             helper.make_node("Transpose", ["conv"], ["channels_first"], name="batch_off_axis_0", perm=[1, 0, 2, 3]),
             helper.make_node("Transpose", ["channels_first"], ["back"], name="batch_on_axis_0", perm=[1, 0, 2, 3]),
             helper.make_node("GlobalAveragePool", ["back"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "moved", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5])],
                              [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(fc_w, "fc_w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "moved.onnx")
    exported, _ = export_onnx(tmp_path / "moved.onnx", layers=["conv"], rules=["vanilla"])
    got = run_contract(exported, "image", rng.standard_normal((2, 3, 6, 6)).astype(np.float32), np.array([1, 3]))
    per_pixel = np.stack([conv_w[:, :, 0, 0].T @ fc_w[:, t] / 36 for t in (1, 3)])  # [2, 3]
    expected = np.broadcast_to(per_pixel[:, :, None, None], (2, 3, 6, 6))
    np.testing.assert_allclose(got[contract.input_gradient_output("vanilla")], expected, rtol=1e-5, atol=1e-7)
