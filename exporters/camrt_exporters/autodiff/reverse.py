"""Reverse-mode differentiation of ONNX graphs into ONNX gradient subgraphs.

`differentiate()` walks the nodes that lie on a path between the requested tensors (`wrt`) and
the score in reverse topological order, asks each node's backward rule for the gradients of its
inputs, and sums the contributions of tensors with several consumers. The result is a list of new
ONNX nodes and initializers that compute d<seed . score>/d<wrt> inside the same graph, so one
onnxruntime run does forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from camrt.modelfile.layers import tensors_between

from ..errors import ExportError, UnsupportedOpError
from .graph import Dim, GraphIndex

if TYPE_CHECKING:
    from camrt.contract import Preprocessing


class BackwardRule(Protocol):
    """Gradients of a node's inputs from the gradients of its outputs.

    `grads[i]` is the name of the gradient of `node.output[i]` or None when no gradient reaches
    that output. Return one entry per `node.input`: a tensor name, or None where no gradient is
    needed (`ctx.needs(i)` is False) or the input is not differentiable.
    """

    def __call__(self, ctx: "RuleContext", node: onnx.NodeProto, grads: list[str | None]) -> list[str | None]: ...


@dataclass(frozen=True)
class RuleSet:
    """A named table of backward rules; `base` supplies the rules this set does not override."""

    name: str
    rules: Mapping[str, BackwardRule]
    base: "RuleSet | None" = None

    def lookup(self, op_type: str) -> BackwardRule | None:
        rule = self.rules.get(op_type)
        if rule is None and self.base is not None:
            return self.base.lookup(op_type)
        return rule

    def op_types(self) -> set[str]:
        own = set(self.rules)
        return own | (self.base.op_types() if self.base else set())


@dataclass
class ForwardPatches:
    """Extra outputs that backward rules asked forward nodes for (e.g. MaxPool's Indices).

    Shared by all passes over one graph so that several rule sets reuse the same outputs.
    """

    extra_outputs: dict[str, dict[int, str]] = field(default_factory=dict)

    def apply(self, node: onnx.NodeProto) -> onnx.NodeProto:
        extra = self.extra_outputs.get(node.name)
        if not extra:
            return node
        patched = onnx.NodeProto()
        patched.CopyFrom(node)
        while len(patched.output) <= max(extra):
            patched.output.append("")
        for index, name in extra.items():
            patched.output[index] = name
        return patched


@dataclass
class Backward:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    gradients: dict[str, str]


class RuleContext:
    """What a backward rule may use: emit nodes, make constants, read static facts of the graph.

    image_input / preprocessing: the graph's image input and how the runtime normalises it, when the
    caller knows them (the contract exporter does); rules for the first layer read them (LRP's z^B
    rule takes its pixel bounds from the preprocessing)."""

    def __init__(self, index: GraphIndex, prefix: str, patches: ForwardPatches, image_input: str | None = None,
                 preprocessing: "Preprocessing | None" = None, compact: bool = False):
        self.index = index
        #: Share the forward pass's weights instead of storing transformed copies (e.g. a Conv's flipped
        #: kernel): a smaller file, a slower backward.
        self.compact = compact
        self.prefix = prefix
        self.patches = patches
        self.image_input = image_input
        self.preprocessing = preprocessing
        self._constants: dict[str, np.ndarray] = {}  # made by `const`: constants to the rules that read them
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0
        self._shape_cache: dict[str, str] = {}
        self.node: onnx.NodeProto | None = None
        self._active: set[str] = set()

    # --- facts about the forward graph -----------------------------------------------------
    @property
    def opset(self) -> int:
        return self.index.opset

    def needs(self, input_index: int) -> bool:
        """Whether the current node's input `input_index` needs a gradient."""
        assert self.node is not None
        return input_index < len(self.node.input) and self.node.input[input_index] in self._active

    def is_active(self, name: str) -> bool:
        """Whether tensor `name` lies on a differentiated path (between a tensor differentiated for and the score)."""
        return name in self._active

    def shape(self, name: str) -> tuple[Dim, ...] | None:
        if name in self._constants:
            return tuple(self._constants[name].shape)
        return self.index.shape(name)

    def static_shape(self, name: str, what: str = "") -> tuple[int, ...]:
        """The shape of `name` with every dimension but the first (batch) static."""
        shape = self.shape(name)
        if shape is None or any(not isinstance(d, int) for d in shape[1:]):
            raise ExportError(
                f"node {self.node.name!r} ({self.node.op_type}): the backward rule needs the static "
                f"shape of {what or name!r}, got {shape}. Export with a fixed input size."
            )
        return shape

    def value(self, name: str) -> np.ndarray | None:
        if name in self._constants:
            return self._constants[name]
        return self.index.value(name) if name else None

    def require_value(self, name: str, what: str) -> np.ndarray:
        value = self.value(name)
        if value is None:
            raise ExportError(
                f"node {self.node.name!r} ({self.node.op_type}): the backward rule needs {what} "
                f"({name!r}) to be a constant; it is computed at run time."
            )
        return value

    def np_dtype(self, name: str) -> np.dtype:
        elem = self.index.dtypes.get(name, onnx.TensorProto.FLOAT)
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))

    # --- building the gradient graph -------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{self.prefix}/{self._counter}_{hint}"

    def emit(self, op_type: str, inputs: list[str], n_outputs: int = 1, **attrs) -> str | list[str]:
        outputs = [self.fresh(op_type) for _ in range(n_outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type + "_node"), **attrs)
        )
        return outputs[0] if n_outputs == 1 else outputs

    def const(self, value, like: str | None = None, dtype=None) -> str:
        """An initializer; float values take the dtype of tensor `like` (float32 by default)."""
        if dtype is None:
            dtype = self.np_dtype(like) if like is not None else np.float32
        array = np.asarray(value, dtype=dtype)
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        self._constants[name] = array
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), dtype=np.int64)

    def shape_of(self, name: str) -> str:
        """A run-time Shape of `name` (dynamic batch), emitted once per tensor."""
        if name not in self._shape_cache:
            self._shape_cache[name] = self.emit("Shape", [name])
        return self._shape_cache[name]

    def forward_output(self, output_index: int, hint: str) -> str:
        """Ask the current forward node for an optional output (e.g. MaxPool Indices)."""
        node = self.node
        if output_index < len(node.output) and node.output[output_index]:
            return node.output[output_index]
        extra = self.patches.extra_outputs.setdefault(node.name, {})
        if output_index not in extra:
            extra[output_index] = f"{node.name}/camrt_{hint}"
        return extra[output_index]

    def scatter_add(self, op_type: str, data: str, indices: str, updates: str, like: str, **attrs) -> str:
        """ScatterElements or ScatterND with reduction "add" of data and updates typed like tensor `like`;
        in float32 for float16, cast back (onnxruntime's CPU kernels have no float16 one with a reduction)."""
        if self.np_dtype(like) != np.float16:
            return self.emit(op_type, [data, indices, updates], reduction="add", **attrs)
        wide = [self.emit("Cast", [name], to=onnx.TensorProto.FLOAT) for name in (data, updates)]
        summed = self.emit(op_type, [wide[0], indices, wide[1]], reduction="add", **attrs)
        return self.emit("Cast", [summed], to=onnx.TensorProto.FLOAT16)

    def add_n(self, names: list[str]) -> str:
        return names[0] if len(names) == 1 else self.emit("Sum", names)

    def mul(self, a: str, b: str) -> str:
        return self.emit("Mul", [a, b])

    def zeros_like(self, name: str) -> str:
        zero = numpy_helper.from_array(np.zeros(1, dtype=self.np_dtype(name)))
        return self.emit("ConstantOfShape", [self.shape_of(name)], value=zero)

    def unbroadcast(self, grad: str, operand: str, output: str) -> str:
        """Sum `grad` (shaped like `output`) down to the shape of the broadcast `operand`."""
        out_shape = self.index.shape(output)
        in_shape = self.index.shape(operand)
        if out_shape is None or in_shape is None:
            raise ExportError(
                f"node {self.node.name!r} ({self.node.op_type}): unknown rank for broadcasting "
                f"{operand!r} to {output!r}; run ONNX shape inference on the model first."
            )
        if in_shape == out_shape:
            return grad
        lead = len(out_shape) - len(in_shape)
        axes = list(range(lead))
        for i, dim in enumerate(in_shape):
            out_dim = out_shape[lead + i]
            if dim == 1 and out_dim != 1:
                axes.append(lead + i)
        if axes:
            grad = self.emit("ReduceSum", [grad, self.ints(axes)], keepdims=1)
        if lead or len(axes):
            value = self.value(operand)
            target = self.ints(value.shape) if value is not None else self.shape_of(operand)
            grad = self.emit("Reshape", [grad, target])
        return grad


def active_tensors(index: GraphIndex, score: str, wrt: list[str]) -> set[str]:
    """Differentiable tensors (float, or quantized by QuantizeLinear) that depend on a `wrt` tensor and
    that the score depends on."""
    return tensors_between(index.nodes, wrt, score, keep=index.is_differentiable)


def _path_to_score(index: GraphIndex, node: onnx.NodeProto, active: set[str], score: str) -> list[str]:
    """Node names from `node` forward to the score, through active tensors (for error messages)."""
    path = [node.name or node.op_type]
    current = node
    for _ in range(len(index.nodes)):
        if score in current.output:
            break
        nxt = next(
            (c for o in current.output if o in active for c in index.consumers.get(o, [])
             if any(i in active for i in c.output) or score in c.output),
            None,
        )
        if nxt is None:
            break
        path.append(nxt.name or nxt.op_type)
        current = nxt
    path.append(f"score {score!r}")
    return path


def _integer_break(index: GraphIndex, active: set[str]) -> str:
    """Why a path can carry no gradient: the first node turning an active tensor into integers."""
    for node in index.nodes:
        outputs = [o for o in node.output if o]
        if outputs and any(i in active for i in node.input) and not any(index.is_differentiable(o) for o in outputs):
            kind = onnx.TensorProto.DataType.Name(index.dtypes.get(outputs[0], 0)).lower()
            return (f": the path goes through node {node.name!r} ({node.op_type}), whose output is {kind}; "
                    "integer ops other than QuantizeLinear/DequantizeLinear cannot be differentiated: quantize with "
                    "QuantFormat.QDQ (not QOperator) or export the float model")
    return ""


def differentiate(
    index: GraphIndex,
    score: str,
    seed: str,
    wrt: list[str],
    rules: RuleSet,
    patches: ForwardPatches,
    prefix: str,
    image_input: str | None = None,
    preprocessing: "Preprocessing | None" = None,
    compact: bool = False,
    unreached_ok: Collection[str] = (),
) -> Backward:
    """Build the subgraph computing d(sum(seed * score))/d(t) for every t in `wrt` (with a rule set of
    modified rules, e.g. LRP's, whatever those rules propagate); `image_input` and `preprocessing`
    are handed to the rules through the RuleContext (`compact`: see RuleContext). A tensor of
    `unreached_ok` that the rules send nothing to (a rule set that holds it constant) is left out of
    the gradients instead of refused."""
    for name in wrt:
        if name not in index.shapes and name not in index.producer:
            raise ExportError(f"tensor {name!r} does not exist in the graph")
    active = active_tensors(index, score, wrt)
    for name in wrt:
        if name not in active:
            raise ExportError(
                f"tensor {name!r} has no differentiable path to the score {score!r}; "
                "choose a layer that feeds the classifier."
            )
    ctx = RuleContext(index, prefix, patches, image_input, preprocessing, compact)
    ctx._active = active
    contributions: dict[str, list[str]] = {score: [seed]}
    wanted = list(dict.fromkeys(wrt))  # in the caller's order: errors name the first tensor asked for
    for node in reversed(index.nodes):
        if not any(o in active for o in node.output):
            continue
        grads = [
            ctx.add_n(contributions[o]) if o in contributions else None for o in node.output
        ]
        for o, g in zip(node.output, grads):
            if g is not None:
                contributions[o] = [g]
        if all(g is None for g in grads):
            continue
        if not any(i in active for i in node.input):
            continue
        rule = rules.lookup(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            raise UnsupportedOpError(
                node.op_type, node.name, _path_to_score(index, node, active, score), rules.name
            )
        ctx.node = node
        input_grads = rule(ctx, node, grads)
        if len(input_grads) != len(node.input):
            raise ExportError(
                f"backward rule for {node.op_type} returned {len(input_grads)} gradients "
                f"for {len(node.input)} inputs (node {node.name!r})"
            )
        for name, g in zip(node.input, input_grads):
            if g is not None and name in active:
                contributions.setdefault(name, []).append(g)
        ctx.node = None
    gradients: dict[str, str] = {}
    for name in wanted:
        if name not in contributions and name in unreached_ok:
            continue
        if name not in contributions:
            raise ExportError(f"no gradient reached tensor {name!r} from the score {score!r}{_integer_break(index, active)}")
        gradients[name] = ctx.add_n(contributions[name])
    read = {name for node in ctx.nodes for name in node.input}  # a rule may make a constant it ends up not using
    return Backward(ctx.nodes, [init for init in ctx.initializers if init.name in read], gradients)


RuleTable = dict[str, BackwardRule]


def _add_rule(table: RuleTable, op_type: str, rule: BackwardRule) -> None:
    if op_type in table:
        raise ExportError(f"two backward rules for op type {op_type!r}")
    table[op_type] = rule


def rule_table(*tables: Mapping[str, BackwardRule]) -> RuleTable:
    """Merge rule tables, refusing two rules for one op type."""
    merged: RuleTable = {}
    for table in tables:
        for op_type, rule in table.items():
            _add_rule(merged, op_type, rule)
    return merged


def registering(table: RuleTable) -> Callable[..., Callable[[BackwardRule], BackwardRule]]:
    """Decorator factory: `@rule("Relu", "LeakyRelu")` adds a function to `table`."""

    def rule(*op_types: str):
        def decorate(fn: BackwardRule) -> BackwardRule:
            for op_type in op_types:
                _add_rule(table, op_type, fn)
            return fn

        return decorate

    return rule
