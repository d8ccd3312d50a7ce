"""Running a camrt file with onnxruntime: one session per set of fetched outputs.

onnxruntime itself is imported only when a session is created.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import contract
from ..errors import ContractError, InputError, ModelError, NonFiniteError, UsageError, first_line
from ..modelfile.checks import check_custom_ops, check_graph, load_checked_model, resolve_custom_op_libraries
from ..modelfile.layers import dims
from ..modelfile.metadata import read_contract
from ..modelfile.slicing import SlicedModel, Unsliceable
from ..targets import ClassTarget, Target
from .feature_layout import outputs_as_nchw
from .finite import check_finite
from .float_types import IMAGE_TYPES, as_float32, in_session_types
from .seeded import SeededPlan, cut_at_seed, run_seeded
from .subgraphs import TailPlan, subgraph, tail_graphs

DEVICES = ("auto", "cpu", "cuda")
#: onnxruntime's graph optimisation levels by camrt's names. "all" (onnxruntime's default) includes
#: the NCHWc layout transform, whose CPU convolution kernels round differently: on ill-conditioned
#: methods and layers (XGrad-CAM on a signed layer) "extended" gives maps closer to a float64 run,
#: for a longer run time (bench/graph_optimization.py).
GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "none")


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return (RuntimeError, *(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type)))


class ExplainSession:
    """onnxruntime sessions over a camrt contract file, one per set of fetched outputs.

    onnxruntime executes every node of a graph whatever outputs a run asks for, so a Grad-CAM run
    on a file that also carries input gradients would pay for them. Each fetch set therefore gets
    a session of the subgraph that computes it (made on first use, then cached). `run()` is
    thread-safe (onnxruntime's `InferenceSession.run` is); sessions are created under a lock.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 custom_op_libraries: Sequence[str | os.PathLike] | None = None,
                 graph_optimization: str = "all"):
        """custom_op_libraries: shared libraries registered with onnxruntime, which also allows
        nodes of custom op domains; None: from $CAMRT_CUSTOM_OP_LIBRARIES (os.pathsep-separated).
        graph_optimization: onnxruntime's optimisation level (`GRAPH_OPTIMIZATIONS`)."""
        self.path = os.fspath(path)
        if device not in DEVICES:
            raise UsageError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        if graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise UsageError(f"unknown graph_optimization {graph_optimization!r}; choose one of "
                             f"{', '.join(GRAPH_OPTIMIZATIONS)}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.info = read_contract(self.path)
        self.device = device

        import onnxruntime as ort

        from ..plugins import get_plugin_manager

        available = ort.get_available_providers()
        providers = get_plugin_manager().hook.choose_execution_providers(device=device, available=available)
        if not providers:
            providers = ["CPUExecutionProvider"]
        if device == "cuda" and all(_provider_name(p) == "CPUExecutionProvider" for p in providers):
            raise UsageError(
                "--device cuda: this onnxruntime has no GPU provider (available: "
                f"{', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
        self.providers = [_provider_name(p) for p in providers]
        self._providers = providers
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3  # errors only: keep the CLI's stderr for camrt's messages
        level = ort.GraphOptimizationLevel
        self._options.graph_optimization_level = {
            "all": level.ORT_ENABLE_ALL, "extended": level.ORT_ENABLE_EXTENDED,
            "basic": level.ORT_ENABLE_BASIC, "none": level.ORT_DISABLE_ALL}[graph_optimization]
        if threads is not None:
            self._options.intra_op_num_threads = threads
        libraries = resolve_custom_op_libraries(custom_op_libraries)
        for library in libraries:
            try:
                self._options.register_custom_ops_library(library)
            except _ort_errors() as exc:
                raise UsageError(f"cannot load the custom-op library {library}: {first_line(exc)}") from None
        #: The file with its initializers left as bytes (camrt.modelfile.slicing: no copy of the weights
        #: through Python), or None when it keeps them as external data; then `_model` holds them,
        #: loaded by `load_checked_model` (external data confined to the model's folder).
        self._sliced: SlicedModel | None = None
        self._full: Any = None
        try:
            self._sliced = SlicedModel(self.path)
        except Unsliceable:
            self._model = self._full = load_checked_model(self.path, allow_custom_ops=bool(libraries))
        except Exception as exc:  # protobuf and onnx raise unrelated types for damaged files
            raise ModelError(f"{self.path}: cannot load this camrt file: {first_line(exc)}") from None
        else:
            self._model = self._sliced.model
            check_custom_ops(self._model, self.path, bool(libraries))
            check_graph(self._model, self._sliced.initializers, self.path)
        #: fetch set -> session; ("tail", layer) -> TailPlan.
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

        graph = self._model.graph
        initializers = set(self._sliced.initializers) if self._sliced else {i.name for i in graph.initializer}
        inputs = {i.name: dims(i) or () for i in graph.input if i.name not in initializers}
        for needed in (self.info.input_name, contract.TARGET_INPUT):
            if needed not in inputs:
                raise ContractError(f"{self.path}: the graph has no input {needed!r}; re-export the model with `camrt export`")
        #: The image input's shape as callers give it: NCHW, whatever the file's layout.
        self.input_shape = _as_nchw(inputs[self.info.input_name], self.info.preprocessing.layout)
        self._check_image_input(next(i for i in graph.input if i.name == self.info.input_name))
        outputs = {o.name: dims(o) or () for o in graph.output}
        self.output_names: tuple[str, ...] = tuple(outputs)
        for needed in (contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT):
            if needed not in outputs:
                raise ContractError(f"{self.path}: the graph has no output {needed!r}; re-export the model with `camrt export`")
        logits_shape = outputs[contract.LOGITS_OUTPUT]
        # [B, classes], or [B, C, ...] in a seeded file (segmentation, detection heads): axis 1 is the class axis
        classes = logits_shape[1] if len(logits_shape) == 2 or (self.info.seed and len(logits_shape) > 2) else None
        if not isinstance(classes, int) or classes < 1:
            raise ContractError(f"{self.path}: {contract.LOGITS_OUTPUT!r} has no static number of classes ({logits_shape})")
        self.num_classes: int = classes
        #: The score's shape as the graph declares it ([B, classes]; seeded files: [B, C, ...] of any rank).
        self.score_shape: tuple = tuple(logits_shape)
        batch = self.input_shape[0] if self.input_shape else None
        #: The graph's batch size when it is static (the file then runs in chunks of it), else None.
        self.static_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None

    def _check_image_input(self, value_info) -> None:
        """The image input must be float32 or float16, rank 4 and agree with the preprocessing metadata
        (`input_shape`: its shape in NCHW order)."""
        from onnx import TensorProto

        elem_type = value_info.type.tensor_type.elem_type
        if elem_type not in IMAGE_TYPES:
            raise ContractError(
                f"{self.path}: the image input {value_info.name!r} is {TensorProto.DataType.Name(elem_type).lower()}; "
                "camrt feeds float32 or float16 images: export a float model with `camrt export`"
            )
        p = self.info.preprocessing
        shape = self.input_shape
        if len(shape) != 4 or any(isinstance(want, int) and want != got
                                  for want, got in zip(shape[1:], (p.channels, p.height, p.width))):
            raise ContractError(
                f"{self.path}: the image input {value_info.name!r} has shape {shape} but the preprocessing metadata "
                f"says [N, {p.channels}, {p.height}, {p.width}] (NCHW order, file layout {p.layout}); re-export the "
                "model with `camrt export`"
            )

    def prepare(self, fetch: Sequence[str], extend: Callable[[Any], Any] | None = None, name: str = ""):
        """The onnxruntime session of the subgraph computing `fetch` (created once, then cached).

        extend: a function of the pruned ONNX model returning the model the session runs (e.g.
        `camrt.execution.heatmap_graph.heatmap_model`), cached under `name` next to `fetch`."""
        key = tuple(sorted(set(fetch))) + ((f"extended:{name}",) if extend is not None else ())
        session = self._sessions.get(key)
        if session is not None:
            return session
        missing = [n for n in set(fetch) if n not in self.output_names]
        if missing:
            raise ModelError(f"{self.path} has no output(s) {sorted(missing)}; re-export it with `camrt export`")
        import onnxruntime as ort

        with self._lock:
            if key not in self._sessions:
                pruned = subgraph(self._model, sorted(set(fetch)))
                serialized = self._serialize(extend(pruned) if extend is not None else pruned)
                try:
                    self._sessions[key] = ort.InferenceSession(serialized, sess_options=self._options,
                                                               providers=self._providers)
                except _ort_errors() as exc:
                    raise ModelError(f"{self.path}: onnxruntime cannot load this camrt file: {first_line(exc)}") from None
                self.providers = list(self._sessions[key].get_providers())
            return self._sessions[key]

    def _serialize(self, model) -> bytes:
        """A model derived from `_model`, with the initializers it reads, as bytes for onnxruntime."""
        return self._sliced.serialize(model) if self._sliced else model.SerializeToString()

    def _full_model(self):
        """The whole ONNX model, initializers parsed (loaded on first use: the tail graphs need it)."""
        if self._full is None:
            import onnx

            self._full = onnx.load(self.path)
        return self._full

    def __repr__(self) -> str:
        return f"ExplainSession({self.path!r}, providers={self.providers})"

    # -- checks --------------------------------------------------------------------------
    def check_inputs(self, inputs: Any) -> np.ndarray:
        array = np.asarray(inputs)
        if array.ndim != 4:
            raise InputError(f"model input must be NCHW (4 dimensions), got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"model input must be float32 NCHW, got dtype {array.dtype}")
        finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1) if array.size else np.ones(0, bool)
        if not finite.all():
            rows = np.flatnonzero(~finite).tolist()
            raise NonFiniteError(f"model input row(s) {rows} hold NaN or inf; give finite pixel values", rows)
        for axis, (want, got) in enumerate(zip(self.input_shape, array.shape)):
            if axis and isinstance(want, int) and want != got:
                raise InputError(f"model input has shape {array.shape}; {self.path} expects {self.input_shape}")
        return np.ascontiguousarray(array, dtype=np.float32)

    # -- running -------------------------------------------------------------------------
    def run(self, inputs: np.ndarray, targets: Any, fetch: Sequence[str], session=None,
            fixed: Mapping[str, np.ndarray] | None = None, file_layout: bool = False) -> dict[str, np.ndarray]:
        """Run forward (and backward) once; return only the `fetch` outputs, layer activations and
        gradients as [B, C, h, w] feature maps (`feature_layout`).

        targets: a `camrt.targets.Target`, or one class index per input (-1: top-1);
        session: one made by `prepare(..., extend=...)` (default: the pruned subgraph of `fetch`);
        fixed: its feeds without a batch axis; file_layout: layer outputs in the file's layout instead."""
        x = self.check_inputs(inputs)
        target = targets if isinstance(targets, Target) else ClassTarget(targets)
        target_feeds = target.feeds(x.shape[0], self.num_classes)
        fetch = list(dict.fromkeys(fetch))
        session = session or self.prepare(fetch)
        if x.shape[0] == 0:
            raise InputError("empty batch")
        feeds = {self.info.input_name: self._model_input(x), **target_feeds}
        needed = {i.name for i in session.get_inputs()}
        values = self._run_chunked(session, {k: v for k, v in feeds.items() if k in needed}, fetch, fixed)
        check_finite(dict(zip(fetch, values)), "the model")
        values = {name: self._input_gradient_as_nchw(name, value) for name, value in zip(fetch, values)}
        return values if file_layout else outputs_as_nchw(values, self.info.layer_layouts)

    # -- the image layout: methods see NCHW inputs and input gradients -------------------
    def _model_input(self, x: np.ndarray) -> np.ndarray:
        """The checked NCHW batch `x` in the layout of the file's image input."""
        if self.info.preprocessing.layout == contract.LAYOUT_NHWC:
            return np.ascontiguousarray(x.transpose(contract.NCHW_TO_NHWC))
        return x

    def _input_gradient_as_nchw(self, name: str, value: np.ndarray) -> np.ndarray:
        """An input-gradient output (shaped like the image input) in NCHW; other outputs as they are."""
        if self.info.preprocessing.layout == contract.LAYOUT_NHWC and name.startswith(contract.INPUT_GRADIENT_PREFIX):
            return np.ascontiguousarray(value.transpose(contract.NHWC_TO_NCHW))
        return value

    # -- seeded runs: forward once, the seed from its outputs, backward on the same activations --
    def seeded_plan(self, fetch: Sequence[str]) -> "SeededPlan":
        """The cached forward and backward sessions of a seeded run fetching `fetch`
        (camrt.execution.seeded)."""
        key = ("seeded", *sorted(set(fetch)))
        plan = self._sessions.get(key)
        if plan is not None:
            return plan
        missing = [n for n in set(fetch) if n not in self.output_names]
        if missing:
            raise ModelError(f"{self.path} has no output(s) {sorted(missing)}; re-export it with `camrt export`")
        import onnxruntime as ort

        constants = set(self._sliced.initializers) if self._sliced else {i.name for i in self._model.graph.initializer}
        with self._lock:
            if key not in self._sessions:
                graphs = cut_at_seed(self._model, list(fetch), constants, self.info.input_name, self.path)
                try:
                    sessions = [ort.InferenceSession(self._serialize(model), sess_options=self._options,
                                                     providers=self._providers)
                                for model in (graphs.forward, graphs.backward)]
                except _ort_errors() as exc:
                    raise ModelError(f"{self.path}: onnxruntime cannot load the seeded graphs: {first_line(exc)}") from None
                self._sessions[key] = SeededPlan(graphs, *sessions)
            return self._sessions[key]

    def run_seeded(self, inputs: np.ndarray, make_seed: Callable[[dict[str, np.ndarray]], Any],
                   fetch: Sequence[str], allow_zero_rows: bool = False) -> dict[str, np.ndarray]:
        """Forward once, `make_seed(forward outputs)` -> seed (an array [B, ...] or a
        `camrt.seeds.SeedBatch` of M rows), then the backward pass on the same activations; returns
        the `fetch` outputs, one row per seed row (camrt.execution.seeded.run_seeded; seed rows of
        zeros are refused unless `allow_zero_rows`)."""
        return run_seeded(self, inputs, make_seed, fetch, allow_zero_rows)

    # -- the tail graph: from a layer's activations to the logits (Ablation-CAM) ---------
    def layer_tensor(self, layer: str) -> str:
        """The graph tensor behind ``camrt/act/<layer>`` (the input of that Identity node)."""
        name = contract.activation_output(layer)
        for node in self._model.graph.node:
            if name in node.output:
                if node.op_type != "Identity" or not node.input:
                    raise ContractError(f"{self.path}: {name!r} is not an Identity of the layer's tensor; "
                                        "re-export the model with `camrt export`")
                return node.input[0]
        raise ModelError(f"{self.path} has no layer {layer!r} (no output {name!r}); "
                         f"re-export it with `camrt export ... --layer {layer}`")

    def tail_plan(self, layer: str) -> "TailPlan":
        """The cached tail of `layer`: a session of the forward nodes between the layer's tensor and
        ``camrt/logits``, with the layer's tensor as a graph input.

        Tensors the tail reads that do not depend on the layer (skip connections that start before
        it) become further inputs, ``side`` names, computed by a forward pass (`tail_side_tensors`).
        Raises ModelError when the logits do not depend on the layer at all.
        """
        key = ("tail", layer)
        plan = self._sessions.get(key)
        if plan is not None:
            return plan
        import onnxruntime as ort

        tensor = self.layer_tensor(layer)
        with self._lock:
            if key not in self._sessions:
                tail, side_model, side = tail_graphs(self._full_model(), tensor, contract.LOGITS_OUTPUT, self.path, layer)
                try:
                    session = ort.InferenceSession(tail.SerializeToString(), sess_options=self._options,
                                                   providers=self._providers)
                    side_session = (ort.InferenceSession(side_model.SerializeToString(), sess_options=self._options,
                                                         providers=self._providers) if side_model is not None else None)
                except _ort_errors() as exc:
                    raise ModelError(f"{self.path}: onnxruntime cannot load the tail graph of layer {layer!r}: "
                                     f"{first_line(exc)}") from None
                self._sessions[key] = TailPlan(layer, tensor, tuple(side), session, side_session)
            return self._sessions[key]

    def tail_side_tensors(self, layer: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The tensors besides the layer's that the tail of `layer` reads, for model inputs `inputs`
        (one forward pass; empty, and no pass, when the layer dominates every path to the logits)."""
        plan = self.tail_plan(layer)
        if not plan.side:
            return {}
        x = self._model_input(self.check_inputs(inputs))
        direct = {name: x for name in plan.side if name == self.info.input_name}
        computed = [name for name in plan.side if name not in direct]
        if computed:
            values = self._run_chunked(plan.side_session, {self.info.input_name: x}, computed)
            direct.update(zip(computed, values))
        return direct

    def run_tail(self, layer: str, activations: np.ndarray, side: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """``camrt/logits`` [N, classes] computed from the layer's (edited) activations [N, ...].

        `side`: the plan's side tensors, one row per activation row (see `tail_side_tensors`)."""
        plan = self.tail_plan(layer)
        acts = np.ascontiguousarray(activations, dtype=np.float32)
        if acts.ndim < 1 or acts.shape[0] == 0:
            raise InputError(f"tail of layer {layer!r}: empty batch of activations")
        feeds = {plan.tensor: acts}
        for name in plan.side:
            if side is None or name not in side:
                raise ModelError(f"the tail of layer {layer!r} also reads {name!r} (a connection that starts before "
                                 "the layer); pass it in `side` (ExplainSession.tail_side_tensors)")
            value = np.asarray(side[name])
            if value.shape[0] != acts.shape[0]:
                raise InputError(f"tail of layer {layer!r}: side tensor {name!r} has {value.shape[0]} rows "
                                 f"for {acts.shape[0]} activation rows")
            feeds[name] = value
        logits = self._run_chunked(plan.session, feeds, [contract.LOGITS_OUTPUT])[0]
        check_finite({contract.LOGITS_OUTPUT: logits}, f"the tail of layer {layer!r}")
        return logits

    def _run_chunked(self, session, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                     fixed: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Run `session` on batched feeds, in chunks of the static batch size when the file has one.

        fixed: feeds without a batch axis, given whole to every chunk."""
        rows = next(iter(feeds.values())).shape[0]
        step = self.static_batch or rows
        parts = []
        for start in range(0, rows, step):
            chunk = {k: v[start:start + step] for k, v in feeds.items()}
            real = next(iter(chunk.values())).shape[0]
            if real < step:  # a static-batch graph: pad the last chunk, drop the padding after
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - real, axis=0)]) for k, v in chunk.items()}
            try:
                values = as_float32(session.run(list(fetch), in_session_types(session, {**chunk, **(fixed or {})})))
            except _ort_errors() as exc:
                raise ModelError(f"{self.path}: onnxruntime failed to run the model: {first_line(exc)}") from None
            # only padding is dropped: an output whose axis 0 is not the batch (a detector's flattened
            # [batch * anchors, 4] boxes, passed to a seeded backward graph) stays whole
            parts.append([v[:real] for v in values] if real < step else values)
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(fetch))]


def _as_nchw(shape: tuple[int | str | None, ...], layout: str) -> tuple[int | str | None, ...]:
    """A rank-4 image-input shape of `layout`, reordered to NCHW (other ranks unchanged)."""
    if layout == contract.LAYOUT_NHWC and len(shape) == 4:
        return tuple(shape[axis] for axis in contract.NHWC_TO_NCHW)
    return shape


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)
