"""Layouts of an ONNX source: its image input (NCHW, or NHWC as Keras/tf2onnx files have it) and
the layers it may explain (established NCHW only; the rule is camrt.modelfile.layers.tensor_layouts).

camrt's runtime hands every method NCHW batches; an NHWC file records `layout: nhwc` in its
preprocessing metadata and the runtime transposes at the model's input (camrt.execution.session).
"""

from __future__ import annotations

from collections.abc import Sequence

from camrt import contract
from camrt.modelfile.layers import Shape, guess_image_layout, layer_layout_problem, tensor_layouts

from .autodiff.graph import GraphIndex
from .errors import ExportError


def image_layout(name: str, shape: Shape, given: str | None = None) -> str:
    """`given` (--input-layout) when set, else the layout the shape shows; ExportError when ambiguous."""
    if given is not None:
        if given not in contract.LAYOUTS:
            raise ExportError(f"--input-layout {given!r}: choose {' or '.join(contract.LAYOUTS)}")
        return given
    layout = guess_image_layout(shape)
    if layout is None:
        raise ExportError(f"image input {name!r} has shape {list(shape)}: cannot tell NCHW from NHWC "
                          "(channels are 1, 3 or 4 in dim 1 or dim 3); give --input-layout nchw or nhwc")
    return layout


def refuse_non_nchw_layers(index: GraphIndex, layers: Sequence[str], image_input: str, layout: str,
                           candidates: Sequence[str]) -> None:
    """ExportError for the first of `layers` not established NCHW, naming the nearest candidate."""
    layouts = tensor_layouts(index.nodes, image_input, layout)
    for layer in layers:
        problem = layer_layout_problem(layer, layouts, index.nodes, candidates)
        if problem:
            raise ExportError(f"--layer {problem}")
