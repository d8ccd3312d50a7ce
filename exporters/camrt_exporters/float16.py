"""Float16 models: the float32 twin that the export self-check differentiates by finite differences.

Central differences in float16 resolve nothing (a 1e-2 step moves the score by about its round-off),
so a float16 file's gradients are checked against finite differences of its float32 twin: the same
graph with every float16 tensor, constant and cast made float32. The two differ by the float16
rounding of the forward pass, which FLOAT16_FD_REL (validate.py) allows for.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT16 = onnx.TensorProto.FLOAT16


def _widen_tensor(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == FLOAT16:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))


def _widen_graph(graph: onnx.GraphProto) -> None:
    for tensor in graph.initializer:
        _widen_tensor(tensor)
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == FLOAT16:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _widen_tensor(attr.t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                _widen_graph(attr.g)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT16:
                attr.i = onnx.TensorProto.FLOAT


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float32 wherever it computes in float16."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    _widen_graph(twin.graph)
    return twin
