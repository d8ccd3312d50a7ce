"""Which tensors of an ONNX classifier can be explained as a layer, and which one is the default.

A candidate is a float tensor with spatial extent (rank 4, static H and W both > 1) that depends
on the image input and that the score depends on. The default is what the `choose_target_layer`
hook picks from the candidates in graph order (built-in: the last one). The exporter
(`camrt export`) and `camrt inspect` on a plain ONNX file both use these functions, so inspect
shows the layer an export would choose. Needs `onnx` only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: Static or symbolic dims as ONNX shape inference gives them (int, str symbol, or None).
Shape = tuple[Any, ...]


def has_spatial_extent(shape: Shape | None) -> bool:
    """Rank 4 (NCHW) with static H and W both greater than 1."""
    return (shape is not None and len(shape) == 4
            and all(isinstance(d, int) and d > 1 for d in shape[2:]))


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
                       on_path: set[str]) -> list[str]:
    """Node outputs in `on_path` with spatial extent, in graph order."""
    return [out for node in nodes for out in node.output
            if out in on_path and has_spatial_extent(shape_of(out))]


def choose_default_layer(candidates: Sequence[str], framework: str) -> str | None:
    """The `choose_target_layer` hook's pick among `candidates` (None when there are none)."""
    from .plugins import get_plugin_manager

    return get_plugin_manager().hook.choose_target_layer(candidates=list(candidates), framework=framework)


@dataclass
class OnnxLayers:
    """The layer candidates of a plain ONNX classifier (what `camrt inspect` shows for one)."""

    image_input: str
    input_shape: Shape
    output: str
    candidates: list[tuple[str, Shape]]
    default: str | None


def _dims(value_info: Any) -> Shape | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)


def onnx_layers(model: Any, path: str) -> OnnxLayers:
    """Candidates between the image input (the first rank-4 graph input) and the first output."""
    import onnx

    from .errors import ModelError

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    images = [i for i in inputs if (_dims(i) or ()) and len(_dims(i)) == 4]
    if not images:
        raise ModelError(f"{path}: no NCHW (rank 4) graph input; camrt explains image classifiers")
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
        return _dims(infos[name]) if name in infos else None

    def is_float(name: str) -> bool:
        return name in infos and infos[name].type.tensor_type.elem_type in floats

    image, output = images[0].name, graph.output[0].name
    nodes = list(graph.node)
    names = spatial_candidates(nodes, shape_of, tensors_between(nodes, [image], output, keep=is_float))
    return OnnxLayers(image, _dims(images[0]) or (), output, [(n, shape_of(n)) for n in names],
                      choose_default_layer(names, "onnx"))
