"""A graph's constants and shapes as camrt reads them: the constant subgraphs folded (weights behind
Identity, Transpose or small subgraphs; sizes computed from Shape nodes at a pinned image size) and
every tensor's shape (ONNX shape inference, completed by measuring runs in onnxruntime).

The exporter prepares every source this way (camrt_exporters.contract_file.prepare) and `camrt
inspect` a plain ONNX file, so both infer the same layouts and default layer
(camrt.modelfile.token_layout). Needs onnx, numpy and onnxruntime (no torch); imported lazily.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError, first_line

#: A dimension is an int when static, a str (symbol) or None when not.
Dim = int | str | None
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)
def type_dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
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
        dims = type_dims(graph_input.type)
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
        raise ModelError(f"ONNX shape inference failed: {first_line(exc)}") from None
    unknown = _unknown_shapes(inferred)
    runs = [run_for(model, unknown, batch) for batch in _MEASURING_BATCHES] if unknown else []
    if not runs or any(run is None for run in runs):
        return inferred
    inputs = [type_dims(i.type) for i in model.graph.input]
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


#: Ops never folded: their value changes from run to run.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                               "Multinomial", "Bernoulli"})
#: Kept as deployed: folding the DequantizeLinear of quantized weights would store them as float32 and
#: stop onnxruntime fusing the QDQ pattern into integer kernels.
_QUANTIZED_AS_DEPLOYED = frozenset({"DequantizeLinear"})


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every node computed from constants alone by an initializer of the same name.

    Converters write weights as Constant nodes, behind Identity nodes (torch's legacy exporter
    deduplicates equal initializers that way) or behind small subgraphs (a Transpose or Reshape of
    a weight); backward rules need them as constants. An Identity of a constant is bypassed (its
    consumers read the constant itself, no copy); other nodes are evaluated once with onnxruntime.
    Tensors that depend on a graph input keep their names, so --layer names stay valid.
    """
    graph = model.graph
    constant = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output} | _read_in_subgraphs(graph)  # names that must stay
    alias: dict[str, str] = {}
    folded: list[onnx.NodeProto] = []
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        if node.op_type == "Constant" or not (_foldable_op(node) and all(i in constant for i in node.input if i)):
            kept.append(node)
            if node.op_type == "Constant":
                constant.update(node.output)
            continue
        constant.update(o for o in node.output if o)
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            folded.append(node)
    if not folded and not alias:
        return model
    read = {i for n in kept for i in n.input} | outputs
    wanted = [o for n in folded for o in n.output if o in read]
    values = _evaluate(model, folded, wanted) if wanted else {}
    graph_inputs = {g.name for g in graph.input}
    inits = [i for i in graph.initializer if i.name in read or i.name in graph_inputs]
    del graph.initializer[:]
    graph.initializer.extend([*inits, *(numpy_helper.from_array(v, name) for name, v in values.items())])
    del graph.node[:]
    graph.node.extend(kept)
    return model


def fold_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the tensors computed from constants and Shape nodes alone (padding or reshape sizes
    a converter computes from the input's size) whose values are the same at two batch sizes:
    the file is pinned to one image size, so only the batch can change them."""
    graph = model.graph
    derived = {i.name for i in graph.initializer}
    shape_nodes = []
    for node in graph.node:
        from_shapes = node.op_type in ("Shape", "Size", "Constant") or (
            _foldable_op(node) and node.input and all(i in derived for i in node.input if i))
        if from_shapes:
            derived.update(o for o in node.output if o)
            shape_nodes.append(node)
    folded = {id(n) for n in shape_nodes if n.op_type != "Constant"}
    computed = [o for n in shape_nodes if id(n) in folded for o in n.output if o]
    if not computed:
        return model
    small, large = run_for(model, computed, 2), run_for(model, computed, 3)
    if small is None or large is None:
        return model
    same = {name for name in computed
            if small[name].shape == large[name].shape and np.array_equal(small[name], large[name])}
    # Fold the batch-independent tensors that something batch-dependent reads: a sizes tensor
    # Concat(Shape(x)[:2], [H, W]) keeps its batch piece and gets its H, W piece as a constant.
    read = {i for n in graph.node if not all(o in same for o in n.output if o) for i in n.input}
    fixed = {name: small[name] for name in computed if name in same and name in read | {o.name for o in graph.output}}
    if not fixed:
        return model
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in fixed.items())
    _drop_dead(graph, [n for n in shape_nodes if id(n) in folded], now_constant=set(fixed))
    return model


def _drop_dead(graph: onnx.GraphProto, candidates: list[onnx.NodeProto], now_constant: set[str]) -> None:
    """Remove the `candidates` whose outputs are now initializers or are no longer read."""
    removable = {id(n) for n in candidates}
    needed = {o.name for o in graph.output} | _read_in_subgraphs(graph)
    kept = []
    for node in reversed(graph.node):
        dead = any(o in now_constant for o in node.output) or not any(o in needed for o in node.output)
        if id(node) not in removable or not dead:
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))


def _foldable_op(node: onnx.NodeProto) -> bool:
    """A standard op whose value depends on its inputs alone (no randomness, no subgraph)."""
    return (node.domain in ("", "ai.onnx") and node.op_type not in _NONDETERMINISTIC | _QUANTIZED_AS_DEPLOYED
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute))


def _read_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Names read by the nodes of control-flow subgraphs (If, Loop, Scan bodies), at any depth."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names.update(i for n in sub.node for i in n.input)
                names |= _read_in_subgraphs(sub)
    return names


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], wanted: list[str]) -> dict[str, np.ndarray]:
    """The values of `wanted`, computed by `nodes` from the model's constants (one onnxruntime run)."""
    graph = helper.make_graph(
        [n for n in model.graph.node if n.op_type == "Constant"] + nodes, "camrt_fold", [],
        [helper.make_empty_tensor_value_info(name) for name in wanted], initializer=list(model.graph.initializer),
    )
    folding = helper.make_model(graph, opset_imports=list(model.opset_import))
    folding.ir_version = model.ir_version
    try:
        return dict(zip(wanted, cpu_session(folding).run(wanted, {})))
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise ModelError(f"folding the constant subgraphs (nodes {[n.name or n.op_type for n in nodes][:5]}...) "
                          f"failed in onnxruntime: {first_line(exc)}") from None

def fold_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """`fold_constants`, then `fold_shape_arithmetic`."""
    return fold_shape_arithmetic(fold_constants(model))


def forget_inferred_shapes(model: onnx.ModelProto) -> None:
    """Drop the shapes the converter recorded for the sizes it exported with (e.g. batch 1 outputs);
    they are inferred again for the dynamic batch and the pinned size."""
    del model.graph.value_info[:]
    for output in model.graph.output:  # every dimension unknown (onnx's version converter needs a shape)
        for dim in output.type.tensor_type.shape.dim:
            dim.Clear()


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node (None for the sparse and string forms)."""
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


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The initializers and Constant node outputs of `graph`, by name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
    return values
