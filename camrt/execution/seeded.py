"""Seeded runs: the forward pass once, a seed made from its outputs, then the backward pass on the
same activations, without a second forward.

A seeded file (`camrt export --seed`) starts its backward subgraph from the tensor
`contract.SEED_TENSOR`, computed in the file as the target path's one-hot. onnxruntime cannot feed
an inner tensor, so the file is cut there into two graphs:

- the forward graph: the score `camrt/logits`, the fetched outputs that do not depend on the seed
  (`camrt/act/<layer>`) and every forward tensor the backward nodes read (the boundary);
- the backward graph: inputs `camrt/seed` and the boundary, outputs the fetched gradients.

Boundary tensors with a batch axis are gathered by the seed rows' samples, so several seeds per
image (one map per (image, target)) cost one forward pass and one batched backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import contract
from ..errors import InputError, ModelError
from ..seeds.batch import SeedBatch
from .feature_layout import outputs_as_nchw
from .finite import check_finite
from .subgraphs import subgraph


@dataclass(frozen=True)
class SeededGraphs:
    """The file cut at its seed: two models and the names that flow between them."""

    forward: Any
    backward: Any
    #: Fetched outputs computed by the forward graph (they do not depend on the seed).
    forward_fetch: tuple[str, ...]
    #: Fetched outputs computed by the backward graph.
    backward_fetch: tuple[str, ...]
    #: Tensors the backward graph reads from the forward pass (graph inputs of the file included).
    boundary: tuple[str, ...]
    #: The boundary tensors (and fetched forward outputs) whose axis 0 is the batch.
    batched: frozenset[str]
    #: MaxPool Indices on the boundary (flat indices over the whole batch) -> the pooled tensor.
    flat_indices: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SeededPlan:
    """The two onnxruntime sessions of a fetch set."""

    graphs: SeededGraphs
    forward_session: Any
    backward_session: Any


def require_seed_entry(model, path: str) -> None:
    """ModelError unless the file's backward pass starts from `contract.SEED_TENSOR`."""
    if not any(contract.SEED_TENSOR in node.output for node in model.graph.node):
        raise ModelError(f"{path} has no seed entry ({contract.SEED_TENSOR!r}): re-export it with "
                         "`camrt export ... --seed` to explain segmentation, detection or embedding targets")


def _dependents(graph, sources: Iterable[str]) -> set[str]:
    """Tensors computed (transitively) from `sources`, those included; nodes are in topological order."""
    tainted = set(sources)
    for node in graph.node:
        if any(i in tainted for i in _reads(node)):
            tainted.update(o for o in node.output if o)
    return tainted


def _reads(node) -> list[str]:
    """The tensors a node reads, those of its control-flow subgraphs included."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for sub in [attr.g, *attr.graphs]:
            inner = {o for n in sub.node for o in n.output}
            names += [i for n in sub.node for i in n.input if i and i not in inner]
    return names


def _ancestor_nodes(nodes: list, wanted: Sequence[str], stop: set[str]) -> list:
    """The nodes needed to compute `wanted`, not looking behind the tensors in `stop`, in graph order."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    keep: set[int] = set()
    stack = [t for t in wanted if t not in stop]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        index = producer.get(name)
        if index is None or index in keep:
            continue
        keep.add(index)
        stack += [i for i in _reads(nodes[index]) if i not in stop]
    return [nodes[i] for i in sorted(keep)]


def _value_infos(model, names: Sequence[str], path: str) -> dict[str, Any]:
    """Type (and where known, shape) of each of `names`, from the file or ONNX shape inference."""
    import onnx

    graph = model.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output] if v.type.HasField("tensor_type")}
    missing = [n for n in names if n not in infos]
    if missing:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            infos.update({v.name: v for v in inferred.graph.value_info if v.name in missing})
        except Exception:  # inference is best effort; what stays unknown is reported below
            pass
    unknown = [n for n in names if n not in infos or not infos[n].type.tensor_type.elem_type]
    if unknown:
        raise ModelError(f"{path}: cannot tell the type of tensor(s) {unknown[:4]} that the backward pass reads "
                         "from the forward pass; re-export the model with `camrt export --seed`")
    return {n: infos[n] for n in names}


def _renamed(info, name: str):
    copy = type(info)()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def _has_batch_axis(info, batch_dim: str | None) -> bool:
    dims = info.type.tensor_type.shape.dim
    return bool(batch_dim) and len(dims) > 0 and dims[0].dim_param == batch_dim


def cut_at_seed(model, fetch: Sequence[str], constants: set[str], image_input: str,
                path: str = "<model>") -> SeededGraphs:
    """Cut `model` (a seeded contract file; initializers may be absent, named in `constants`) into
    the forward and backward graphs that compute `fetch` from a fed `camrt/seed`."""
    from onnx import helper

    require_seed_entry(model, path)
    graph = model.graph
    depends_on_seed = _dependents(graph, [contract.SEED_TENSOR])
    if contract.TARGET_INDEX_OUTPUT in fetch or any(f.startswith(contract.CAM_WEIGHTS_PREFIX) for f in fetch):
        raise InputError(f"{contract.TARGET_INDEX_OUTPUT!r} and CAM weights follow `camrt/target`, not a seed: "
                         "fetch them with a target run")
    backward_fetch = tuple(f for f in dict.fromkeys(fetch) if f in depends_on_seed)
    if not backward_fetch:
        raise InputError(f"a seeded run of {list(fetch)} has nothing to differentiate: fetch gradients "
                         f"({contract.GRADIENT_PREFIX}<layer>, {contract.INPUT_GRADIENT_PREFIX}<rules>), or run() "
                         "for forward outputs")
    forward_fetch = tuple(f for f in dict.fromkeys([contract.LOGITS_OUTPUT, *fetch]) if f not in depends_on_seed)
    nodes = list(graph.node)
    inputs = {i.name for i in graph.input}
    produced_forward = {o for n in _ancestor_nodes(nodes, forward_fetch, set(constants)) for o in n.output if o}
    # Tensors that depend on no graph input (Constant nodes: weights of files written by onnx.helper)
    # are recomputed by the backward graph, not passed over: they have no batch axis to slice.
    from_inputs = _dependents(graph, inputs)
    stop = set(constants) | (produced_forward & from_inputs) | inputs | {contract.SEED_TENSOR}
    backward_nodes = _ancestor_nodes(nodes, backward_fetch, stop)
    made_backward = {o for n in backward_nodes for o in n.output if o}
    boundary = tuple(dict.fromkeys(
        i for n in backward_nodes for i in _reads(n)
        if i not in made_backward and i not in constants and i != contract.SEED_TENSOR))
    infos = _value_infos(model, [*boundary, *forward_fetch, contract.LOGITS_OUTPUT], path)
    forward = subgraph(model, [*forward_fetch, *(b for b in boundary if b not in inputs)],
                       extra_outputs=[infos[b] for b in boundary if b not in inputs])
    seed_info = _renamed(infos[contract.LOGITS_OUTPUT], contract.SEED_TENSOR)
    backward_graph = helper.make_graph(
        backward_nodes, graph.name + "_backward", [seed_info, *(infos[b] for b in boundary)],
        [o for o in graph.output if o.name in backward_fetch],
        initializer=[i for i in graph.initializer if i.name in {r for n in backward_nodes for r in _reads(n)}],
        value_info=[v for v in graph.value_info if v.name in made_backward],
    )
    backward = helper.make_model(backward_graph, opset_imports=list(model.opset_import))
    backward.ir_version = model.ir_version
    image = next(i for i in graph.input if i.name == image_input)
    batch_dim = image.type.tensor_type.shape.dim[0].dim_param if image.type.tensor_type.shape.dim else None
    batched = frozenset(n for n in [*boundary, *forward_fetch] if _has_batch_axis(infos[n], batch_dim))
    flat_indices = {n.output[1]: n.input[0] for n in nodes
                    if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1] in batched}
    return SeededGraphs(forward, backward, forward_fetch, backward_fetch, boundary, batched, flat_indices)


def feed_seed(model):
    """A copy of a (full) seeded model whose `camrt/seed` is a graph input instead of computed: one
    run computes forward and backward for a seed known beforehand (the exporter's validation)."""
    import onnx

    require_seed_entry(model, "<model>")
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    graph = fed.graph
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == contract.SEED_TENSOR:
                node.output[i] = contract.SEED_TENSOR + "/target_path"
    logits = next(o for o in graph.output if o.name == contract.LOGITS_OUTPUT)
    graph.input.append(_renamed(logits, contract.SEED_TENSOR))
    return fed


def run_seeded(session, inputs: np.ndarray, make_seed: Callable[[dict[str, np.ndarray]], Any],
               fetch: Sequence[str], allow_zero_rows: bool = False) -> dict[str, np.ndarray]:
    """One forward pass of `inputs`, `make_seed(forward outputs)`, one backward pass of its rows.

    `session` is an ExplainSession; `make_seed` gets {"camrt/logits": ..., and the fetched outputs
    that do not depend on the seed} for the B inputs and returns a seed array [B, ...] (row b for
    sample b) or a `SeedBatch` of M rows. Returns every `fetch` output with one row per seed row,
    layer activations and gradients as [B, C, h, w] feature maps, as `ExplainSession.run` does
    (`feature_layout`; `make_seed` sees them in the file's layout). A seed row of zeros (L = 0, no
    gradient) is refused unless `allow_zero_rows` (further passes of a method, where L may be
    locally constant: zero gradients)."""
    plan = session.seeded_plan(fetch)
    graphs = plan.graphs
    x = session._model_input(session.check_inputs(inputs))
    if x.shape[0] == 0:
        raise InputError("empty batch")
    feeds = {session.info.input_name: x, contract.TARGET_INPUT: np.full(x.shape[0], contract.TOP1_TARGET)}
    needed = {i.name for i in plan.forward_session.get_inputs()}
    computed = [o.name for o in plan.forward_session.get_outputs()]
    values = dict(zip(computed, session._run_chunked(plan.forward_session,
                                                     {k: v for k, v in feeds.items() if k in needed}, computed)))
    values.update({k: v for k, v in feeds.items() if k in graphs.boundary})
    forward_outputs = {name: values[name] for name in graphs.forward_fetch}
    check_finite(forward_outputs, "the forward pass")
    seeds = _seed_batch(make_seed(dict(forward_outputs)), values[contract.LOGITS_OUTPUT], allow_zero_rows)
    rows = seeds.samples
    identity = len(rows) == x.shape[0] and np.array_equal(rows, np.arange(x.shape[0]))
    unbatched = [b for b in graphs.boundary if b not in graphs.batched]
    if unbatched and not identity:
        raise ModelError(f"{session.path}: the backward pass reads {unbatched[:4]} from the forward pass without a "
                         "known batch axis; give one seed per sample, in order")

    def per_seed_row(name: str) -> np.ndarray:
        if identity or name not in graphs.batched:
            return values[name]
        gathered = values[name][rows]
        if name in graphs.flat_indices:  # flat over the batch: row m's indices must point into row m
            pooled = values.get(graphs.flat_indices[name])
            if pooled is None:
                raise ModelError(f"{session.path}: the backward pass reads MaxPool indices {name!r} without the pooled "
                                 "tensor; give one seed per sample, in order")
            # both passes run in chunks of a static batch size, if the file has one: indices count within a chunk
            step = session.static_batch or max(len(rows), x.shape[0])
            shift = (np.arange(len(rows)) % step - rows % step) * pooled[0].size
            gathered = gathered + shift.reshape(-1, *[1] * (gathered.ndim - 1)).astype(gathered.dtype)
        return gathered

    results = {name: per_seed_row(name) for name in graphs.forward_fetch if name in fetch}
    backward_feeds = {contract.SEED_TENSOR: seeds.values, **{b: per_seed_row(b) for b in graphs.boundary}}
    batched_feeds = {k: v for k, v in backward_feeds.items() if k == contract.SEED_TENSOR or k in graphs.batched}
    fixed = {k: v for k, v in backward_feeds.items() if k not in batched_feeds}
    grads = session._run_chunked(plan.backward_session, batched_feeds, list(graphs.backward_fetch), fixed)
    results.update(zip(graphs.backward_fetch, grads))
    check_finite(results, "the seeded backward pass")
    values = {name: session._input_gradient_as_nchw(name, results[name]) for name in dict.fromkeys(fetch)}
    return outputs_as_nchw(values, session.info.layer_layouts)


def _seed_batch(made: Any, logits: np.ndarray, allow_zero_rows: bool = False) -> SeedBatch:
    """`made` as a float32 SeedBatch checked against the score's shape: one row per sample for an array."""
    seeds = made if isinstance(made, SeedBatch) else SeedBatch.one_per_sample(np.asarray(made))
    values = np.ascontiguousarray(seeds.values, dtype=logits.dtype)
    if values.shape[1:] != logits.shape[1:]:
        raise InputError(f"the seed rows have shape {values.shape[1:]}; the score {contract.LOGITS_OUTPUT!r} rows "
                         f"have {logits.shape[1:]}")
    if values.shape[0] == 0:
        raise InputError("no seed rows: nothing to explain")
    if seeds.samples.min() < 0 or seeds.samples.max() >= logits.shape[0]:
        raise InputError(f"seed sample indices {seeds.samples.tolist()} out of range for a batch of {logits.shape[0]}")
    if not np.isfinite(values).all():
        raise InputError("the seed holds NaN or inf")
    empty = np.flatnonzero(~values.reshape(values.shape[0], -1).any(axis=1))
    if empty.size and not allow_zero_rows:
        raise InputError(f"seed row(s) {empty.tolist()} are all zeros: L = 0 has no gradient (an empty region, "
                         "or no candidate matched)")
    return SeedBatch(values, seeds.samples)

