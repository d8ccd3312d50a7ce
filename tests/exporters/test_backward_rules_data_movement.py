"""Finite-difference checks of the data-movement backward rules: Reshape, Flatten, Squeeze,
Unsqueeze, Transpose, Expand, Concat, Split, Slice, Pad and Gather.

The harness (tests/exporters/rule_harness.py) builds a tiny ONNX graph X -> op(s) -> Y, asks
`differentiate` for d<G, Y>/dX and compares float64 (reference evaluator) and float32
(onnxruntime) gradient graphs with central differences; hypothesis draws the structure.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from .rule_harness import FEW, SOME, Case, broadcast_partner, check, node, seeds, shapes


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds, batch_code=st.sampled_from([0, -1]))
def test_reshape(data, x_shape, seed, batch_code):
    """Reshape to a random factorisation of the per-sample size; batch kept by 0 or -1."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(x_shape[1:]))
    dims = []
    rest = size
    while rest > 1 and len(dims) < 3:
        d = data.draw(st.sampled_from([f for f in range(1, rest + 1) if rest % f == 0]))
        dims.append(d)
        rest //= d
    dims.append(rest)
    if batch_code == 0 and data.draw(st.booleans()):
        dims[data.draw(st.integers(0, len(dims) - 1))] = -1
    shape = np.array([batch_code, *dims] if batch_code == 0 else [-1, *dims], dtype=np.int64)
    check(Case([node("Reshape", ["X", "shape"])], rng.standard_normal(x_shape), {"shape": shape}), rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds)
def test_flatten(data, x_shape, seed):
    """Flatten at every axis; all but axis 1 mix the batch into Y's first dimension (FD element
    by element)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(-rank, rank))
    case = Case([node("Flatten", ["X"], axis=axis)], rng.standard_normal(x_shape),
                batch_independent=(axis + rank if axis < 0 else axis) == 1)
    check(case, rng)


@FEW
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, max_side=3), seed=seeds)
def test_squeeze_unsqueeze(data, x_shape, seed):
    """Unsqueeze (axes as input, negative allowed) then Squeeze of some size-1 axes. (Squeeze
    without axes cannot be used with a dynamic batch: it would drop a batch of 1.)"""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    out_rank = rank + data.draw(st.integers(1, 2))
    new_axes = data.draw(st.lists(st.integers(1, out_rank - 1), min_size=out_rank - rank,
                                  max_size=out_rank - rank, unique=True))
    new_axes = [a - out_rank if data.draw(st.booleans()) else a for a in new_axes]
    unsqueezed = [d for d in x_shape]
    for a in sorted(a % out_rank for a in new_axes):
        unsqueezed.insert(a, 1)
    ones = [i for i, d in enumerate(unsqueezed) if d == 1 and i > 0]
    drop = data.draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
    drop = [a - out_rank if data.draw(st.booleans()) else a for a in drop]
    inits = {"new_axes": np.array(new_axes, dtype=np.int64), "drop": np.array(drop, dtype=np.int64)}
    nodes = [node("Unsqueeze", ["X", "new_axes"], ["U"]), node("Squeeze", ["U", "drop"])]
    check(Case(nodes, rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=5, max_side=3), seed=seeds)
def test_transpose(data, x_shape, seed):
    """Any permutation; one that moves the batch axis gets FD element by element."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    perm = data.draw(st.one_of(st.none(), st.permutations(range(rank))))
    attrs = {} if perm is None else {"perm": list(perm)}
    keeps_batch = perm is not None and perm[0] == 0
    case = Case([node("Transpose", ["X"], **attrs)], rng.standard_normal(x_shape),
                batch_independent=keeps_batch, dynamic_batch=keeps_batch)
    check(case, rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_side=3), seed=seeds)
def test_expand(data, x_shape, seed):
    rng = np.random.default_rng(seed)
    target, _ = data.draw(broadcast_partner(x_shape))
    inits = {"shape": np.array(target, dtype=np.int64)}
    check(Case([node("Expand", ["X", "shape"])], rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4), seed=seeds, n_parts=st.integers(1, 4))
def test_concat(data, x_shape, seed, n_parts):
    """Concat of X (possibly twice) with constants along a non-batch axis (negative allowed)."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    inits = {}
    inputs = ["X"]
    for i in range(n_parts - 1):
        if data.draw(st.booleans()):
            inputs.append("X")
        else:
            shape = list(x_shape[1:])
            shape[axis - 1] = data.draw(st.integers(1, 3))
            inits[f"W{i}"] = rng.standard_normal(shape)
            inputs.append(f"W{i}")
    nodes = []
    if inits:  # constants get X's (dynamic) batch by Expand to Shape(X)[:1] + their shape
        nodes.append(node("Shape", ["X"], ["batch"], start=0, end=1))
    for name in list(inits):
        inits[name + "_dims"] = np.array(inits[name].shape, dtype=np.int64)
        nodes.append(node("Concat", ["batch", name + "_dims"], [name + "_shape"], axis=0))
        nodes.append(node("Expand", [name, name + "_shape"], [name + "_b"]))
        inputs[inputs.index(name)] = name + "_b"
    inputs = data.draw(st.permutations(inputs))
    attrs = dict(axis=axis - rank if data.draw(st.booleans()) else axis)
    check(Case([*nodes, node("Concat", inputs, **attrs)], rng.standard_normal(x_shape), inits), rng)


@FEW
@given(data=st.data(), x_shape=shapes(max_rank=4, min_side=2, max_side=5), seed=seeds,
       how=st.sampled_from(["sizes", "num_outputs"]))
def test_split(data, x_shape, seed, how):
    """Split by sizes (input) or num_outputs (opset 18, uneven last part); Y concatenates a
    random non-empty subset of the parts in random order, so unused parts get zero gradients."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    size = x_shape[axis]
    inits = {}
    if how == "sizes":
        cuts = sorted(data.draw(st.lists(st.integers(1, size - 1), max_size=3, unique=True)))
        sizes = np.diff([0, *cuts, size])
        inits["split"] = sizes.astype(np.int64)
        n_out, inputs, attrs = len(sizes), ["X", "split"], {}
    else:
        n_out = data.draw(st.integers(2, size))
        assume(-(-size // n_out) * (n_out - 1) < size)  # every part non-empty
        inputs, attrs = ["X"], {"num_outputs": n_out}
    parts = [f"P{i}" for i in range(n_out)]
    used = data.draw(st.lists(st.sampled_from(parts), min_size=1, unique=True))
    attrs["axis"] = axis - rank if data.draw(st.booleans()) else axis
    nodes = [node("Split", inputs, parts, **attrs), node("Concat", used, axis=axis)]
    check(Case(nodes, rng.standard_normal(x_shape), inits), rng)


@SOME
@given(data=st.data(), x_shape=shapes(max_rank=4, max_side=5), seed=seeds, give_axes=st.booleans(),
       give_steps=st.booleans())
def test_slice(data, x_shape, seed, give_axes, give_steps):
    """Unit-step slices: negative and out-of-range starts/ends (clamped), empty slices excluded,
    axes omitted or given (negative allowed), explicit unit steps."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    big = np.iinfo(np.int64).max
    if give_axes:
        axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, unique=True))
    else:
        axes = list(range(rank))
    starts, ends = [], []
    for a in axes:
        dim = x_shape[a]
        if a == 0:  # without axes the batch is sliced too: take all of it
            starts.append(0)
            ends.append(big)
            continue
        start = data.draw(st.integers(0, dim - 1))
        end = data.draw(st.integers(start + 1, dim))
        starts.append(data.draw(st.sampled_from([start, start - dim])))
        ends.append(data.draw(st.sampled_from([end, end - dim if end < dim else big, end + 3])))
    inits = {"starts": np.array(starts, dtype=np.int64), "ends": np.array(ends, dtype=np.int64)}
    inputs = ["X", "starts", "ends"]
    if give_axes or give_steps:
        inits["axes"] = np.array([a - rank if data.draw(st.booleans()) else a for a in axes], dtype=np.int64)
        inputs.append("axes")
    if give_steps:
        inits["steps"] = np.ones(len(axes), dtype=np.int64)
        inputs.append("steps")
    check(Case([node("Slice", inputs)], rng.standard_normal(x_shape), inits), rng)


@SOME
@given(data=st.data(), x_shape=shapes(max_rank=4, max_side=3), seed=seeds, value=st.sampled_from([None, 0.0, 1.5]),
       give_axes=st.booleans(), pad_batch=st.booleans())
def test_pad(data, x_shape, seed, value, give_axes, pad_batch):
    """Constant padding: pads as input, optional constant_value and axes (opset 18); padding the
    batch axis needs a static batch."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    if give_axes:
        axes = data.draw(st.lists(st.integers(0 if pad_batch else 1, rank - 1), min_size=1, unique=True))
    else:
        axes = list(range(rank))
    pads = [0 if (a == 0 and not pad_batch) else data.draw(st.integers(0, 2)) for a in axes * 2]
    inits = {"pads": np.array(pads, dtype=np.int64)}
    inputs = ["X", "pads"]
    if value is not None or give_axes:
        inputs.append("value" if value is not None else "")
        if value is not None:
            inits["value"] = np.array(value)
    if give_axes:
        inits["axes"] = np.array([a - rank if data.draw(st.booleans()) else a for a in axes], dtype=np.int64)
        inputs.append("axes")
    case = Case([node("Pad", inputs, mode="constant")], rng.standard_normal(x_shape), inits,
                batch_independent=not pad_batch, dynamic_batch=not pad_batch)
    check(case, rng)

@SOME
@given(data=st.data(), x_shape=shapes(min_rank=2, max_rank=4, max_side=4), seed=seeds,
       index_rank=st.integers(0, 2))
def test_gather(data, x_shape, seed, index_rank):
    """Gather with constant indices along a non-batch axis: scalar (x[:, 0], a ViT class token),
    1-D or 2-D indices, negative and repeated indices."""
    rng = np.random.default_rng(seed)
    rank = len(x_shape)
    axis = data.draw(st.integers(1, rank - 1))
    dim = x_shape[axis]
    index_shape = tuple(data.draw(st.integers(1, 3)) for _ in range(index_rank))
    indices = rng.integers(-dim, dim, size=index_shape).astype(np.int64)
    attrs = dict(axis=axis - rank if data.draw(st.booleans()) else axis)
    check(Case([node("Gather", ["X", "I"], **attrs)], rng.standard_normal(x_shape), {"I": indices}), rng)


# regressions: cases that failed before the rule was fixed


def test_slice_whole_dynamic_batch_axis():
    """Slice over all axes (no axes input) with 0..INT64_MAX on the dynamic batch, as exporters
    write x[:, 1:3]. Was: ExportError "slices a dynamic axis 0"."""
    rng = np.random.default_rng(0)
    inits = {"starts": np.array([0, 1], dtype=np.int64),
             "ends": np.array([np.iinfo(np.int64).max, 3], dtype=np.int64)}
    check(Case([node("Slice", ["X", "starts", "ends"])], rng.standard_normal((2, 4)), inits), rng)


TESTED_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Concat", "Split", "Slice",
              "Pad", "Gather"}
