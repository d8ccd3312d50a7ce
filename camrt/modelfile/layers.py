"""Which tensors of an ONNX classifier can be explained as a layer, and which one is the default.

A candidate is a float tensor with spatial extent (rank 4, static H and W both > 1), established
NCHW (`tensor_layouts`: channels-last files, e.g. from tf2onnx, hold NHWC tensors too), that
depends on the image input and that the score depends on. The default is what the `choose_target_layer`
hook picks from the candidates in graph order (built-in: the last one). `camrt inspect` on a plain
ONNX file uses these functions; `camrt export` also infers channels-last and token layouts
(camrt_exporters.token_layout), so its default may be a layer inspect does not list. Needs `onnx`
only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import contract

#: Static or symbolic dims as ONNX shape inference gives them (int, str symbol, or None).
Shape = tuple[Any, ...]


def has_spatial_extent(shape: Shape | None) -> bool:
    """Rank 4 (NCHW) with static H and W both greater than 1."""
    return (shape is not None and len(shape) == 4
            and all(isinstance(d, int) and d > 1 for d in shape[2:]))


# --- which rank-4 tensors are NCHW ------------------------------------------------------------
#: Ops whose rank-4 output ONNX defines as [N, C, H, W].
NCHW_OUTPUT_OPS = frozenset({
    "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "LRN", "MaxPool", "AveragePool",
    "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "DepthToSpace", "SpaceToDepth", "MaxUnpool",
})
#: Ops applied per element (with broadcasting): the output's axes are those of its full-shape inputs.
ELEMENTWISE_OPS = frozenset({
    "Identity", "Dropout", "Cast", "Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Clip", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Mish", "Softplus", "Softsign", "Gelu", "Erf",
    "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
    "QuantizeLinear", "DequantizeLinear",  # QDQ models: per-tensor or per-channel scales keep the axes
})
#: Ops whose output has the layout of their rank-4 inputs (element-wise, or indexing every axis alike).
_LAYOUT_KEEPING_OPS = ELEMENTWISE_OPS | {
    "Concat", "Pad", "Slice", "Split", "Resize", "Upsample", "LayerNormalization", "Softmax", "LogSoftmax",
}
_TRANSPOSES = {(tuple(contract.NCHW_TO_NHWC), contract.LAYOUT_NCHW): contract.LAYOUT_NHWC,
               (tuple(contract.NHWC_TO_NCHW), contract.LAYOUT_NHWC): contract.LAYOUT_NCHW}


def guess_image_layout(shape: Shape) -> str | None:
    """NCHW or NHWC for a rank-4 image input by where its channels (1, 3 or 4) are; None when
    both or neither of dims 1 and 3 look like channels."""
    def looks_like_channels(dim: Any) -> bool:
        return isinstance(dim, int) and dim in (1, 3, 4)

    first, last = looks_like_channels(shape[1]), looks_like_channels(shape[3])
    if first != last:
        return contract.LAYOUT_NCHW if first else contract.LAYOUT_NHWC
    return None


def tensor_layouts(nodes: Sequence[Any], image_input: str, image_layout: str | None) -> dict[str, str]:
    """The layout (contract.LAYOUT_NCHW / LAYOUT_NHWC) of every tensor it can be established for,
    propagated forward from the image input and from the ops whose layout ONNX defines.

    Conv, pools, BatchNormalization... write NCHW; element-wise and layout-keeping ops pass on the
    one layout their inputs agree on; a MatMul by weights keeps NHWC; a Transpose by NCHW_TO_NHWC /
    NHWC_TO_NCHW converts; any other op (Reshape, other permutations) leaves its outputs
    unestablished. `nodes` in topological order."""
    layouts = {image_input: image_layout} if image_layout else {}
    for node in nodes:
        if node.op_type in NCHW_OUTPUT_OPS:
            layout = contract.LAYOUT_NCHW
        elif node.op_type == "Transpose" and node.input[0] in layouts:
            perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"), ())
            layout = layouts[node.input[0]] if perm == (0, 1, 2, 3) else _TRANSPOSES.get((perm, layouts[node.input[0]]))
        elif node.op_type == "MatMul" and node.input[1] not in layouts:
            # a per-pixel linear layer over the last axis (ConvNeXt's blocks) keeps NHWC; on NCHW it mixes W
            layout = contract.LAYOUT_NHWC if layouts.get(node.input[0]) == contract.LAYOUT_NHWC else None
        elif node.op_type in _LAYOUT_KEEPING_OPS:
            found = {layouts[i] for i in node.input if i in layouts}
            layout = found.pop() if len(found) == 1 else None
        else:
            layout = None
        if layout is not None:
            layouts.update((out, layout) for out in node.output if out)
    return layouts


def nearest_nchw_layer(tensor: str, nodes: Sequence[Any], candidates: Sequence[str]) -> str | None:
    """The candidate (NCHW layer) nearest to `tensor` in graph order (the latest one before it on a tie)."""
    order = {out: position for position, node in enumerate(nodes) for out in node.output}
    here = order.get(tensor, 0)
    return min(candidates, key=lambda name: (abs(order[name] - here), order[name] > here), default=None)


def tensors_between(nodes: Sequence[Any], sources: Iterable[str], target: str,
                    keep: Callable[[str], bool] = lambda name: True) -> set[str]:
    """Tensors that depend on a `sources` tensor (through `keep` tensors) and that `target` depends on.

    `nodes` are ONNX NodeProtos in topological order (as a valid graph lists them).
    """
    depends = set(sources)
    for node in nodes:
        if any(i in depends for i in node.input if i):
            depends.update(o for o in node.output if o and keep(o))
    needed = {target}
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            needed.update(i for i in node.input if i)
    return depends & needed


def spatial_candidates(nodes: Sequence[Any], shape_of: Callable[[str], Shape | None],
                       on_path: set[str], layouts: dict[str, str]) -> list[str]:
    """Node outputs in `on_path`, established NCHW (`tensor_layouts`) with spatial extent, in graph order."""
    return [out for node in nodes for out in node.output
            if out in on_path and layouts.get(out) == contract.LAYOUT_NCHW and has_spatial_extent(shape_of(out))]


def choose_default_layer(candidates: Sequence[str], framework: str) -> str | None:
    """The `choose_target_layer` hook's pick among `candidates` (None when there are none)."""
    from ..plugins import get_plugin_manager

    return get_plugin_manager().hook.choose_target_layer(candidates=list(candidates), framework=framework)


@dataclass
class OnnxLayers:
    """The layer candidates of a plain ONNX classifier (what `camrt inspect` shows for one)."""

    image_input: str
    input_shape: Shape
    #: contract.LAYOUT_NCHW / LAYOUT_NHWC as guessed from the input's shape; None when ambiguous.
    image_layout: str | None
    output: str
    candidates: list[tuple[str, Shape]]
    default: str | None


def dims(value_info: Any) -> Shape | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)


def onnx_layers(model: Any, path: str) -> OnnxLayers:
    """Candidates between the image input (the first rank-4 graph input) and the first output."""
    import onnx

    from ..errors import ModelError

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    images = [i for i in inputs if (dims(i) or ()) and len(dims(i)) == 4]
    if not images:
        raise ModelError(f"{path}: no rank-4 (NCHW or NHWC) graph input; camrt explains image classifiers")
    if not model.graph.output:
        raise ModelError(f"{path}: the graph has no outputs")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ModelError(f"{path}: ONNX shape inference failed: {str(exc).strip().splitlines()[0]}") from None
    graph = inferred.graph
    infos = {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

    def shape_of(name: str) -> Shape | None:
        return dims(infos[name]) if name in infos else None

    def is_float(name: str) -> bool:
        return name in infos and infos[name].type.tensor_type.elem_type in floats

    image, output = images[0].name, graph.output[0].name
    nodes = list(graph.node)
    layout = guess_image_layout(dims(images[0]))
    quantized = {n.output[0] for n in nodes if n.op_type == "QuantizeLinear"}  # QDQ models: straight-through
    on_path = tensors_between(nodes, [image], output, keep=lambda name: is_float(name) or name in quantized)
    names = spatial_candidates(nodes, shape_of, {name for name in on_path if is_float(name)},
                               tensor_layouts(nodes, image, layout))
    return OnnxLayers(image, dims(images[0]) or (), layout, output, [(n, shape_of(n)) for n in names],
                      choose_default_layer(names, "onnx"))
