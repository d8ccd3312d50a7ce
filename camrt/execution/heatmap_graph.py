"""Heatmaps computed inside the onnxruntime session (opt-in: ``Explainer(..., device_postprocess=True)``).

The default path fetches a layer's activations and gradients and makes the heatmaps on the host
(the method's numpy code, then `camrt.postprocess`). On a GPU that costs a copy of both tensors to
the host and CPU work that exceeds the graph itself. This module appends the same computation to
the pruned graph as ONNX nodes, so that the session returns only the final heatmaps:

    channel weights (the method's ``weights_graph``: Grad-CAM's spatial mean of the gradients)
    -> sum_k w_k A^k -> ReLU -> min-max at the layer's resolution
    -> Resize (linear, half_pixel: the pixel-centre bilinear of cv2.INTER_LINEAR) to the heatmap size
    -> mean over layers -> min-max                                      (`camrt.postprocess.finalize`)

The heatmap size is a graph input (``camrt/heatmap_size``, int64 [2]: H, W), so one session serves
every image size. The nodes use only standard ONNX ops, so any execution provider runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .. import contract
from ..postprocess import EPS

HEATMAP_OUTPUT = "camrt/heatmap"
SIZE_INPUT = "camrt/heatmap_size"

#: ReduceMean/ReduceMax/ReduceMin take `axes` as an input from opset 18 (an attribute before);
#: ReduceSum from opset 13.
_AXES_AS_INPUT = {"ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18}


class GraphBuilder:
    """Appends nodes with unique names under ``camrt/post/``; handles the opset's Reduce* forms."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"camrt/post/{hint}_{self._count}"

    def const(self, values, dtype=np.int64) -> str:
        from onnx import numpy_helper

        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        if self.opset >= _AXES_AS_INPUT[op_type]:
            return self.op(op_type, [x, self.const(list(axes))], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def minmax(self, x: str) -> str:
        """(x - min) / (max - min + eps) over the last two axes of [B, 1, h, w] (`postprocess.normalize`)."""
        low = self.reduce("ReduceMin", x, [2, 3])
        high = self.reduce("ReduceMax", x, [2, 3])
        span = self.op("Add", [self.op("Sub", [high, low]), self.const(EPS, np.float32)])
        return self.op("Div", [self.op("Sub", [x, low]), span])


#: A method's ONNX channel weights: (builder, activation name, gradient name) -> weights [B, K, 1, 1].
WeightsGraph = Callable[[GraphBuilder, str, str], str]


def heatmap_model(model, layers: Sequence[str], weights_graph: WeightsGraph, apply_relu: bool = True):
    """`model` (a pruned contract graph that outputs the layers' activations and gradients) with
    the heatmap computation appended; outputs: ``camrt/heatmap`` [B, H, W] float32,
    ``camrt/logits`` and ``camrt/target_index``."""
    from onnx import TensorProto, helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g = GraphBuilder(opset)
    size = helper.make_tensor_value_info(SIZE_INPUT, TensorProto.INT64, [2])
    per_layer = []
    for layer in layers:
        acts, grads = contract.activation_output(layer), contract.gradient_output(layer)
        weights = weights_graph(g, acts, grads)
        cam = g.reduce("ReduceSum", g.op("Mul", [weights, acts]), [1])  # [B, 1, h, w]
        if apply_relu:
            cam = g.op("Relu", [cam])
        cam = g.minmax(cam)
        batch_channels = g.op("Slice", [g.op("Shape", [cam]), g.const([0]), g.const([2])])
        sizes = g.op("Concat", [batch_channels, SIZE_INPUT], axis=0)
        per_layer.append(g.op("Resize", [cam, "", "", sizes], mode="linear",
                              coordinate_transformation_mode="half_pixel"))
    fused = per_layer[0] if len(per_layer) == 1 else g.op("Mean", per_layer)
    heatmap = g.minmax(fused)
    g.nodes.append(helper.make_node("Squeeze", [heatmap, g.const([1])], [HEATMAP_OUTPUT], name=HEATMAP_OUTPUT))

    graph = model.graph
    keep = [o for o in graph.output if o.name in (contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT)]
    out = helper.make_tensor_value_info(HEATMAP_OUTPUT, TensorProto.FLOAT, ["batch", "height", "width"])
    extended = helper.make_graph(
        [*graph.node, *g.nodes], graph.name, [*graph.input, size], [out, *keep],
        initializer=[*graph.initializer, *g.initializers], value_info=list(graph.value_info),
    )
    result = helper.make_model(extended, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result
