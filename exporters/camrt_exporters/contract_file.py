"""Turn a forward ONNX classifier into a camrt contract file (forward + gradient subgraphs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from camrt import contract
from camrt.layers import spatial_candidates
from camrt.errors import ExportError

from .autodiff.graph import GraphIndex
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


def layer_candidates(index: GraphIndex, image_input: str, score: str) -> list[str]:
    """Tensors with spatial extent on a path from the input to the score, in graph order
    (the rule lives in camrt.layers, shared with `camrt inspect`)."""
    return spatial_candidates(index.nodes, index.shape, active_tensors(index, score, [image_input]))


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
) -> onnx.ModelProto:
    """Add the target input, the seed, the gradient subgraphs and the contract outputs.

    `layers` maps layer names (as the user gave them) to tensor names in `model`.
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

    passes: list[tuple[RuleSet, list[str]]] = []
    vanilla_wrt = list(dict.fromkeys(layers.values()))
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
    for key, value in metadata.items():
        result.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(result)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the generated camrt graph is not valid ONNX: {exc}") from exc
    return result


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
