"""The straight-through surrogate of a QDQ quantized graph: the finite-difference oracle of its gradients.

A quantized graph is a step function of its input, so central differences of it say nothing about
the straight-through gradient (rules/quantize.py). The surrogate replaces every activation
QuantizeLinear -> DequantizeLinear pair by its straight-through linearisation at one point x0:
x_hat(x) = x_hat0 + m * (s_dq / s_q) * (x - x0), with x0, x_hat0 the values of the quantized graph at
that point and m = 1 where x0 did not clip, 0 where it did (computed here in numpy, independently of
the backward rules). Its value at the point is the quantized graph's and its derivative is, by
definition, the straight-through gradient, so the export self-check runs its usual finite differences
on the surrogate instead of the model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .autodiff.graph import attribute, quantized_range


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes of computed tensors (not of constant weights)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")
            and n.input[0] not in constants]


def _along_axis(node: onnx.NodeProto, value: np.ndarray, rank: int) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return value.reshape(())
    axis = attribute(node, "axis", 1) % rank
    return value.reshape([-1 if a == axis else 1 for a in range(rank)])


def _unclipped(node: onnx.NodeProto, x0: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
               elem_type: int) -> np.ndarray:
    """1 where round(x0 / s) + z lies in [qmin, qmax] (round half to even, as QuantizeLinear), else 0."""
    qmin, qmax = quantized_range(elem_type, node)
    shift = 0.0 if zero_point is None else _along_axis(node, zero_point, x0.ndim)
    unsaturated = np.rint(x0.astype(np.float32) / _along_axis(node, scale, x0.ndim).astype(np.float32)) + shift
    return ((unsaturated >= qmin) & (unsaturated <= qmax)).astype(np.float64)


def straight_through_surrogate(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A float copy of `model` whose activation Q -> DQ pairs are linearised at the point `feeds`."""
    import onnxruntime as ort

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quantizers = activation_quantizers(model)
    readers = {q.output[0]: [n for n in model.graph.node if q.output[0] in n.input] for q in quantizers}
    wanted = [q.input[0] for q in quantizers] + [d.output[0] for q in quantizers for d in readers[q.output[0]]]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(wanted))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(dict.fromkeys(wanted))
    at_point = dict(zip(names, session.run(names, feeds)))
    elem_types = {vi.name: vi.type.tensor_type.elem_type
                  for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    replaced: dict[str, list[onnx.NodeProto]] = {}  # by node name (unique after contract_file.prepare)
    initializers: list[onnx.TensorProto] = []
    for q in quantizers:
        x, x0 = q.input[0], at_point[q.input[0]]
        zero_point = values.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        mask = _unclipped(q, x0, values[q.input[1]], zero_point, elem_types.get(q.output[0], onnx.TensorProto.UINT8))
        for dq in readers[q.output[0]]:
            if dq.op_type != "DequantizeLinear":
                continue  # an integer op: the export refuses it by name
            ratio = _along_axis(dq, values[dq.input[1]], x0.ndim) / _along_axis(q, values[q.input[1]], x0.ndim)
            prefix = f"camrt_surrogate/{dq.name or dq.output[0]}"
            consts = {"x0": x0, "x_hat0": at_point[dq.output[0]], "slope": mask * ratio}
            for key, value in consts.items():
                initializers.append(numpy_helper.from_array(np.asarray(value, dtype=x0.dtype), f"{prefix}/{key}"))
            replaced[dq.name] = [
                helper.make_node("Sub", [x, f"{prefix}/x0"], [f"{prefix}/dx"]),
                helper.make_node("Mul", [f"{prefix}/dx", f"{prefix}/slope"], [f"{prefix}/dy"]),
                helper.make_node("Add", [f"{prefix}/x_hat0", f"{prefix}/dy"], [dq.output[0]]),
            ]
    surrogate = onnx.ModelProto()
    surrogate.CopyFrom(model)
    nodes = [new for node in model.graph.node for new in replaced.get(node.name, [node])]
    del surrogate.graph.node[:]
    surrogate.graph.node.extend(nodes)
    surrogate.graph.initializer.extend(initializers)
    return surrogate
