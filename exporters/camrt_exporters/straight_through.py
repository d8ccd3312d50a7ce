"""The straight-through surrogate of a QDQ quantized graph: the finite-difference oracle of its gradients.

A quantized graph is a step function of its input, so central differences of it say nothing about
the straight-through gradient (rules/quantize.py). The surrogate replaces each activation
QuantizeLinear -> DequantizeLinear pair that the gradient crosses by its straight-through
linearisation at one point: x_hat(x) = x_hat0 + m * (s_dq / s_q) * (x - x0), with x0 the value the
exported file computes there, x_hat0 its quantized-dequantized value and m = 1 where x0 did not clip,
0 where it did (computed here in numpy, independently of the backward rules). Its value at the point
is the quantized graph's and its derivative is, by definition, the straight-through gradient, so the
export self-check runs its usual finite differences on the surrogate instead of the model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from camrt import contract

from .autodiff.graph import attribute, quantized_range


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes of computed tensors (not of constant weights)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")
            and n.input[0] not in constants]


def differentiated_quantizer_inputs(forward: onnx.ModelProto, contract_model: onnx.ModelProto,
                                    feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs x0 of the activation QuantizeLinear nodes whose backward rule the exported file runs
    (the gradient nodes read them), as the file computes them at `feeds` (its run's values, so its
    fused integer kernels included)."""
    import onnxruntime as ort

    forward_nodes = {n.name for n in forward.graph.node}
    read_by_gradient = {i for n in contract_model.graph.node if n.name not in forward_nodes for i in n.input}
    names = list(dict.fromkeys(q.input[0] for q in activation_quantizers(forward) if q.input[0] in read_by_gradient))
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(contract_model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    batch = len(next(iter(feeds.values())))
    targets = {contract.TARGET_INPUT: np.full(batch, contract.TOP1_TARGET, dtype=np.int64)}
    return dict(zip(names, session.run(names, {**feeds, **targets})))


def _along_axis(node: onnx.NodeProto, value, rank: int) -> np.ndarray:
    value = np.asarray(value)
    if value.size == 1:
        return value.reshape(())
    axis = attribute(node, "axis", 1) % rank
    return value.reshape([-1 if a == axis else 1 for a in range(rank)])


def _quantize(node: onnx.NodeProto, x0: np.ndarray, values: dict[str, np.ndarray], elem_type: int):
    """(unsaturated, saturated) round(x0 / s) + z of a QuantizeLinear, in float32 as the op (half to even)."""
    scale = _along_axis(node, values[node.input[1]], x0.ndim).astype(np.float32)
    zero_point = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    shift = 0.0 if zero_point is None else _along_axis(node, zero_point, x0.ndim).astype(np.float32)
    unsaturated = np.rint(x0.astype(np.float32) / scale) + shift
    return unsaturated, np.clip(unsaturated, *quantized_range(elem_type, node))


def _dequantize(node: onnx.NodeProto, q: np.ndarray, values: dict[str, np.ndarray]) -> np.ndarray:
    zero_point = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    shift = 0.0 if zero_point is None else _along_axis(node, zero_point, q.ndim).astype(np.float32)
    return ((q - shift) * _along_axis(node, values[node.input[1]], q.ndim).astype(np.float32)).astype(np.float32)


def straight_through_surrogate(forward: onnx.ModelProto, contract_model: onnx.ModelProto,
                               feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `forward` whose activation Q -> DQ pairs that the gradient crosses are linearised at `feeds`."""
    values = {i.name: numpy_helper.to_array(i) for i in forward.graph.initializer}
    at_point = differentiated_quantizer_inputs(forward, contract_model, feeds)
    elem_types = {vi.name: vi.type.tensor_type.elem_type
                  for vi in onnx.shape_inference.infer_shapes(forward).graph.value_info}
    replaced: dict[str, list[onnx.NodeProto]] = {}  # by node name (unique after contract_file.prepare)
    initializers: list[onnx.TensorProto] = []
    for q in activation_quantizers(forward):
        if q.input[0] not in at_point:
            continue
        x, x0 = q.input[0], at_point[q.input[0]]
        qmin, qmax = quantized_range(elem_types.get(q.output[0], onnx.TensorProto.UINT8), q)
        unsaturated, saturated = _quantize(q, x0, values, elem_types.get(q.output[0], onnx.TensorProto.UINT8))
        unclipped = ((unsaturated >= qmin) & (unsaturated <= qmax)).astype(np.float32)
        q_scale = _along_axis(q, values[q.input[1]], x0.ndim).astype(np.float32)
        for dq in (n for n in forward.graph.node if q.output[0] in n.input and n.op_type == "DequantizeLinear"):
            prefix = f"camrt_surrogate/{dq.name}"
            slope = unclipped * _along_axis(dq, values[dq.input[1]], x0.ndim).astype(np.float32) / q_scale
            for key, value in {"x0": x0, "x_hat0": _dequantize(dq, saturated, values), "slope": slope}.items():
                initializers.append(numpy_helper.from_array(np.asarray(value, dtype=x0.dtype), f"{prefix}/{key}"))
            replaced[dq.name] = [
                helper.make_node("Sub", [x, f"{prefix}/x0"], [f"{prefix}/dx"]),
                helper.make_node("Mul", [f"{prefix}/dx", f"{prefix}/slope"], [f"{prefix}/dy"]),
                helper.make_node("Add", [f"{prefix}/x_hat0", f"{prefix}/dy"], [dq.output[0]]),
            ]
    surrogate = onnx.ModelProto()
    surrogate.CopyFrom(forward)
    del surrogate.graph.node[:]
    surrogate.graph.node.extend(new for node in forward.graph.node for new in replaced.get(node.name, [node]))
    surrogate.graph.initializer.extend(initializers)
    return surrogate
