"""A read-only index of an ONNX graph: producers, consumers, constants, static shapes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from camrt.errors import ExportError

#: A dimension is an int when static, a str (symbol) or None when not.
Dim = int | str | None
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)


def _dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _has_unknown_dims(model: onnx.ModelProto) -> bool:
    """Whether a float tensor's shape is missing or has a dimension ONNX shape inference left unknown
    (unnamed, or named `unk__N` by it)."""
    for vi in [*model.graph.value_info, *model.graph.output]:
        tensor = vi.type.tensor_type
        if tensor.elem_type not in FLOAT_TYPES:
            continue
        if not tensor.HasField("shape") or any(
                not d.HasField("dim_value") and not (d.dim_param and not d.dim_param.startswith("unk__"))
                for d in tensor.shape.dim):
            return True
    return False


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the shapes of its tensors. ONNX shape inference first; where it leaves a
    dimension unknown (e.g. a Pad whose pads are computed from Shape, as EfficientNet's "same"
    padding does), onnxruntime's symbolic shape inference, which evaluates such shape arithmetic."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ExportError(f"ONNX shape inference failed: {exc}") from exc
    if not _has_unknown_dims(inferred):
        return inferred
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        symbolic = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - it cannot handle every graph; ONNX's shapes then stand
        return inferred
    if symbolic is None:
        return inferred
    try:
        return onnx.shape_inference.infer_shapes(symbolic, data_prop=True)
    except Exception:  # noqa: BLE001 - keep ONNX's own result when the two disagree
        return inferred


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
            self.shapes[vi.name] = _dims(vi.type)
            self.dtypes[vi.name] = vi.type.tensor_type.elem_type
        self.constants: dict[str, np.ndarray] = {}
        for init in self.graph.initializer:
            self.constants[init.name] = numpy_helper.to_array(init)
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
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

    def value(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
