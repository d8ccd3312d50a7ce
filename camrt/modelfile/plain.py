"""The layer candidates of a plain ONNX classifier, their layouts and the default layer: what
`camrt inspect` shows for a file that is not yet a camrt file, by the rules `camrt export` applies
(camrt.modelfile.layers, camrt.modelfile.token_layout) on the graph prepared as it prepares it
(camrt.modelfile.shapes). Needs `onnx` (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import contract
from .layers import Shape, dims, guess_image_layout, tensors_between
from .token_layout import default_layer, infer_layer_layouts, layout_candidates


@dataclass
class OnnxLayers:
    """The layer candidates of a plain ONNX classifier (what `camrt inspect` shows for one)."""

    image_input: str
    input_shape: Shape
    #: contract.LAYOUT_NCHW / LAYOUT_NHWC as guessed from the input's shape; None when ambiguous.
    image_layout: str | None
    output: str
    #: (tensor, shape, layout) in graph order
    candidates: list[tuple[str, Shape, contract.LayerLayout]]
    default: str | None
    #: why the default was chosen
    reason: str | None = None


def onnx_layers(model: Any, path: str) -> OnnxLayers:
    """Candidates between the image input (the first rank-4 graph input) and the first output,
    with their layouts and the default: the graph prepared and read as `camrt export` does
    (camrt.modelfile.shapes, camrt.modelfile.token_layout), at the batch made dynamic."""
    import onnx

    from ..errors import ModelError
    from .shapes import constant_values, fold_graph, forget_inferred_shapes, infer_shapes

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    images = [i for i in inputs if (dims(i) or ()) and len(dims(i)) == 4]
    if not images:
        raise ModelError(f"{path}: no rank-4 (NCHW or NHWC) graph input; camrt explains image classifiers")
    if not model.graph.output:
        raise ModelError(f"{path}: the graph has no outputs")
    image, output, input_shape = images[0].name, model.graph.output[0].name, dims(images[0])
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    batch = next(i for i in prepared.graph.input if i.name == image).type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_param = "batch"  # as `camrt export` pins it: reshapes then show which axis is the batch
    forget_inferred_shapes(prepared)
    graph = infer_shapes(fold_graph(prepared)).graph
    infos = {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    constants = constant_values(graph)

    def shape_of(name: str) -> Shape | None:
        if name in constants:  # weights: shape inference lists no value_info for them
            return tuple(constants[name].shape)
        return dims(infos[name]) if name in infos else None

    def is_float(name: str) -> bool:
        return name in infos and infos[name].type.tensor_type.elem_type in floats

    nodes = list(graph.node)
    layout = guess_image_layout(input_shape)
    quantized = {n.output[0] for n in nodes if n.op_type == "QuantizeLinear"}  # QDQ models: straight-through
    on_path = tensors_between(nodes, [image], output, keep=lambda name: is_float(name) or name in quantized)
    layouts = infer_layer_layouts(nodes, shape_of, image, layout, constants.get)
    names = layout_candidates(nodes, shape_of, {name for name in on_path if is_float(name)}, layouts)
    choice = default_layer(nodes, lambda name: name in constants, names, layouts)
    return OnnxLayers(image, input_shape or (), layout, output, [(n, shape_of(n), layouts[n]) for n in names],
                      choice.tensor if choice else None, choice.reason if choice else None)
