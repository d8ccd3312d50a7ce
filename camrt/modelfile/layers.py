"""Which tensors of an ONNX classifier can be explained as a layer, and which one is the default.

A candidate is a float tensor that depends on the image input and that the score depends on, whose
layout (nchw, nhwc or tokens) is established from the graph (camrt.modelfile.token_layout) and whose
grid has spatial extent. The default is the LayerNormalization feeding the last attention (ViT,
DeiT), else what the `choose_target_layer` hook picks from the candidates in graph order (built-in:
the last one). `camrt inspect` on a plain ONNX file (`onnx_layers`) and `camrt export` use the same
rules on the same prepared graph (camrt.modelfile.shapes). Needs `onnx` (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import contract

#: Static or symbolic dims as ONNX shape inference gives them (int, str symbol, or None).
Shape = tuple[Any, ...]


# --- op sets of the layout inference ---------------------------------------------------------
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


def guess_image_layout(shape: Shape) -> str | None:
    """NCHW or NHWC for a rank-4 image input by where its channels (1, 3 or 4) are; None when
    both or neither of dims 1 and 3 look like channels."""
    def looks_like_channels(dim: Any) -> bool:
        return isinstance(dim, int) and dim in (1, 3, 4)

    first, last = looks_like_channels(shape[1]), looks_like_channels(shape[3])
    if first != last:
        return contract.LAYOUT_NCHW if first else contract.LAYOUT_NHWC
    return None


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


def choose_default_layer(candidates: Sequence[str], framework: str) -> str | None:
    """The `choose_target_layer` hook's pick among `candidates` (None when there are none)."""
    from ..plugins import get_plugin_manager

    return get_plugin_manager().hook.choose_target_layer(candidates=list(candidates), framework=framework)


def dims(value_info: Any) -> Shape | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
