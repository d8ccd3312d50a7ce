"""Graphs cut from a camrt file: the subgraph that computes a set of outputs, and the tail of a
layer (from its activations to the logits, for methods that edit activations)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import contract
from ..errors import ModelError


@dataclass(frozen=True)
class TailPlan:
    """The tail of one layer: its session, the layer tensor it is fed, and its side inputs."""

    layer: str
    tensor: str
    side: tuple[str, ...]
    session: Any
    side_session: Any = None


def tail_graphs(model, tensor: str, logits: str, path: str, layer: str):
    """(tail model, side model or None, side tensor names) for the forward path tensor -> logits."""
    from onnx import TensorProto, helper

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    # Constant tensors: initializers and whatever is computed from them alone (Constant nodes, ...).
    const = set(initializers)
    for node in graph.node:
        if all((not i) or i in const for i in node.input):
            const.update(node.output)
    # Tensors that depend on the layer's tensor.
    dependent = {tensor}
    for node in graph.node:
        if any(i in dependent for i in node.input):
            dependent.update(node.output)
    if logits not in dependent:
        raise ModelError(f"{path}: {logits!r} does not depend on layer {layer!r}; its tail graph is empty")
    # The forward nodes the logits need, cut at the layer's tensor.
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack, seen = [], [logits], set()
    while stack:
        name = stack.pop()
        if name in seen or name == tensor:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None:
            continue
        if not any(o in dependent for o in node.output) and not all(o in const for o in node.output):
            continue  # a side tensor: computed before the layer, fed from a forward pass
        needed.append(id(node))
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs]:
                stack.extend(i for n in sub.node for i in n.input if i)
    keep = set(needed)
    nodes = [n for n in graph.node if id(n) in keep]
    produced = {o for n in nodes for o in n.output}
    read = []
    for node in nodes:
        read.extend(i for i in node.input if i)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs]:
                inner = {o for n in sub.node for o in n.output}
                read.extend(i for n in sub.node for i in n.input if i and i not in inner)
    side = [name for name in dict.fromkeys(read)
            if name not in produced and name not in initializers and name != tensor
            and (name in producer or any(g.name == name for g in graph.input))]
    infos = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    missing = [name for name in [tensor, *side] if name not in infos]
    if missing:
        import onnx

        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            infos.update({v.name: v for v in inferred.graph.value_info if v.name in missing})
        except Exception:  # inference is a nicety: without it the inputs are declared float of any shape
            pass
    act_info = infos.get(contract.ACTIVATION_PREFIX + layer)

    def info(name: str):
        found = infos.get(name) or (act_info if name == tensor else None)
        if found is not None and found.type.HasField("tensor_type"):
            value = type(found)()
            value.CopyFrom(found)
            value.name = name
            return value
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    outputs = [o for o in graph.output if o.name == logits]
    used = produced | set(read)
    tail_graph = helper.make_graph(
        nodes, graph.name + "_tail", [info(tensor), *(info(n) for n in side)], outputs,
        initializer=[i for i in graph.initializer if i.name in used],
        value_info=[v for v in graph.value_info if v.name in produced],
    )
    tail = helper.make_model(tail_graph, opset_imports=list(model.opset_import))
    tail.ir_version = model.ir_version
    computed = [n for n in side if n in producer]
    side_model = None
    if computed:
        side_model = subgraph(model, computed, extra_outputs=[info(n) for n in computed])
    return tail, side_model, side



def subgraph(model, outputs: Sequence[str], extra_outputs: Sequence[Any] = ()):
    """A copy of `model` reduced to the nodes, inputs and initializers that `outputs` need.

    `extra_outputs`: value infos of intermediate tensors (named in `outputs`) to expose as outputs."""
    from onnx import helper

    graph = model.graph
    needed = set(outputs)
    nodes = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # names a subgraph (If/Loop/Scan body) reads from outside
                for sub in [attr.g, *attr.graphs]:
                    needed.update(i for n in sub.node for i in n.input if i)
    pruned = helper.make_graph(
        list(reversed(nodes)), graph.name,
        [i for i in graph.input if i.name in needed],
        [o for o in graph.output if o.name in outputs]
        + [v for v in extra_outputs if v.name not in {o.name for o in graph.output}],
        initializer=[i for i in graph.initializer if i.name in needed],
        value_info=[v for v in graph.value_info if v.name in needed],
    )
    result = helper.make_model(pruned, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result
