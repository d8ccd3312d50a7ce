"""A read-only index of an ONNX graph: producers, consumers, constants, static shapes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError

#: A dimension is an int when static, a str (symbol) or None when not.
Dim = int | str | None
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)
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


#: The two batch sizes of the runs that measure the shapes ONNX shape inference leaves unknown:
#: a dimension that differs between them depends on the batch.
_MEASURING_BATCHES = (2, 3)


def _is_unknown(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """Unnamed, or named `unk__N` by ONNX shape inference for a value it could not derive."""
    return not dim.HasField("dim_value") and not (dim.dim_param and not dim.dim_param.startswith("unk__"))


def _unknown_shapes(model: onnx.ModelProto) -> list[str]:
    """Float node outputs whose shape is missing or has an unknown dimension."""
    typed = {vi.name: vi.type.tensor_type for vi in [*model.graph.value_info, *model.graph.output]}
    unknown = []
    for node in model.graph.node:
        for out in node.output:
            tensor = typed.get(out)
            if node.op_type == "Constant" or not out or (tensor is not None and tensor.elem_type not in FLOAT_TYPES):
                continue
            if tensor is None or not tensor.HasField("shape") or any(_is_unknown(d) for d in tensor.shape.dim):
                unknown.append(out)
    return unknown


def zero_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray] | None:
    """Zeros for every graph input, `batch` for an open first dimension; None when an input has
    another open dimension (the model then cannot run at one pinned size)."""
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        dims = _dims(graph_input.type)
        if dims is None or any(not (isinstance(d, int) and d > 0) for d in dims[1:]):
            return None
        shape = [d if isinstance(d, int) and d > 0 else batch for d in dims]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        feeds[graph_input.name] = np.zeros(shape, dtype=dtype)
    return feeds


def cpu_session(model: onnx.ModelProto):
    """An onnxruntime CPU session of `model` that logs nothing (onnxruntime warns about graphs the
    exporter builds and throws away); its failures are onnxruntime's own exception types."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_for(model: onnx.ModelProto, names: list[str], batch: int) -> dict[str, np.ndarray] | None:
    """Tensors `names` of `model` in one onnxruntime run on zero inputs (see `zero_feeds`);
    None when the model cannot run that way."""
    feeds = zero_feeds(model, batch)
    if feeds is None:
        return None
    running = onnx.ModelProto()
    running.CopyFrom(model)
    del running.graph.output[:]
    running.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    try:
        return dict(zip(names, cpu_session(running).run(names, feeds)))
    except Exception:  # noqa: BLE001 - onnxruntime's own types; the caller keeps what it knew
        return None


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the shapes of its tensors: ONNX shape inference, and where it leaves a dimension
    unknown (e.g. a Pad whose pads are computed from Shape, as EfficientNet's "same" padding is),
    the shape measured in onnxruntime runs at the model's static size and two batch sizes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ExportError(f"ONNX shape inference failed: {exc}") from exc
    unknown = _unknown_shapes(inferred)
    runs = [run_for(model, unknown, batch) for batch in _MEASURING_BATCHES] if unknown else []
    if not runs or any(run is None for run in runs):
        return inferred
    inputs = [_dims(i.type) for i in model.graph.input]
    batch = next((dims[0] for dims in inputs if dims and isinstance(dims[0], str)), "batch")
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    measured = {name: [_batch_dim(sizes, batch) for sizes in zip(*(run[name].shape for run in runs))]
                for name in unknown if len({run[name].ndim for run in runs}) == 1}
    kept = [vi for vi in inferred.graph.value_info if vi.name not in measured]
    del inferred.graph.value_info[:]
    inferred.graph.value_info.extend(kept)
    for name, dims in measured.items():
        inferred.graph.value_info.append(
            onnx.helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, dims))
    for output in inferred.graph.output:
        if output.name in measured:
            output.CopyFrom(next(vi for vi in inferred.graph.value_info if vi.name == output.name))
    return inferred


def _batch_dim(sizes: tuple[int, ...], batch: str) -> Dim:
    """A dimension measured at the batch sizes _MEASURING_BATCHES: static when equal in both runs,
    `batch` or `batch*k` when proportional to the batch, unknown (None) otherwise."""
    if len(set(sizes)) == 1:
        return sizes[0]
    factors = {size / run_batch for size, run_batch in zip(sizes, _MEASURING_BATCHES)}
    if len(factors) == 1 and (factor := factors.pop()).is_integer():
        return batch if factor == 1 else f"{batch}*{int(factor)}"
    return None


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
