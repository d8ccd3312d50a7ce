"""How each tensor of an ONNX graph maps onto an image grid: NCHW, NHWC, or a token sequence.

The layout of a layer (contract.LayerLayout) is established by following the axes of the image
(and of every map a Conv, a pool... writes as NCHW) forward through the graph. Each axis of a
tensor is a list of factors, outer to inner; a factor is a part of one role: the batch ``B``,
channels ``C``, rows ``H`` or columns ``W`` of the map it came from, or ``T``, a token axis that
holds extra tokens besides the grid. Reshape, Flatten, Squeeze and Unsqueeze split and merge
factors (matched by the static sizes of the inferred output shape, the batch absorbed by the one
symbolic dimension); Transpose permutes axes; a Concat along a grid-token axis adds extra tokens
(class, distillation, registers); per-position ops (element-wise, LayerNormalization, a MatMul by a
weight matrix over the last axis) keep the layout. Anything else leaves its output unestablished.

A tensor is then
- nchw: [B, C, H, W] with H and W the map's rows and columns (or their outer parts: a
  space-to-depth / patch merging moves the inner parts into the channels),
- nhwc: [B, H, W, C] (Swin stages, ConvNeXt's channels-last blocks, Keras/tf2onnx files),
- tokens: [B, T, C] with the grid in row-major order among the tokens and extra tokens at known
  positions (ViT, DeiT: `x.flatten(2).transpose(1, 2)` of the patch-embedding Conv, then the
  Concat that prepends the class and distillation tokens).

Attention reshapes tokens into heads and mixes them (MatMul of two activations): those tensors
are unestablished, and the residual Add that brings the block's output back gets the layout of its
other input (an element-wise op takes the layout its established full-shape inputs agree on).
Reads only the graph (nodes, inferred shapes, constant values; no onnx import, no torch): `camrt
export` and `camrt inspect` on a plain ONNX file both use it (`default_layer`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import contract
from ..contract import LayerLayout
from .layers import ELEMENTWISE_OPS, NCHW_OUTPUT_OPS, Shape, choose_default_layer

_BATCH, _CHANNELS, _ROWS, _COLUMNS, _TOKENS = "B", "C", "H", "W", "T"


@dataclass(frozen=True)
class Factor:
    """A part of one axis role: `size` steps of `stride` (in the role's finest unit) out of `total`."""

    role: str
    size: int | None  # None: the batch
    stride: int = 1
    total: int | None = None

    @property
    def is_whole_grid_axis(self) -> bool:
        """Rows or columns of the map at their full extent (possibly subsampled: stride > 1)."""
        return self.role in (_ROWS, _COLUMNS) and self.size is not None and self.size * self.stride == self.total


Axis = tuple[Factor, ...]


@dataclass(frozen=True)
class Axes:
    """The factors of every axis of a tensor; `sequence`: the layout of its `T` factor, if any."""

    axes: tuple[Axis, ...]
    sequence: LayerLayout | None = None


#: Ops that keep their first input's axes (normalising or choosing along one axis, resampling).
_FIRST_INPUT_OPS = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "Pad", "Resize", "Upsample", "GroupNormalization",
    "InstanceNormalization",
})
_RESHAPING_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def infer_layer_layouts(nodes: Sequence[Any], shape_of: Callable[[str], Shape | None], image_input: str,
                        image_layout: str | None,
                        value_of: Callable[[str], Any] = lambda name: None) -> dict[str, LayerLayout]:
    """The LayerLayout (nchw, nhwc or tokens) of every tensor whose layout can be established.

    nodes: ONNX NodeProtos in topological order; shape_of: the inferred shape of a tensor (static
    dims int, the batch a symbol); image_layout: contract.LAYOUT_NCHW / LAYOUT_NHWC of the input;
    value_of: the value of a constant tensor (None otherwise), for Slice's starts, ends and steps.
    """
    states: dict[str, Axes] = {}
    image = _seed(shape_of(image_input), image_layout)
    if image is not None:
        states[image_input] = image
    for node in nodes:
        out = node.output[0] if node.output else ""
        if not out:
            continue
        state = _propagate(node, states, shape_of, value_of)
        if state is not None:
            states[out] = state
    layouts = {}
    for name, state in states.items():
        layout = _classify(state)
        if layout is not None:
            layouts[name] = layout
    return layouts


def sequence_layout(layouts: dict[str, LayerLayout], num_tokens: int) -> LayerLayout | None:
    """The token layout (grid and extra tokens) of the graph's sequences of `num_tokens` tokens,
    e.g. for an attention map [B, heads, T, T]; None when no token tensor has that many tokens
    or several layouts do."""
    found = {layout for layout in layouts.values() if layout.layout == contract.LAYOUT_TOKENS
             and len(layout.extra_tokens) + layout.grid[0] * layout.grid[1] == num_tokens}
    return found.pop() if len(found) == 1 else None


def grid_size(layout: LayerLayout, shape: Shape) -> tuple[int, int] | None:
    """(h, w) of the feature map a tensor of `shape` with `layout` becomes."""
    if layout.layout == contract.LAYOUT_TOKENS:
        return layout.grid
    if len(shape) != 4:
        return None
    h, w = shape[1:3] if layout.layout == contract.LAYOUT_NHWC else shape[2:4]
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


def layout_candidates(nodes: Sequence[Any], shape_of: Callable[[str], Shape | None], on_path: Collection[str],
                      layouts: Mapping[str, LayerLayout]) -> list[str]:
    """Node outputs in `on_path` whose layout is established and whose grid has spatial extent (h
    and w both > 1), in graph order: the layers `camrt export` may choose by default."""
    found = []
    for node in nodes:
        for out in node.output:
            if out in on_path and out in layouts:
                size = grid_size(layouts[out], shape_of(out) or ())
                if size is not None and min(size) > 1:
                    found.append(out)
    return found


@dataclass(frozen=True)
class DefaultLayer:
    """The default layer of a graph and why it was chosen."""

    tensor: str
    reason: str


def default_layer(nodes: Sequence[Any], is_constant: Callable[[str], bool], candidates: Sequence[str],
                  layouts: Mapping[str, LayerLayout], framework: str = "onnx") -> DefaultLayer | None:
    """The LayerNormalization output feeding the last attention (ViT, DeiT: after the last block
    only the class token reaches the head, so the grid tokens of later tensors get no gradient),
    else the `choose_target_layer` hook's pick among `candidates` (built-in: the last); None when
    there are no candidates."""
    attention = attention_inputs(nodes, is_constant, candidates, layouts)
    if attention:
        return DefaultLayer(attention[-1], "the LayerNormalization feeding the last attention")
    choice = choose_default_layer(candidates, framework)
    return None if choice is None else DefaultLayer(choice, "the last tensor with spatial extent")


# --- propagation ------------------------------------------------------------------------------
def _seed(shape: Shape | None, layout: str | None) -> Axes | None:
    """Fresh roles for an NCHW/NHWC map with static height and width."""
    if shape is None or len(shape) != 4 or layout not in contract.LAYOUTS:
        return None
    channels, height, width = (shape[3], shape[1], shape[2]) if layout == contract.LAYOUT_NHWC else shape[1:]
    if not all(isinstance(d, int) for d in (channels, height, width)):
        return None
    rows, columns = _factors(_ROWS, height), _factors(_COLUMNS, width)
    chans, batch = _factors(_CHANNELS, channels), (Factor(_BATCH, None),)
    return Axes((batch, rows, columns, chans) if layout == contract.LAYOUT_NHWC else (batch, chans, rows, columns))


def _factors(role: str, size: int) -> Axis:
    return (Factor(role, size, 1, size),) if size > 1 else ()


def _propagate(node: Any, states: dict[str, Axes], shape_of: Callable[[str], Shape | None],
               value_of: Callable[[str], Any]) -> Axes | None:
    op, out = node.op_type, node.output[0]
    if op in NCHW_OUTPUT_OPS:
        return _seed(shape_of(out), contract.LAYOUT_NCHW)
    source = states.get(node.input[0]) if node.input else None
    if op in ELEMENTWISE_OPS:
        return _elementwise(node, states, shape_of)
    if op == "Concat":
        return _concat(node, states, shape_of)
    if source is None:
        return None
    if op in _FIRST_INPUT_OPS:  # (padded or resized maps: their extents no longer those of the factors)
        return source if _same_extents(shape_of(node.input[0]), shape_of(out)) else None
    if op == "Slice":
        return _slice(node, source, shape_of, value_of)
    if op == "Transpose":
        perm = _attribute(node, "perm") or list(reversed(range(len(source.axes))))
        return replace(source, axes=tuple(source.axes[p] for p in perm))
    if op in _RESHAPING_OPS:
        axes = _regroup(source.axes, shape_of(out))
        return replace(source, axes=axes) if axes is not None else None
    if op == "MatMul" or (op == "Gemm" and not _attribute(node, "transA")):
        return _per_position_linear(node, source, shape_of)
    return None


def _elementwise(node: Any, states: dict[str, Axes], shape_of: Callable[[str], Shape | None]) -> Axes | None:
    """The axes the established inputs of the output's full shape agree on (None if they differ)."""
    shape = shape_of(node.output[0])
    found = {states[i] for i in node.input if i in states and shape_of(i) == shape and shape is not None}
    return found.pop() if len(found) == 1 else None


def _slice(node: Any, source: Axes, shape_of: Callable[[str], Shape | None], value_of: Callable[[str], Any]) -> Axes | None:
    """Channels sliced; rows or columns subsampled by a step that divides them, from an offset below
    the step (Swin's patch merging `x[..., 0::2, 1::2, :]`: a coarser grid of the same map)."""
    shape, out = shape_of(node.input[0]), shape_of(node.output[0])
    if shape is None or out is None:
        return None
    starts, ends, axes, steps = (value_of(name) if name else None for name in [*node.input[1:5], "", "", ""][:4])
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) \
            or (len(node.input) > 4 and node.input[4] and steps is None):
        return None
    rank = len(shape)
    axes = [int(a) % rank for a in (axes if axes is not None else range(len(starts)))]
    steps = [int(k) for k in (steps if steps is not None else [1] * len(axes))]
    sliced = list(source.axes)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        size = shape[axis]
        if not isinstance(size, int) or not isinstance(out[axis], int):
            return None
        start = int(start) + size if int(start) < 0 else int(start)
        if start == 0 and step == 1 and int(end) >= size:
            continue
        factors = _canonical(source.axes[axis])
        if _is_channel_axis(factors):
            sliced[axis] = _factors(_CHANNELS, out[axis])
        elif (len(factors) == 1 and factors[0].is_whole_grid_axis and step > 1 and 0 <= start < step
              and int(end) >= size and size % step == 0):
            grid = factors[0]
            sliced[axis] = (Factor(grid.role, size // step, grid.stride * step, grid.total),)
        else:
            return None
    return replace(source, axes=tuple(sliced))


def _same_extents(before: Shape | None, after: Shape | None) -> bool:
    return before is not None and before == after


def _per_position_linear(node: Any, source: Axes, shape_of: Callable[[str], Shape | None]) -> Axes | None:
    """x @ W (MatMul, Gemm) with a weight matrix W: a linear map of the last axis at every position."""
    weight, out = shape_of(node.input[1]), shape_of(node.output[0])
    if weight is None or len(weight) != 2 or out is None or not isinstance(out[-1], int):
        return None
    if not _is_channel_axis(source.axes[-1]):
        return None
    return replace(source, axes=(*source.axes[:-1], _factors(_CHANNELS, out[-1])))


def _concat(node: Any, states: dict[str, Axes], shape_of: Callable[[str], Shape | None]) -> Axes | None:
    """Channels concatenated (every established input agreeing on the other axes), or extra tokens
    put around the one input whose concatenated axis holds the grid."""
    shapes = [shape_of(i) for i in node.input]
    if any(s is None for s in shapes):
        return None
    rank = len(shapes[0])
    axis = _attribute(node, "axis") % rank
    stated = [(position, states[i]) for position, i in enumerate(node.input) if i in states]
    if not stated:
        return None
    others = {tuple(a for k, a in enumerate(state.axes) if k != axis) for _, state in stated}
    if len(others) != 1:
        return None
    if all(_is_channel_axis(state.axes[axis]) for _, state in stated):
        total = sum(s[axis] for s in shapes)
        if not isinstance(total, int):
            return None
        axes = list(stated[0][1].axes)
        axes[axis] = _factors(_CHANNELS, total)
        return Axes(tuple(axes))
    grids = [(position, state) for position, state in stated if _grid_positions(state, axis, shapes[position]) is not None]
    if len(grids) != 1 or len(stated) != 1 or not all(isinstance(s[axis], int) for s in shapes):
        return None
    position, state = grids[0]
    offset = sum(s[axis] for s in shapes[:position])
    grid_tokens = {offset + p for p in _grid_positions(state, axis, shapes[position])}
    length = sum(s[axis] for s in shapes)
    extra = tuple(p for p in range(length) if p not in grid_tokens)
    axes = list(state.axes)
    axes[axis] = (Factor(_TOKENS, length, 1, length),)
    return Axes(tuple(axes), LayerLayout(contract.LAYOUT_TOKENS, _grid_of(state, axis), extra))


def _grid_positions(state: Axes, axis: int, shape: Shape) -> list[int] | None:
    """Positions of the grid tokens along `axis` (all of it for a pure grid axis), or None."""
    factors = _canonical(state.axes[axis])
    if len(factors) == 1 and factors[0].role == _TOKENS and state.sequence is not None:
        extra = set(state.sequence.extra_tokens)
        return [p for p in range(factors[0].size) if p not in extra]
    if _grid_of(state, axis) is not None:
        return list(range(shape[axis]))
    return None


def _grid_of(state: Axes, axis: int) -> tuple[int, int] | None:
    """(rows, columns) of an axis that holds the map's rows then columns, row-major."""
    factors = _canonical(state.axes[axis])
    if len(factors) == 1 and factors[0].role == _TOKENS and state.sequence is not None:
        return state.sequence.grid
    if len(factors) == 2 and factors[0].role == _ROWS and factors[1].role == _COLUMNS \
            and all(f.is_whole_grid_axis for f in factors):
        return factors[0].size, factors[1].size
    return None


# --- reshaping: splitting and merging factors by the output's static sizes ----------------------
def _regroup(axes: tuple[Axis, ...], shape: Shape | None) -> tuple[Axis, ...] | None:
    """The factors of `axes`, in order, grouped into the dims of `shape`; None when the sizes do
    not split them (the one symbolic dim of `shape` takes what the static dims leave, the batch)."""
    if shape is None:
        return None
    queue = [f for axis in axes for f in axis if f.size != 1]
    symbolic = [k for k, d in enumerate(shape) if not isinstance(d, int)]
    if len(symbolic) > 1:
        return None
    split = symbolic[0] if symbolic else len(shape)
    head = []
    for size in shape[:split]:
        group = _take(queue, size, from_front=True)
        if group is None:
            return None
        head.append(group)
    tail = []
    for size in reversed(shape[split + 1:]):
        group = _take(queue, size, from_front=False)
        if group is None:
            return None
        tail.insert(0, group)
    if not symbolic:
        return tuple(head) if not queue else None
    return (*head, tuple(queue), *tail)


def _take(queue: list[Factor], size: int, from_front: bool) -> Axis | None:
    """Remove factors making up `size` steps from one end of `queue`, splitting one if needed."""
    group: list[Factor] = []
    need = size
    while need > 1:
        if not queue:
            return None
        factor = queue[0] if from_front else queue[-1]
        if factor.size is None:
            return None
        if need % factor.size == 0:
            queue.pop(0 if from_front else -1)
            part = factor
            need //= factor.size
        elif factor.size % need == 0 and factor.role != _TOKENS:
            rest = factor.size // need
            if from_front:  # the outer part goes, the inner stays
                part = Factor(factor.role, need, factor.stride * rest, factor.total)
                queue[0] = Factor(factor.role, rest, factor.stride, factor.total)
            else:
                part = Factor(factor.role, need, factor.stride, factor.total)
                queue[-1] = Factor(factor.role, rest, factor.stride * need, factor.total)
            need = 1
        else:
            return None
        if from_front:
            group.append(part)
        else:
            group.insert(0, part)
    return tuple(group)


def _canonical(axis: Iterable[Factor]) -> Axis:
    """Adjacent parts of one role that are contiguous (outer stride = inner size * stride) merged."""
    merged: list[Factor] = []
    for factor in axis:
        if factor.size == 1:
            continue
        last = merged[-1] if merged else None
        if (last is not None and last.role == factor.role and factor.size is not None and last.size is not None
                and last.stride == factor.size * factor.stride and last.total == factor.total):
            merged[-1] = Factor(factor.role, last.size * factor.size, factor.stride, factor.total)
        else:
            merged.append(factor)
    return tuple(merged)


# --- classification -------------------------------------------------------------------------
def _is_channel_axis(axis: Axis) -> bool:
    """Channels, possibly with inner parts of rows and columns merged in, but no grid or batch."""
    return all(f.role not in (_BATCH, _TOKENS) and not f.is_whole_grid_axis for f in _canonical(axis))


def _is_grid_axis(axis: Axis, role: str) -> bool:
    """Rows (or columns) at their full extent; an axis of size 1 (a pooled map: SE blocks) is one too."""
    factors = _canonical(axis)
    return not factors or (len(factors) == 1 and factors[0].role == role and factors[0].is_whole_grid_axis)


def _classify(state: Axes) -> LayerLayout | None:
    axes = state.axes
    if not axes or _canonical(axes[0]) != (Factor(_BATCH, None),):
        return None
    if len(axes) == 4:
        if _is_channel_axis(axes[1]) and _is_grid_axis(axes[2], _ROWS) and _is_grid_axis(axes[3], _COLUMNS):
            return LayerLayout(contract.LAYOUT_NCHW)
        if _is_grid_axis(axes[1], _ROWS) and _is_grid_axis(axes[2], _COLUMNS) and _is_channel_axis(axes[3]):
            return LayerLayout(contract.LAYOUT_NHWC)
    if len(axes) == 3 and _is_channel_axis(axes[2]):
        grid = _grid_of(state, 1)
        if grid is not None:
            factors = _canonical(axes[1])
            extra = state.sequence.extra_tokens if factors[0].role == _TOKENS else ()
            return LayerLayout(contract.LAYOUT_TOKENS, grid, tuple(extra))
    return None


def _attribute(node: Any, name: str) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return list(attribute.ints) if attribute.ints else attribute.i
    return None


# --- the default layer of a transformer --------------------------------------------------------
#: Ops an attention applies between its input's LayerNormalization and the product of queries and
#: keys (the projections, the split into heads, the scaling).
_PER_HEAD_OPS = frozenset({"MatMul", "Gemm", "Add", "Mul", "Div", "Reshape", "Transpose", "Slice", "Split", "Squeeze",
                           "Unsqueeze", "Gather", "Identity", "Cast"})


def attention_inputs(nodes: Sequence[Any], is_constant: Callable[[str], bool], candidates: Sequence[str],
                     layouts: Mapping[str, LayerLayout]) -> list[str]:
    """The token candidates made by a LayerNormalization that feed an attention, in graph order:
    their consumers reach a MatMul of two activations (queries times keys) through projections
    and per-head reshapes only (ViT's and DeiT's `norm1`; pytorch-grad-cam's recommended layer)."""
    consumers: dict[str, list[Any]] = {}
    made_by: dict[str, str] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for out in node.output:
            made_by[out] = node.op_type
    wanted = [c for c in candidates if made_by.get(c) == "LayerNormalization"
              and layouts[c].layout == contract.LAYOUT_TOKENS]
    return [c for c in wanted if _reaches_attention(c, consumers, is_constant)]


def _reaches_attention(tensor: str, consumers: Mapping[str, list[Any]], is_constant: Callable[[str], bool],
                       depth: int = 16) -> bool:
    frontier, seen = [tensor], {tensor}
    for _ in range(depth):
        following = []
        for name in frontier:
            for node in consumers.get(name, ()):
                if node.op_type not in _PER_HEAD_OPS:
                    continue
                others = [i for i in node.input if i and i != name]
                if node.op_type == "MatMul" and others and not any(is_constant(i) for i in others):
                    return True
                if node.op_type in ("Add", "Mul", "Div", "MatMul", "Gemm") and not all(is_constant(i) for i in others):
                    continue  # a residual connection or a product with another activation
                following += [out for out in node.output if out and out not in seen]
        seen.update(following)
        frontier = following
    return False
