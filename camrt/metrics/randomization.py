"""The model-parameter randomization sanity check.

Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018,
sec. 3.1 (cascading randomization): the model's weights are re-initialised layer by layer from the
output towards the input, and the maps of the randomized models are compared with the original
ones by Spearman rank correlation. A method whose maps do not change (an edge detector) cannot be
explaining the model: low correlation is what a faithful method should show.

camrt works on the contract file itself: the parameter layers are the Conv, ConvTranspose, Gemm
and MatMul nodes that compute ``camrt/logits`` with an initializer as their weight; cascade depth k
re-initialises the weight and bias (a MatMul's: the Add after it) of the last k of them (in graph order) with values drawn from
N(0, std of the original tensor) (``numpy.random.default_rng((seed, layer position))``; a tensor
of one repeated value is kept). BatchNormalization statistics are kept. The gradient subgraph
reads some weights through constants the exporter derived from them (a Conv's flipped, transposed
kernel, a MatMul's transposed operand): those are found by value (same multiset of values, the
exporter's transform) and replaced by the same transform of the new weights, so that gradients
stay those of the randomized model; a constant that holds a weight's values under an unknown
transform is an error rather than a silent mismatch, and so is a constant of the weight's shape
that is no known transform of any weight (a rule set that derives constants from the weights, as
LRP's positive parts): only the constants that the method's outputs read count.

For each depth in ``stages`` evenly spaced checkpoints (the last: every layer), the same method,
options, layers and target classes explain the images with the randomized file; the Spearman
correlation (average ranks for ties) of each map with the original one is reported, and
``randomization_spearman`` is the one at full randomization (None when a map is constant).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import contract
from ..errors import InputError, ModelError
from ..hookspecs import hookimpl
from .base import LOWER, EvalBatch, Metric

PARAMETER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0 of a 1-D array, ties sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    mean_rank = (starts[:-1] + starts[1:] - 1) / 2
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, np.diff(starts))
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two maps; None when either is constant."""
    ra, rb = average_ranks(np.ravel(a)), average_ranks(np.ravel(b))
    ra -= ra.mean()
    rb -= rb.mean()
    norm = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else None


def _conv_backward_kernel(weight: np.ndarray, group: int) -> np.ndarray:
    """The exporter's stride-1 Conv backward kernel: grouped transpose, spatially flipped."""
    m, c_per_group, *kernel = weight.shape
    grouped = weight.reshape(group, m // group, c_per_group, *kernel)
    transposed = np.swapaxes(grouped, 1, 2).reshape(group * c_per_group, m // group, *kernel)
    return transposed[(slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)]


def _transforms(node, name: str, value: np.ndarray):
    """How camrt's backward rules may derive a constant from `value`: a copy, a MatMul's transposed
    operand, a stride-1 Conv's backward kernel."""
    yield lambda w: w
    if value.ndim >= 2:
        yield lambda w: np.swapaxes(w, -1, -2)
    if node.op_type == "Conv" and name == node.input[1] and value.ndim >= 3:
        group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        yield lambda w: _conv_backward_kernel(w, group)


class Cascade:
    """The parameter layers of a contract file and its cascading randomization."""

    def __init__(self, path: str, fetch: Sequence[str] | None = None):
        """fetch: the outputs a method reads (None: every graph output); constants that only other
        outputs read do not matter to it."""
        import onnx
        from onnx import numpy_helper

        self.model = onnx.load(path)
        graph = self.model.graph
        self.initializers = {i.name: i for i in graph.initializer}
        forward_nodes = _ancestors(graph, [contract.LOGITS_OUTPUT])
        #: Parameter nodes, last first: the cascade order.
        self.layers = [n for n in reversed(forward_nodes)
                       if n.op_type in PARAMETER_OPS and len(n.input) > 1 and n.input[1] in self.initializers]
        consumers: dict[str, list[Any]] = {}
        for node in forward_nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        #: Per layer: its weight and bias initializers (a MatMul's bias is the Add that follows it).
        self.parameters: list[list[str]] = []
        for node in self.layers:
            names = [n for n in node.input[1:3] if n in self.initializers]
            after = consumers.get(node.output[0], [])
            if node.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add":
                names += [n for n in after[0].input if n in self.initializers]
            self.parameters.append(names)
        if not self.layers:
            raise ModelError(f"{path}: no Conv/Gemm/MatMul with weights computes {contract.LOGITS_OUTPUT!r}; "
                             "nothing to randomize")
        forward_inputs = {i for n in forward_nodes for i in n.input}
        fetched = _ancestors(graph, list(fetch) if fetch is not None else [o.name for o in graph.output])
        read = {i for n in fetched for i in n.input}
        self._derived_pool = {name: numpy_helper.to_array(init) for name, init in self.initializers.items()
                              if name not in forward_inputs and name in read}
        self.path = path
        self._followed: set[str] | None = None

    def _derived(self, node, name: str, value: np.ndarray) -> list[tuple[str, Any]]:
        """Backward-only constants holding `value`'s numbers: (name, transform) for each."""
        found = []
        ordered = None
        for other, candidate in self._derived_pool.items():
            if candidate.size != value.size or candidate.dtype != value.dtype:
                continue
            ordered = np.sort(value, axis=None) if ordered is None else ordered
            if not np.array_equal(np.sort(candidate, axis=None), ordered):
                continue
            match = next((fn for fn in _transforms(node, name, value)
                          if fn(value).shape == candidate.shape and np.array_equal(fn(value), candidate)), None)
            if match is None:
                raise ModelError(
                    f"{self.path}: initializer {other!r} of the gradient graph holds the values of {name!r} "
                    f"(node {node.name!r}) under a transform camrt does not know; the randomized file "
                    "would compute wrong gradients, so the randomization check cannot run on it")
            found.append((other, match))
        return found

    def _check_no_stale_copy(self, node, name: str, value: np.ndarray) -> None:
        """ModelError when the gradient graph reads a constant shaped like weight `name` (or like one
        of its known transforms) that is no known transform of any weight: a rule set that derives
        constants from the weights (LRP's positive parts, a gamma-modified kernel) would keep the
        original model's in the randomized file."""
        from onnx import numpy_helper

        if value.ndim < 2:
            return
        if self._followed is None:
            self._followed = {other for layer, names in zip(self.layers, self.parameters) for weight in names
                              for other, _ in self._derived(layer, weight,
                                                            numpy_helper.to_array(self.initializers[weight]))}
        shapes = {fn(value).shape for fn in _transforms(node, name, value)}
        stale = [other for other, candidate in self._derived_pool.items()
                 if candidate.shape in shapes and other not in self._followed]
        if stale:
            raise ModelError(
                f"{self.path}: the gradient graph of this method reads {stale[0]!r}, shaped like the weights "
                f"{name!r} of node {node.name!r} but derived from them in a way camrt cannot redo (e.g. a rule set "
                "that keeps the positive part of the weights, as LRP's do); the randomized file would keep the "
                "original model's, so the randomization check cannot run for this method")

    def write_stages(self, depths: list[int], folder: str, seed: int) -> list[str]:
        """Files with the last `depth` layers randomized, for each depth (ascending)."""
        import onnx
        from onnx import numpy_helper

        paths = []
        done = 0
        for depth in depths:
            for position in range(done, depth):
                node = self.layers[position]
                rng = np.random.default_rng((seed, position))
                for name in self.parameters[position]:
                    value = numpy_helper.to_array(self.initializers[name])
                    spread = float(value.std())
                    if spread == 0.0:
                        continue
                    self._check_no_stale_copy(node, name, value)
                    derived = self._derived(node, name, value)
                    fresh = rng.normal(0.0, spread, value.shape).astype(value.dtype)
                    self.initializers[name].CopyFrom(numpy_helper.from_array(fresh, name))
                    for other, transform in derived:
                        self.initializers[other].CopyFrom(
                            numpy_helper.from_array(np.ascontiguousarray(transform(fresh)), other))
            done = depth
            path = os.path.join(folder, f"randomized-{depth}.onnx")
            onnx.save(self.model, path)
            paths.append(path)
        return paths


def _ancestors(graph, outputs: list[str]) -> list[Any]:
    """The nodes that `outputs` depend on, in graph order."""
    nodes = list(graph.node)
    producer = {o: position for position, n in enumerate(nodes) for o in n.output}
    found, stack = set(), list(outputs)
    while stack:
        position = producer.get(stack.pop())
        if position is not None and position not in found:
            found.add(position)
            stack.extend(i for i in nodes[position].input if i)
    return [nodes[position] for position in sorted(found)]


@dataclass(frozen=True)
class RandomizationOptions:
    """stages: cascade depths evaluated, evenly spaced, the last randomizing every layer; seed: of the new weights."""

    stages: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")


class ModelRandomization(Metric):
    """Model-randomization sanity check (Adebayo et al., NeurIPS 2018): Spearman correlation of the maps before and after cascading re-initialisation of the weights; lower is better."""

    name = "randomization"
    aliases = ("sanity", "model-randomization")
    fields = {"randomization_spearman": LOWER}
    Options = RandomizationOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._folder: tempfile.TemporaryDirectory | None = None
        #: (model, the method's outputs) -> depths, names, files
        self._stages: dict[tuple[str, tuple[str, ...]], tuple[list[int], list[str], list[str]]] = {}
        self._explainers: tuple[Any, list[Any]] | None = None  # (original explainer, one per stage)

    def _stage_files(self, path: str, fetch: Sequence[str]) -> tuple[list[int], list[str], list[str]]:
        key = (path, tuple(fetch))
        if key not in self._stages:
            cascade = Cascade(path, fetch)
            count = len(cascade.layers)
            stages = min(self.options.stages, count)
            # from the last layer alone to every layer; one stage: every layer
            depths = sorted({int(round(d)) for d in np.linspace(1, count, stages)}) if stages > 1 else [count]
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="camrt-randomization-")
            folder = tempfile.mkdtemp(dir=self._folder.name)
            files = cascade.write_stages(depths, folder, self.options.seed)
            self._stages[key] = (depths, [cascade.layers[d - 1].name or cascade.layers[d - 1].output[0]
                                            for d in depths], files)
        return self._stages[key]

    def evaluate(self, batch: EvalBatch) -> list[dict[str, Any]]:
        if batch.explainer is None or batch.reexplainer is None:
            raise ModelError("the randomization check needs the method's Explainer (run it through camrt eval)")
        depths, names, files = self._stage_files(batch.explainer.session.path, batch.explainer.fetch)
        if self._explainers is None or self._explainers[0] is not batch.explainer:
            self._explainers = (batch.explainer, [batch.reexplainer(path) for path in files])
        maps = [self._stage_maps(explainer, depth, batch) for depth, explainer in zip(depths, self._explainers[1])]
        results = []
        for i in range(len(batch)):
            cascade = [{"layers": depth, "last": name, "spearman": spearman(batch.heatmaps[i], stage[i])}
                       for depth, name, stage in zip(depths, names, maps)]
            results.append({"randomization_spearman": cascade[-1]["spearman"], "randomization_cascade": cascade})
        return results

    @staticmethod
    def _stage_maps(explainer: Any, depth: int, batch: EvalBatch) -> np.ndarray:
        try:
            results = explainer.explain(batch.inputs, targets=[int(t) for t in batch.targets])
        except InputError as exc:  # e.g. relevance that overflows float32 in a random network
            raise InputError(f"the model with its last {depth} parameter layers randomized: {exc}") from exc
        return np.stack([r.heatmap for r in results])

    def close(self) -> None:
        self._explainers = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
        self._stages.clear()


@hookimpl
def register_metrics(register):
    register(ModelRandomization)
