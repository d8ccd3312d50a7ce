"""Turn a forward ONNX classifier into a camrt contract file (forward + gradient subgraphs)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from camrt import contract
from camrt.errors import first_line
from camrt.modelfile.shapes import fold_graph

from .autodiff.graph import GraphIndex, attribute
from .autodiff.reverse import ForwardPatches, RuleSet, active_tensors, differentiate
from .errors import ExportError

MIN_OPSET = 16  # ScatterElements(reduction="add") used by the MaxPool rule


@dataclass
class ScoreChoice:
    tensor: str  # the differentiated [B, num_classes] tensor
    output: str  # the model output it belongs to
    activation: str | None = None  # "Softmax" or "Sigmoid" when `output` is activation(tensor)

    @property
    def through_softmax(self) -> bool:
        return self.activation == "Softmax"


#: Final activations whose input (the logits) is differentiated instead of their output.
_SCORE_ACTIVATIONS = ("Softmax", "Sigmoid")


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name every node uniquely, lift the opset to one the backward rules can emit, and fold the
    constant subgraphs (so backward rules see the weights as constants)."""
    model = fold_graph(_upgrade_opset(model))
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
    gone = next((n for n in model.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)), None)
    if gone is not None:
        raise ExportError(
            f"the model uses opset {opset}; camrt needs >= {MIN_OPSET}, and node {gone.name or gone.op_type!r} "
            f"({gone.op_type}) has no counterpart in current ONNX opsets to convert it to. Re-export the model "
            "with opset 17 or newer."
        )
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, 17)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise ExportError(
            f"the model uses opset {opset}; camrt needs >= {MIN_OPSET} and automatic conversion to opset 17 "
            f"failed ({first_line(exc)}). Re-export the model with opset 17 or newer."
        ) from exc
    if opset < 11:
        _keep_asymmetric_resize(converted)
    return converted


def _keep_asymmetric_resize(model: onnx.ModelProto) -> None:
    """Upsample and Resize before opset 11 map output to input coordinates as x_out / scale
    ("asymmetric"); onnx's version converter leaves the new Resize at its default half_pixel, which
    computes another function for linear interpolation. Say asymmetric explicitly."""
    for node in model.graph.node:
        if node.op_type == "Resize" and attribute(node, "mode", b"nearest") in (b"linear", "linear"):
            for attr in node.attribute:
                if attr.name == "coordinate_transformation_mode":
                    attr.s = b"asymmetric"
                    break
            else:
                node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))



def _behind_identities(index: GraphIndex, tensor: str) -> tuple[str, onnx.NodeProto | None]:
    producer = index.producer.get(tensor)
    while producer is not None and producer.op_type == "Identity":
        tensor = producer.input[0]
        producer = index.producer.get(tensor)
    return tensor, producer


def _score_of(index: GraphIndex, output: str, use_softmax_output: bool) -> ScoreChoice:
    """The logits behind `output`: the input of a final Softmax/Sigmoid (through Identity nodes)
    unless told otherwise."""
    tensor, producer = _behind_identities(index, output)
    if producer is not None and producer.op_type in _SCORE_ACTIVATIONS and not use_softmax_output:
        return ScoreChoice(producer.input[0], output, producer.op_type)
    return ScoreChoice(tensor, output)


def _looks_like_class_scores(index: GraphIndex, score: ScoreChoice) -> bool:
    shape = index.shape(score.tensor)
    return index.is_float(score.tensor) and shape is not None and len(shape) == 2


def choose_score(index: GraphIndex, output: str | None, use_softmax_output: bool = False,
                 log: Callable[[str], None] = lambda message: None, seeded: bool = False) -> ScoreChoice:
    """The score of model output `output`, or, when None, of the output that looks like class scores:
    the only [B, C] output, or the only one behind a Softmax/Sigmoid (differentiated before it).

    seeded: the file gets a seed entry (`--seed`), which differentiates a score tensor of any rank >= 2
    (segmentation logits [B, C, H, W], detection heads [B, 4 + C, N]); otherwise it must be [B, C]."""
    names = [o.name for o in index.graph.output]
    if output is not None and output not in names:
        raise ExportError(f"--score-output {output!r} is not an output of the model; its outputs are {names}")
    if output is None and len(names) > 1:
        plausible = [s for s in (_score_of(index, n, use_softmax_output) for n in names)
                     if _looks_like_class_scores(index, s)]
        behind = [s for s in plausible if _behind_identities(index, s.output)[1] is not None
                  and _behind_identities(index, s.output)[1].op_type in _SCORE_ACTIVATIONS]
        chosen = plausible if len(plausible) == 1 else behind
        if len(chosen) != 1:
            candidates = [s.output for s in (chosen or plausible)] or names
            raise ExportError(f"the model has {len(names)} outputs and camrt cannot tell which holds the class "
                              f"scores; name it with --score-output (candidates: {candidates})")
        log(f"explained output: {chosen[0].output} (the only [batch, classes] output"
            f"{' behind a Softmax/Sigmoid' if chosen is behind else ''}; choose another with --score-output)")
        output = chosen[0].output
    score = _score_of(index, output or names[0], use_softmax_output)
    rank = index.rank(score.tensor)
    if seeded and (rank is None or rank < 2):
        raise ExportError(f"the score tensor {score.tensor!r} (behind output {score.output!r}) has rank {rank}; "
                          "a seeded file explains a [batch, ...] tensor of rank >= 2")
    if not seeded and rank != 2:
        raise ExportError(
            f"the score tensor {score.tensor!r} (behind output {score.output!r}) has rank {rank}; without a seed "
            "camrt explains classifiers whose output is [batch, num_classes]. Export with --seed to explain "
            "any score tensor (segmentation logits, detection heads) through a seed."
        )
    return score


def copy_exported_batch(model: onnx.ModelProto, exported: GraphIndex, exported_batch: int,
                        log: Callable[[str], None]) -> int:
    """Rewrite each Reshape that hard-codes the batch size the graph was exported at (tf2onnx and
    torch exports at a fixed batch write shape constants like [1, -1, 16]) to copy the batch instead
    (shape[0] = 0). `model` is the graph with the dynamic batch, `exported` the source graph's index
    at its static batch (tensor names are kept by the preparation). A Reshape qualifies when its shape starts with that batch size and its input's axis 0
    is that size in `exported` and dynamic in `model` (so it is the batch, not, say, Swin's batch x 64
    windows): every sample is then one contiguous block, reshaped as the exported graph reshaped the
    sample it was made for. Modifies `model` in place; returns the number of Reshapes rewritten. A
    rewrite lets the batch reach further Reshapes, so the graph is scanned again until none is left;
    `require_batch_carried` judges what remains."""
    exported_sizes = {name: shape[0] for name, shape in exported.shapes.items() if shape}
    rewritten = 0
    while found := _copy_batch_once(model, exported_sizes, exported_batch, log):
        rewritten += found
    return rewritten


def _copy_batch_once(model: onnx.ModelProto, exported_sizes: Mapping[str, object], exported_batch: int,
                     log: Callable[[str], None]) -> int:
    index = GraphIndex(model)
    nodes = {node.name: node for node in model.graph.node}  # the index holds a shape-inferred copy
    rewritten = 0
    for node in index.nodes:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or attribute(node, "allowzero", 0):
            continue
        data_shape, target = index.shape(node.input[0]), index.value(node.input[1])
        if (not data_shape or isinstance(data_shape[0], int) or exported_sizes.get(node.input[0]) != exported_batch
                or target is None or target.ndim != 1 or target[0] != exported_batch):
            continue
        copied = target.copy()
        copied[0] = 0
        name = f"{node.name}/shape_copying_batch"
        model.graph.initializer.append(numpy_helper.from_array(copied, name))
        nodes[node.name].input[1] = name
        rewritten += 1
        log(f"Reshape {node.name!r} hard-coded the exported batch size ({target.tolist()}): it now copies the batch "
            f"({copied.tolist()})")
    return rewritten


def require_batch_carried(index: GraphIndex, image_input: str, score: str) -> None:
    """ExportError naming the node where the batch dimension of the image vanishes into fixed sizes
    on the way to the score (a Reshape whose shape constant hard-codes the exported batch size): the
    file would mix or drop the samples of a batch. The batch may move to another axis or become a
    factor of one (attention's [3, batch*64, heads, tokens, dim] in Swin): shapes alone cannot tell
    that from mixing, and a graph that then mismatches fails the export's validation run instead."""
    on_path = active_tensors(index, score, [image_input]) | {image_input}
    batch = index.shape(image_input)[0]

    def mentions_batch(shape) -> bool:
        return any(isinstance(d, str) and batch in d for d in shape or ())

    for node in index.nodes:
        if not any(i in on_path and mentions_batch(index.shape(i)) for i in node.input):
            continue
        for out in node.output:
            shape = index.shape(out)
            if out in on_path and shape and isinstance(shape[0], int) and not mentions_batch(shape):
                raise ExportError(
                    f"node {node.name!r} ({node.op_type}) turns the batch dimension into {shape[0]} "
                    f"(output {out!r}: {list(shape)}): the graph hard-codes the batch size it was exported with. "
                    "Re-export it with a dynamic batch (torch: dynamic_axes={'input': {0: 'batch'}}, and "
                    "reshape with -1 or x.size(0) for the batch)"
                )


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


def _is_global_average_pool(index: GraphIndex, node: onnx.NodeProto, layout: str = contract.LAYOUT_NCHW) -> bool:
    """GlobalAveragePool, ReduceMean over exactly H and W, or an AveragePool whose one window is the
    map (of an NCHW tensor; of an NHWC one: ReduceMean over axes 1 and 2)."""
    shape = index.shape(node.input[0])
    if shape is None or len(shape) != 4:
        return False
    spatial_axes = [1, 2] if layout == contract.LAYOUT_NHWC else [2, 3]
    if node.op_type == "ReduceMean":
        axes = index.value(node.input[1]) if len(node.input) > 1 and node.input[1] else attribute(node, "axes")
        return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == spatial_axes
    if layout != contract.LAYOUT_NCHW:
        return False
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type == "AveragePool":
        pads = attribute(node, "pads", [0, 0, 0, 0])
        return list(attribute(node, "kernel_shape", [])) == list(shape[2:]) and not any(pads)
    return False


def find_cam_head(index: GraphIndex, tensor: str, score: str, layout: str = contract.LAYOUT_NCHW) -> CamHead | None:
    """The classifier weights of CAM (Zhou et al. 2016) when `tensor` reaches `score` only through
    global average pooling -> [Flatten/Reshape/Squeeze] -> Gemm, or MatMul [-> Add], with a constant
    weight; None for any other head (and for token layers: their pooling is not over a map)."""
    if layout not in contract.LAYOUTS:
        return None
    channels = index.shape(tensor)[3 if layout == contract.LAYOUT_NHWC else 1] if index.shape(tensor) else None
    on_path = active_tensors(index, score, [tensor])

    def reader(name: str) -> onnx.NodeProto | None:
        return None if name == score else _single_consumer(index, name, on_path)

    node = reader(tensor)
    if node is None or not _is_global_average_pool(index, node, layout):
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
    if weight is None or weight.ndim != 2 or weight.shape[1 if head.rows_are_classes else 0] != channels:
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
    layer_layouts: Mapping[str, contract.LayerLayout] | None = None,
    attention: dict[str, str] | None = None,
    layer_scores: dict[str, str] | None = None,
    seeded: bool = False,
    compact: bool = False,
) -> onnx.ModelProto:
    """Add the target input, the seed, the gradient subgraphs and the contract outputs.

    `layers` maps layer names (as the user gave them) to tensor names in `model`. Layers followed by
    global average pooling and a linear classifier also get CAM's class weights; `fullgrad` adds
    FullGrad's bias-gradient terms (and needs the vanilla input gradient). The metadata is completed
    with the lists of both. layer_layouts: each layer's layout (absent: NCHW). `attention` maps
    attention-map names to tensors (Softmax outputs): each is exposed with its gradient
    (`camrt_exporters.attention`; the caller writes META_ATTENTION), and with what every other rule set
    propagates to it (`contract.attention_rule_gradient_output`); `layer_scores` maps some of
    them to a [B, classes] tensor s^l (LeGrad's layer score) whose target's gradient with respect
    to the map is exposed too. `seeded` names the backward pass's seed `contract.SEED_TENSOR` (the
    entry the runtime feeds any cotangent through) and records it in the metadata. `compact`: the
    gradient subgraphs share the forward's weights (see RuleContext).
    """
    index = GraphIndex(model)
    batch = (index.shape(image_input) or ["batch"])[0]
    num_classes = index.shape(score.tensor)[1]
    if not isinstance(num_classes, int):
        raise ExportError(f"the score tensor {score.tensor!r} needs a static number of classes (axis 1)")
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    seed = contract.SEED_TENSOR if seeded else "camrt_seed/one_hot"
    nodes += _target_seed_nodes(index, score.tensor, num_classes, seed, const)

    patches = ForwardPatches()
    preprocessing = (contract.Preprocessing.from_json(metadata[contract.META_PREPROCESSING])
                     if contract.META_PREPROCESSING in metadata else None)
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
    attention = attention or {}
    for name, tensor in attention.items():
        expose(contract.attention_output(name), tensor)
    cam_layers = []
    for layer, tensor in layers.items():
        layout = (layer_layouts or {}).get(layer, contract.LayerLayout()).layout
        head = find_cam_head(index, tensor, score.tensor, layout)
        if head is not None:
            nodes.extend(_cam_weight_nodes(head, contract.TARGET_INDEX_OUTPUT, contract.cam_weights_output(layer),
                                           const))
            outputs.append(_value_info(contract.cam_weights_output(layer), index.dtypes.get(tensor, TensorProto.FLOAT),
                                       [batch, index.shape(tensor)[3 if layout == contract.LAYOUT_NHWC else 1]]))
            cam_layers.append(layer)

    if fullgrad and not any(r.name == vanilla.name for r in input_rule_sets):
        raise ExportError("FullGrad needs the vanilla input gradient: add 'vanilla' to the rule sets")
    bias_terms = find_bias_terms(index, score.tensor, image_input) if fullgrad else []
    passes: list[tuple[RuleSet, list[str]]] = []
    vanilla_wrt = list(dict.fromkeys([*layers.values(), *(term.output for term in bias_terms), *attention.values()]))
    if any(r.name == vanilla.name for r in input_rule_sets):
        vanilla_wrt.append(image_input)
    if vanilla_wrt:
        passes.append((vanilla, vanilla_wrt))
    # the other rule sets also go to the attention maps: what each propagates there (an LRP rule set's relevance)
    passes += [(r, [image_input, *attention.values()]) for r in input_rule_sets if r.name != vanilla.name]
    for rule_set, wrt in passes:
        backward = differentiate(index, score.tensor, seed, wrt, rule_set, patches, prefix=f"camrt_bwd/{rule_set.name}",
                                 image_input=image_input, preprocessing=preprocessing, compact=compact,
                                 unreached_ok=() if rule_set.name == vanilla.name else attention.values())
        nodes += backward.nodes
        inits += backward.initializers
        if rule_set.name == vanilla.name:
            for layer, tensor in layers.items():
                expose(contract.gradient_output(layer), backward.gradients[tensor], like=tensor)
            for name, tensor in attention.items():
                expose(contract.attention_gradient_output(name), backward.gradients[tensor], like=tensor)
            for term in bias_terms:
                name = contract.bias_gradient_output(term.node)
                bias = const(name + "/bias", term.bias.reshape(1, -1, 1, 1))
                nodes.append(helper.make_node("Mul", [backward.gradients[term.output], bias], [name], name=name + "/mul"))
                outputs.append(_value_info(name, index.dtypes.get(term.output, TensorProto.FLOAT),
                                           index.shape(term.output)))
        else:
            for name, tensor in attention.items():
                output = contract.attention_rule_gradient_output(rule_set.name, name)
                if tensor in backward.gradients:
                    expose(output, backward.gradients[tensor], like=tensor)
                else:  # the rule set holds the map constant (CP-LRP): nothing reaches it
                    nodes.append(helper.make_node("Mul", [tensor, const(output + "/zero", _zero_like(index, tensor))],
                                                  [output], name=output + "/zeros"))
                    outputs.append(_value_info(output, index.dtypes.get(tensor, TensorProto.FLOAT), index.shape(tensor)))
        if image_input in wrt and any(r.name == rule_set.name for r in input_rule_sets):
            expose(contract.input_gradient_output(rule_set.name), backward.gradients[image_input], like=image_input)
    for i, (name, layer_score) in enumerate((layer_scores or {}).items()):
        tensor = attention[name]
        backward = differentiate(index, layer_score, seed, [tensor], vanilla, patches, prefix=f"camrt_bwd/layer_score_{i}")
        nodes += backward.nodes
        inits += backward.initializers
        expose(contract.attention_layer_gradient_output(name), backward.gradients[tensor], like=tensor)

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
    if seeded:
        metadata[contract.META_SEED] = json.dumps({"tensor": contract.SEED_TENSOR,
                                                   "shape": list(index.shape(score.tensor))})
    if fullgrad:
        metadata[contract.META_BIAS_TERMS] = json.dumps([term.node for term in bias_terms])
    for key, value in metadata.items():
        result.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(result)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the generated camrt graph is not valid ONNX: {exc}") from exc
    return result


def _zero_like(index: GraphIndex, tensor: str) -> np.ndarray:
    return np.zeros((), helper.tensor_dtype_to_np_dtype(index.dtypes.get(tensor, TensorProto.FLOAT)))


def _target_seed_nodes(index: GraphIndex, score: str, num_classes: int, seed: str, const) -> list[onnx.NodeProto]:
    """The target path: `camrt/target_index` (TOP1_TARGET resolved by ArgMax over the class axis 1)
    and `seed`, its one-hot shaped like the score. For scores of rank r > 2 the class axis is summed
    over the other axes before the ArgMax and the one-hot is broadcast over them, so that L is the
    class channel's sum (a segmentation class over the whole image)."""
    rank = index.rank(score)
    np_type = helper.tensor_dtype_to_np_dtype(index.dtypes.get(score, TensorProto.FLOAT))
    trailing = list(range(2, rank))
    nodes = []
    per_class = score
    if trailing:
        per_class = "camrt_seed/class_totals"
        nodes.append(helper.make_node("ReduceSum", [score, const("camrt_seed/trailing_axes", np.array(trailing))],
                                      [per_class], name="camrt_seed/class_totals", keepdims=0))
    top1 = "camrt_seed/top1"
    nodes.append(helper.make_node("ArgMax", [per_class], [top1], name="camrt_seed/argmax", axis=1, keepdims=0))
    is_top1 = "camrt_seed/is_top1"
    nodes.append(helper.make_node("Less", [contract.TARGET_INPUT, const("camrt_seed/zero", np.int64(0))],
                                  [is_top1], name="camrt_seed/less"))
    nodes.append(helper.make_node("Where", [is_top1, top1, contract.TARGET_INPUT],
                                  [contract.TARGET_INDEX_OUTPUT], name="camrt_seed/where"))
    one_hot = seed if not trailing else "camrt_seed/one_hot_rows"
    nodes.append(helper.make_node(
        "OneHot",
        [contract.TARGET_INDEX_OUTPUT, const("camrt_seed/depth", np.int64(num_classes)),
         const("camrt_seed/values", np.array([0, 1], dtype=np_type))],
        [one_hot], name="camrt_seed/onehot", axis=-1,
    ))
    if trailing:
        nodes += [
            helper.make_node("Unsqueeze", [one_hot, const("camrt_seed/unsqueeze_axes", np.array(trailing))],
                             ["camrt_seed/one_hot_unsqueezed"], name="camrt_seed/unsqueeze"),
            helper.make_node("Shape", [score], ["camrt_seed/score_shape"], name="camrt_seed/score_shape"),
            helper.make_node("Expand", ["camrt_seed/one_hot_unsqueezed", "camrt_seed/score_shape"], [seed],
                             name="camrt_seed/expand"),
        ]
    return nodes


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
    image_input: str, exporter_version: str, layer_layouts: Mapping[str, contract.LayerLayout] | None = None,
) -> dict[str, str]:
    meta = {
        contract.META_CONTRACT_VERSION: str(contract.CONTRACT_VERSION),
        contract.META_SOURCE: json.dumps(source),
        contract.META_LAYERS: json.dumps(list(layers)),
        contract.META_PREPROCESSING: preprocessing.to_json(),
        contract.META_RULE_SETS: json.dumps(list(rule_sets)),
        contract.META_SCORE: json.dumps({"tensor": score.tensor, "output": score.output,
                                         "softmax": score.through_softmax, "activation": score.activation}),
        contract.META_EXPORTER_VERSION: exporter_version,
        contract.META_INPUT: image_input,
    }
    if default is not None:
        meta[contract.META_DEFAULT_LAYER] = default
    if layer_layouts:
        meta[contract.META_LAYER_LAYOUTS] = json.dumps({layer: layout.to_dict() for layer, layout in layer_layouts.items()})
    if labels:
        meta[contract.META_LABELS] = json.dumps(list(labels))
    return meta
