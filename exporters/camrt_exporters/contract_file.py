"""Turn a forward ONNX classifier into a camrt contract file (forward + gradient subgraphs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from camrt import contract
from camrt.layers import spatial_candidates, tensor_layouts
from camrt.errors import ExportError

from .autodiff.graph import GraphIndex, attribute
from .autodiff.reverse import ForwardPatches, RuleSet, active_tensors, differentiate

MIN_OPSET = 16  # ScatterElements(reduction="add") used by the MaxPool rule


@dataclass
class ScoreChoice:
    tensor: str  # the differentiated [B, num_classes] tensor
    output: str  # the model output it belongs to
    through_softmax: bool  # whether `output` is softmax(tensor)


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name every node uniquely and lift the opset to one the backward rules can emit."""
    model = _upgrade_opset(model)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= MIN_OPSET:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, 17)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise ExportError(
            f"the model uses opset {opset}; camrt needs >= {MIN_OPSET} and automatic conversion "
            f"failed ({exc}). Re-export the model with opset 17 or newer."
        ) from exc


def choose_score(index: GraphIndex, output: str, use_softmax_output: bool = False) -> ScoreChoice:
    """The logits behind `output`: the input of a final Softmax (through Identity nodes) unless told otherwise."""
    tensor = output
    producer = index.producer.get(tensor)
    while producer is not None and producer.op_type == "Identity":
        tensor = producer.input[0]
        producer = index.producer.get(tensor)
    through_softmax = False
    if producer is not None and producer.op_type == "Softmax" and not use_softmax_output:
        tensor, through_softmax = producer.input[0], True
    rank = index.rank(tensor)
    if rank != 2:
        raise ExportError(
            f"the score tensor {tensor!r} (behind output {output!r}) has rank {rank}; camrt explains "
            "classifiers whose output is [batch, num_classes]."
        )
    return ScoreChoice(tensor, output, through_softmax)


def layer_candidates(index: GraphIndex, image_input: str, score: str, image_layout: str) -> list[str]:
    """NCHW tensors with spatial extent on a path from the input to the score, in graph order
    (the rule lives in camrt.layers, shared with `camrt inspect`)."""
    return spatial_candidates(index.nodes, index.shape, active_tensors(index, score, [image_input]),
                              tensor_layouts(index.nodes, image_input, image_layout))


@dataclass
class CamHead:
    """The classifier after a layer's global average pooling: score = pooled @ W' * alpha + bias."""

    weight: str  # a constant: [classes, K] when `rows_are_classes`, else [K, classes]
    rows_are_classes: bool
    alpha: float


#: Ops between the pooled [B, K, 1, 1] tensor and the classifier's [B, K] input.
_FLATTENING_OPS = ("Flatten", "Reshape", "Squeeze", "Identity")


def _single_consumer(index: GraphIndex, tensor: str, on_path: set[str]) -> onnx.NodeProto | None:
    """The one node on the path to the score that reads `tensor` (None when there are several)."""
    consumers = [n for n in index.consumers.get(tensor, []) if any(o in on_path for o in n.output)]
    return consumers[0] if len(consumers) == 1 else None


def _is_global_average_pool(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """GlobalAveragePool, ReduceMean over exactly H and W, or an AveragePool whose one window is the map."""
    shape = index.shape(node.input[0])
    if shape is None or len(shape) != 4:
        return False
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type == "ReduceMean":
        axes = index.value(node.input[1]) if len(node.input) > 1 and node.input[1] else attribute(node, "axes")
        return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]
    if node.op_type == "AveragePool":
        pads = attribute(node, "pads", [0, 0, 0, 0])
        return list(attribute(node, "kernel_shape", [])) == list(shape[2:]) and not any(pads)
    return False


def find_cam_head(index: GraphIndex, tensor: str, score: str) -> CamHead | None:
    """The classifier weights of CAM (Zhou et al. 2016) when `tensor` reaches `score` only through
    global average pooling -> [Flatten/Reshape/Squeeze] -> Gemm, or MatMul [-> Add], with a constant
    weight; None for any other head."""
    on_path = active_tensors(index, score, [tensor])

    def reader(name: str) -> onnx.NodeProto | None:
        return None if name == score else _single_consumer(index, name, on_path)

    node = reader(tensor)
    if node is None or not _is_global_average_pool(index, node):
        return None
    current, node = node.output[0], reader(node.output[0])
    while node is not None and node.op_type in _FLATTENING_OPS:
        current, node = node.output[0], reader(node.output[0])
    if node is None or index.shape(current) is None or len(index.shape(current)) != 2 or node.input[0] != current:
        return None
    if node.op_type == "Gemm" and not attribute(node, "transA", 0):
        head = CamHead(node.input[1], bool(attribute(node, "transB", 0)), float(attribute(node, "alpha", 1.0)))
    elif node.op_type == "MatMul":
        head = CamHead(node.input[1], False, 1.0)
    else:
        return None
    weight = index.value(head.weight)
    if weight is None or weight.ndim != 2 or weight.shape[1 if head.rows_are_classes else 0] != index.shape(tensor)[1]:
        return None
    out, node = node.output[0], reader(node.output[0])
    if node is not None and node.op_type == "Add" and any(index.value(i) is not None for i in node.input):
        out, node = node.output[0], reader(node.output[0])
    while node is not None and node.op_type == "Identity":
        out, node = node.output[0], reader(node.output[0])
    return head if out == score else None


@dataclass
class BiasTerm:
    """A bias-carrying Conv / BatchNormalization node: FullGrad's d score / d output * bias."""

    node: str
    output: str
    bias: np.ndarray  # [C]; a BatchNorm's effective bias beta - mean * gamma / sqrt(var + eps)


def find_bias_terms(index: GraphIndex, score: str, image_input: str) -> list[BiasTerm]:
    """Every 2-D Conv with a bias and every BatchNormalization on the path from the image to the
    score (pytorch-grad-cam's FullGrad: every Conv2d with a bias and every BatchNorm2d), in graph order."""
    on_path = active_tensors(index, score, [image_input])
    terms = []
    for node in index.nodes:
        output = node.output[0] if node.output else ""
        shape = index.shape(output)
        if output not in on_path or shape is None or len(shape) != 4:
            continue
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2]:
            bias = _constant(index, node, node.input[2], "bias")
        elif node.op_type == "BatchNormalization":
            gamma, beta, mean, var = (_constant(index, node, name, what) for name, what in
                                      zip(node.input[1:5], ("scale", "B", "input_mean", "input_var")))
            eps = np.float32(attribute(node, "epsilon", 1e-5))
            # torch's (and pytorch-grad-cam's) float32 order: -(mean * gamma / sqrt(var + eps)) + beta
            bias = -(mean * gamma / np.sqrt(var + eps)) + beta
        else:
            continue
        if np.any(bias != 0):  # psi(grad * 0) = 0 adds nothing (torch's bias-free Conv2d exports a zero bias)
            terms.append(BiasTerm(node.name, output, np.asarray(bias, dtype=np.float32)))
    return terms


def _constant(index: GraphIndex, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
    value = index.value(name)
    if value is None:
        raise ExportError(f"node {node.name!r} ({node.op_type}): FullGrad needs its {what} ({name!r}) to be a "
                          "constant; it is computed at run time. Export without --fullgrad.")
    return value.astype(np.float32)


def _value_info(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape) if shape is not None else None)


def build_contract_model(
    model: onnx.ModelProto,
    *,
    image_input: str,
    score: ScoreChoice,
    layers: dict[str, str],
    input_rule_sets: Sequence[RuleSet],
    vanilla: RuleSet,
    metadata: dict[str, str],
    keep_outputs: Sequence[str],
    fullgrad: bool = False,
) -> onnx.ModelProto:
    """Add the target input, the seed, the gradient subgraphs and the contract outputs.

    `layers` maps layer names (as the user gave them) to tensor names in `model`. Layers followed by
    global average pooling and a linear classifier also get CAM's class weights; `fullgrad` adds
    FullGrad's bias-gradient terms (and needs the vanilla input gradient). The metadata is completed
    with the lists of both.
    """
    index = GraphIndex(model)
    batch = (index.shape(image_input) or ["batch"])[0]
    num_classes = index.shape(score.tensor)[1]
    if not isinstance(num_classes, int):
        raise ExportError(f"the score tensor {score.tensor!r} needs a static number of classes")
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    top1 = "camrt_seed/top1"
    nodes.append(helper.make_node("ArgMax", [score.tensor], [top1], name="camrt_seed/argmax", axis=1, keepdims=0))
    is_top1 = "camrt_seed/is_top1"
    nodes.append(helper.make_node("Less", [contract.TARGET_INPUT, const("camrt_seed/zero", np.int64(0))],
                                  [is_top1], name="camrt_seed/less"))
    nodes.append(helper.make_node("Where", [is_top1, top1, contract.TARGET_INPUT],
                                  [contract.TARGET_INDEX_OUTPUT], name="camrt_seed/where"))
    seed = "camrt_seed/one_hot"
    score_type = index.dtypes.get(score.tensor, TensorProto.FLOAT)
    np_type = helper.tensor_dtype_to_np_dtype(score_type)
    nodes.append(helper.make_node(
        "OneHot",
        [contract.TARGET_INDEX_OUTPUT, const("camrt_seed/depth", np.int64(num_classes)),
         const("camrt_seed/values", np.array([0, 1], dtype=np_type))],
        [seed], name="camrt_seed/onehot", axis=-1,
    ))

    patches = ForwardPatches()
    outputs: list[onnx.ValueInfoProto] = [o for o in index.graph.output if o.name in keep_outputs]

    def expose(contract_name: str, tensor: str, like: str | None = None) -> None:
        """Output `tensor` as `contract_name`, typed like `like` (a gradient has its primal's type)."""
        like = like or tensor
        nodes.append(helper.make_node("Identity", [tensor], [contract_name], name=contract_name + "/identity"))
        outputs.append(_value_info(contract_name, index.dtypes.get(like, TensorProto.FLOAT), index.shape(like)))

    expose(contract.LOGITS_OUTPUT, score.tensor)
    outputs.append(_value_info(contract.TARGET_INDEX_OUTPUT, TensorProto.INT64, [batch]))
    for layer, tensor in layers.items():
        expose(contract.activation_output(layer), tensor)
    cam_layers = []
    for layer, tensor in layers.items():
        head = find_cam_head(index, tensor, score.tensor)
        if head is not None:
            nodes.extend(_cam_weight_nodes(head, contract.TARGET_INDEX_OUTPUT, contract.cam_weights_output(layer),
                                           const))
            outputs.append(_value_info(contract.cam_weights_output(layer), index.dtypes.get(tensor, TensorProto.FLOAT),
                                       [batch, index.shape(tensor)[1]]))
            cam_layers.append(layer)

    if fullgrad and not any(r.name == vanilla.name for r in input_rule_sets):
        raise ExportError("FullGrad needs the vanilla input gradient: add 'vanilla' to the rule sets")
    bias_terms = find_bias_terms(index, score.tensor, image_input) if fullgrad else []
    passes: list[tuple[RuleSet, list[str]]] = []
    vanilla_wrt = list(dict.fromkeys([*layers.values(), *(term.output for term in bias_terms)]))
    if any(r.name == vanilla.name for r in input_rule_sets):
        vanilla_wrt.append(image_input)
    if vanilla_wrt:
        passes.append((vanilla, vanilla_wrt))
    passes += [(r, [image_input]) for r in input_rule_sets if r.name != vanilla.name]
    for rule_set, wrt in passes:
        backward = differentiate(index, score.tensor, seed, wrt, rule_set, patches, prefix=f"camrt_bwd/{rule_set.name}")
        nodes += backward.nodes
        inits += backward.initializers
        if rule_set.name == vanilla.name:
            for layer, tensor in layers.items():
                expose(contract.gradient_output(layer), backward.gradients[tensor], like=tensor)
            for term in bias_terms:
                name = contract.bias_gradient_output(term.node)
                bias = const(name + "/bias", term.bias.reshape(1, -1, 1, 1))
                nodes.append(helper.make_node("Mul", [backward.gradients[term.output], bias], [name], name=name + "/mul"))
                outputs.append(_value_info(name, index.dtypes.get(term.output, TensorProto.FLOAT),
                                           index.shape(term.output)))
        if image_input in wrt and any(r.name == rule_set.name for r in input_rule_sets):
            expose(contract.input_gradient_output(rule_set.name), backward.gradients[image_input], like=image_input)

    graph = index.graph
    new_graph = helper.make_graph(
        [patches.apply(n) for n in graph.node] + nodes,
        graph.name or "camrt",
        [*graph.input, _value_info(contract.TARGET_INPUT, TensorProto.INT64, [batch])],
        outputs,
        initializer=[*graph.initializer, *inits],
        value_info=[v for v in graph.value_info],
    )
    result = helper.make_model(new_graph, opset_imports=list(model.opset_import), producer_name="camrt-exporters")
    result.ir_version = model.ir_version
    metadata = {**metadata, contract.META_CAM_LAYERS: json.dumps(cam_layers)}
    if fullgrad:
        metadata[contract.META_BIAS_TERMS] = json.dumps([term.node for term in bias_terms])
    for key, value in metadata.items():
        result.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(result)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the generated camrt graph is not valid ONNX: {exc}") from exc
    return result


def _cam_weight_nodes(head: CamHead, target: str, output: str, const) -> list[onnx.NodeProto]:
    """Gather the target's weight row [B, K] (times Gemm's alpha) from the classifier's weights."""
    gathered = output + "/gather"
    nodes = [helper.make_node("Gather", [head.weight, target], [gathered], name=gathered,
                              axis=0 if head.rows_are_classes else 1)]
    if not head.rows_are_classes:  # [K, B] -> [B, K]
        nodes.append(helper.make_node("Transpose", [gathered], [output + "/rows"], name=output + "/transpose", perm=[1, 0]))
        gathered = output + "/rows"
    if head.alpha != 1.0:
        alpha = const(output + "/alpha", np.float32(head.alpha))
        nodes.append(helper.make_node("Mul", [gathered, alpha], [output], name=output + "/alpha_mul"))
    else:
        nodes.append(helper.make_node("Identity", [gathered], [output], name=output + "/identity"))
    return nodes


def contract_metadata(
    *, layers: Sequence[str], default: str | None, preprocessing: contract.Preprocessing,
    rule_sets: Sequence[str], labels: Sequence[str] | None, source: dict, score: ScoreChoice,
    image_input: str, exporter_version: str,
) -> dict[str, str]:
    meta = {
        contract.META_CONTRACT_VERSION: str(contract.CONTRACT_VERSION),
        contract.META_SOURCE: json.dumps(source),
        contract.META_LAYERS: json.dumps(list(layers)),
        contract.META_PREPROCESSING: preprocessing.to_json(),
        contract.META_RULE_SETS: json.dumps(list(rule_sets)),
        contract.META_SCORE: json.dumps({"tensor": score.tensor, "output": score.output,
                                         "softmax": score.through_softmax}),
        contract.META_EXPORTER_VERSION: exporter_version,
        contract.META_INPUT: image_input,
    }
    if default is not None:
        meta[contract.META_DEFAULT_LAYER] = default
    if labels:
        meta[contract.META_LABELS] = json.dumps(list(labels))
    return meta
