"""A read-only index of an ONNX graph: producers, consumers, constants, static shapes."""

from __future__ import annotations

import numpy as np
import onnx

from camrt.modelfile.shapes import FLOAT_TYPES, Dim, constant_values, infer_shapes, type_dims

from ..errors import ExportError

#: [qmin, qmax] of the integer types QuantizeLinear produces.
_QUANTIZED_RANGES = {
    onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15),
}


def quantized_range(elem_type: int, node: onnx.NodeProto) -> tuple[int, int]:
    """[qmin, qmax] of a QuantizeLinear output of type `elem_type` (ExportError for float8 and others)."""
    if elem_type not in _QUANTIZED_RANGES:
        kind = onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "of unknown type"
        raise ExportError(f"node {node.name!r} ({node.op_type}): its output is {kind}; camrt differentiates "
                          "integer quantization (int8, uint8, int16, uint16, int4, uint4) only")
    return _QUANTIZED_RANGES[elem_type]


class GraphIndex:
    """Index of `model.graph` after ONNX shape inference. The model is not modified."""

    def __init__(self, model: onnx.ModelProto):
        inferred = infer_shapes(model)
        self.graph = inferred.graph
        self.opset = next(
            (o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), 0
        )
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.shapes: dict[str, tuple[Dim, ...] | None] = {}
        self.dtypes: dict[str, int] = {}
        for vi in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            self.shapes[vi.name] = type_dims(vi.type)
            self.dtypes[vi.name] = vi.type.tensor_type.elem_type
        self.constants: dict[str, np.ndarray] = constant_values(self.graph)
        for node in self.nodes:
            if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
                value = _dequantized(node, self.constants)
                if value is not None:
                    self.constants[node.output[0]] = value
        for name, value in self.constants.items():
            self.shapes[name] = tuple(value.shape)
            self.dtypes.setdefault(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
        for node in self.nodes:
            if (node.op_type in ("MaxPool", "AveragePool") and attribute(node, "ceil_mode", 0)
                    and self.consumers.get(node.output[0])):
                self._check_ceil_mode_pool(node)

    def _check_ceil_mode_pool(self, node: onnx.NodeProto) -> None:
        """Refuse a ceil_mode pool whose last window starts in the right padding and whose output
        is consumed: ONNX shape inference counts that window, onnxruntime (like torch) drops it, so
        every static shape downstream would be wrong (the pool rules compute their own sizes)."""
        in_shape, out_shape = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if in_shape is None or out_shape is None:
            return
        n = len(in_shape) - 2
        kernel = list(attribute(node, "kernel_shape"))
        strides = list(attribute(node, "strides", [1] * n))
        dilations = list(attribute(node, "dilations", [1] * n))
        pads = list(attribute(node, "pads", [0] * (2 * n)))
        for axis in range(n):
            size, inferred = in_shape[2 + axis], out_shape[2 + axis]
            if not (isinstance(size, int) and isinstance(inferred, int)):
                continue
            span = size + pads[axis] + pads[n + axis] - dilations[axis] * (kernel[axis] - 1) - 1
            out = -(-span // strides[axis]) + 1
            if (out - 1) * strides[axis] >= size + pads[axis]:
                out -= 1
            if out != inferred:
                raise ExportError(
                    f"node {node.name!r} ({node.op_type}, ceil_mode): its last window starts in the padding, so "
                    f"ONNX shape inference says {inferred} outputs along axis {2 + axis} where onnxruntime "
                    f"computes {out}; export the model without ceil_mode for this pool."
                )

    def shape(self, name: str) -> tuple[Dim, ...] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def is_float(self, name: str) -> bool:
        return self.dtypes.get(name) in FLOAT_TYPES

    def is_differentiable(self, name: str) -> bool:
        """Float, or the integer output of a QuantizeLinear: the straight-through estimator carries
        a gradient through quantized activations (rules/quantize.py)."""
        producer = self.producer.get(name)
        return self.is_float(name) or (producer is not None and producer.op_type == "QuantizeLinear"
                                       and producer.domain in ("", "ai.onnx"))

    def value(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)


def _dequantized(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """The float value of a DequantizeLinear of constants (quantized weights), None otherwise: backward
    rules read it as they read float weights (e.g. a Conv's flipped kernel) while the forward graph keeps
    the integer weights and its DequantizeLinear node, which onnxruntime fuses into integer kernels."""
    values = [constants.get(name) if name else None for name in node.input]
    if values[0] is None or values[1] is None or (len(values) > 2 and node.input[2] and values[2] is None):
        return None
    if attribute(node, "block_size", 0) or values[0].dtype.kind not in "iu":
        return None
    quantized, scale = values[0], values[1]
    zero_point = values[2] if len(values) > 2 and values[2] is not None else np.zeros((), quantized.dtype)
    if scale.size > 1:
        axis = attribute(node, "axis", 1) % quantized.ndim
        layout = [-1 if a == axis else 1 for a in range(quantized.ndim)]
        scale, zero_point = scale.reshape(layout), zero_point.reshape(layout)
    shifted = quantized.astype(np.int64) - zero_point.astype(np.int64)
    return (shifted * scale.astype(np.float32)).astype(scale.dtype)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
