"""Open a camrt contract file: check it, read its metadata, run it with onnxruntime.

The metadata is read straight from the file's top-level protobuf fields (`read_contract`), so the
contract version is checked before onnxruntime sees the graph and without importing `onnx`.
onnxruntime itself is imported only when a session is created.

Hostile files: the graph is loaded without its external data first; every tensor that keeps its
data in another file must name a file inside the model's folder (no absolute path, no `..`, no
symbolic link out of the folder), checked before any of it is read. Nodes of custom op domains
(which need a custom-op library) are refused unless libraries are given (`custom_op_libraries`
or ``CAMRT_CUSTOM_OP_LIBRARIES``); the graph must then pass `onnx.checker` before onnxruntime
sees it.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import contract
from .errors import ContractError, InputError, ModelError, NonFiniteError, UsageError, require_regular_file
from .float_types import IMAGE_TYPES, as_float32, in_session_types

DEVICES = ("auto", "cpu", "cuda")
#: onnxruntime's graph optimisation levels by camrt's names. "all" (onnxruntime's default) includes
#: the NCHWc layout transform, whose CPU convolution kernels round differently: on ill-conditioned
#: methods and layers (XGrad-CAM on a signed layer) "extended" gives maps closer to a float64 run,
#: for a longer run time (bench/graph_optimization.py).
GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "none")
#: Op domains onnxruntime implements itself; any other domain needs a custom-op library.
BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: Built-in-domain ops that make onnxruntime read files named in the model (execution-provider caches).
FILE_READING_OPS = frozenset({("com.microsoft", "EPContext")})
CUSTOM_OP_LIBRARIES_ENV = "CAMRT_CUSTOM_OP_LIBRARIES"

# --- reading metadata_props without parsing the graph -------------------------------------
# ModelProto field numbers (onnx.proto3): 1 ir_version, 7 graph, 14 metadata_props;
# StringStringEntryProto: 1 key, 2 value.
_IR_VERSION_FIELD = 1
_GRAPH_FIELD = 7
_METADATA_FIELD = 14
_MAX_MODEL_FIELD = 32


class _NotProtobuf(ValueError):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotProtobuf("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """Yield (field number, wire type, value) of one message; LEN values are (start, stop)."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _NotProtobuf("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise _NotProtobuf(f"wire type {wire}")
        if pos > end:
            raise _NotProtobuf("field runs past the end")
        yield number, wire, value


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata_props` of an ONNX file. Raises ModelError when the file is not ONNX."""
    path = require_regular_file(path, ModelError)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise ModelError(f"{path}: not an ONNX file (the file is empty)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _scan_model(buf, size, path)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc


def _scan_model(buf, size: int, path: str) -> dict[str, str]:
    metadata: dict[str, str] = {}
    seen: set[int] = set()
    try:
        for number, wire, value in _fields(buf, 0, size):
            if number > _MAX_MODEL_FIELD:
                raise _NotProtobuf(f"unknown field {number}")
            seen.add(number)
            if number == _METADATA_FIELD and wire == 2:
                key = val = ""
                for sub, sub_wire, span in _fields(buf, *value):
                    if sub_wire == 2 and sub in (1, 2):
                        text = bytes(buf[span[0]:span[1]]).decode("utf-8")
                        key, val = (text, val) if sub == 1 else (key, text)
                metadata[key] = val
    except (_NotProtobuf, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not an ONNX file (it does not parse as an ONNX model: {exc})") from None
    if _IR_VERSION_FIELD not in seen or _GRAPH_FIELD not in seen:
        raise ModelError(f"{path}: not an ONNX file (no ir_version or graph field)")
    return metadata


def _json(meta: Mapping[str, str], key: str, path: str, default: Any = None, required: bool = False) -> Any:
    if key not in meta:
        if required:
            raise ContractError(f"{path}: the camrt metadata lacks {key!r}; re-export the model with `camrt export`")
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path}: metadata {key!r} is not valid JSON ({exc}); re-export the model with `camrt export`") from None


#: Largest model input side the runtime accepts from metadata (a bound on what a file can make it allocate).
MAX_INPUT_SIDE = 16384


def _preprocessing_problem(p: contract.Preprocessing) -> str | None:
    """What is wrong with preprocessing read from a file, or None."""
    for name in ("height", "width"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INPUT_SIDE:
            return f"{name} {value!r} is not an integer in 1..{MAX_INPUT_SIDE}"
    for name in ("mean", "std"):
        values = getattr(p, name)
        if len(values) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and np.isfinite(v) for v in values):
            return f"{name} {list(values)!r} is not 3 finite numbers (or 1, for a grayscale model)"
    if len(p.mean) != len(p.std):
        return f"mean {list(p.mean)!r} and std {list(p.std)!r} have different lengths"
    if not all(p.std):
        return f"std {list(p.std)!r} has a zero"
    if isinstance(p.scale, bool) or not isinstance(p.scale, (int, float)) or not np.isfinite(p.scale):
        return f"scale {p.scale!r} is not a finite number"
    if not isinstance(p.channel_order, str) or p.channel_order.lower() not in ("rgb", "bgr"):
        return f"channel order {p.channel_order!r} is not rgb or bgr"
    if p.layout not in contract.LAYOUTS:
        return f"layout {p.layout!r} is not {' or '.join(contract.LAYOUTS)}"
    return None


def parse_contract(meta: Mapping[str, str], path: str = "<model>") -> contract.ContractInfo:
    """Turn `metadata_props` into a ContractInfo; refuse unknown contract versions."""
    from . import __version__

    if contract.META_CONTRACT_VERSION not in meta:
        raise ModelError(f"{path}: valid ONNX but not a camrt file (no camrt metadata): run `camrt export` to make one")
    raw_version = meta[contract.META_CONTRACT_VERSION]
    try:
        version = int(raw_version)
    except ValueError:
        version = None
    if version not in contract.SUPPORTED_CONTRACT_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(contract.SUPPORTED_CONTRACT_VERSIONS))
        raise ContractError(
            f"{path}: camrt contract version {raw_version!r} is not supported by camrt {__version__} "
            f"(it reads version {supported}); re-export the model with this camrt version's `camrt export`"
        )
    input_name = meta.get(contract.META_INPUT)
    if not input_name:
        raise ContractError(f"{path}: the camrt metadata lacks {contract.META_INPUT!r}; re-export the model with `camrt export`")
    pre_text = meta.get(contract.META_PREPROCESSING)
    if pre_text is None:
        raise ContractError(f"{path}: the camrt metadata lacks {contract.META_PREPROCESSING!r}; re-export the model with `camrt export`")
    try:
        preprocessing = contract.Preprocessing.from_json(pre_text)
        problem = _preprocessing_problem(preprocessing)
    except KeyError as exc:
        problem = f"no {exc.args[0]!r} field"
    except (ValueError, TypeError, AttributeError) as exc:
        problem = str(exc)
    if problem:
        raise ContractError(f"{path}: metadata {contract.META_PREPROCESSING!r} is malformed ({problem}); re-export the model with `camrt export`")
    layers = _json(meta, contract.META_LAYERS, path, default=[])
    labels = _json(meta, contract.META_LABELS, path)
    return contract.ContractInfo(
        version=version,
        input_name=input_name,
        layers=[str(layer) for layer in layers],
        default_layer=meta.get(contract.META_DEFAULT_LAYER) or None,
        preprocessing=preprocessing,
        rule_sets=[str(r) for r in _json(meta, contract.META_RULE_SETS, path, default=[])],
        labels=[str(label) for label in labels] if labels else None,
        source=_json(meta, contract.META_SOURCE, path, default={}) or {},
        score=_json(meta, contract.META_SCORE, path, default={}) or {},
        exporter_version=meta.get(contract.META_EXPORTER_VERSION, ""),
        cam_layers=_names(meta, contract.META_CAM_LAYERS, path),
        bias_terms=_names(meta, contract.META_BIAS_TERMS, path),
    )


def _names(meta: Mapping[str, str], key: str, path: str) -> list[str] | None:
    """An optional JSON list of names (None when the key is absent)."""
    names = _json(meta, key, path)
    if names is None:
        return None
    if not isinstance(names, list):
        raise ContractError(f"{path}: metadata {key!r} must be a JSON list; re-export the model with `camrt export`")
    return [str(name) for name in names]


def read_contract(path: str | os.PathLike) -> contract.ContractInfo:
    """Check that `path` is a camrt file this runtime understands and return its contract."""
    return parse_contract(read_metadata(path), os.fspath(path))


# --- loading the graph safely ---------------------------------------------------------------


def _custom_op_libraries(given: Sequence[str | os.PathLike] | None) -> list[str]:
    if given is None:
        given = [p for p in os.environ.get(CUSTOM_OP_LIBRARIES_ENV, "").split(os.pathsep) if p.strip()]
    elif isinstance(given, (str, os.PathLike)):
        given = [given]
    return [require_regular_file(library, UsageError) for library in given]


def _graphs(graph):
    """`graph` and every subgraph in its nodes' attributes (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if (attr.HasField("g") or attr.graphs) else ():
                yield from _graphs(sub)


def _nodes(model):
    for graph in _graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _tensors(model):
    """Every TensorProto of the model: initializers, sparse initializers, tensor attributes."""
    for graph in _graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in _nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)


def check_custom_ops(model, path: str, allowed: bool) -> None:
    """ModelError naming the first node that needs a custom-op library, unless `allowed`.

    Calls of functions defined in the file itself are fine (their bodies are checked too)."""
    if allowed:
        return
    local = {(f.domain, f.name) for f in model.functions}
    for node in _nodes(model):
        domain = node.domain or ""
        if (domain, node.op_type) in FILE_READING_OPS:
            raise ModelError(
                f"{path}: node {node.name!r} is a {domain}.{node.op_type} node, which makes onnxruntime read a "
                "file named in the model; camrt refuses it (re-export the model with `camrt export`)"
            )
        if domain not in BUILTIN_DOMAINS and (domain, node.op_type) not in local:
            raise ModelError(
                f"{path}: node {node.name!r} uses op {node.op_type!r} of the custom domain {domain!r}, which needs "
                f"a custom-op library; camrt loads one only when asked (custom_op_libraries=[...] or "
                f"{CUSTOM_OP_LIBRARIES_ENV}=/path/to/library.so)"
            )


def check_external_data(model, path: str) -> None:
    """ModelError for any tensor whose external data is not a file inside the model's folder.

    Runs on the model loaded WITHOUT its external data: nothing outside the folder is opened."""
    from onnx import TensorProto

    folder = os.path.dirname(os.path.abspath(path))
    real_folder = os.path.realpath(folder)
    for tensor in _tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")

        def refuse(reason: str) -> None:
            raise ModelError(
                f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, {reason}; camrt reads "
                f"external data only from files inside the model's folder {folder}"
            )

        if not location:
            refuse("which names no file")
        if os.path.isabs(location) or re.match(r"^([A-Za-z]:|[\\/])", location):
            refuse("an absolute path")
        if ".." in re.split(r"[\\/]", location):
            refuse("a path with '..'")
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([target, real_folder]) != real_folder:
            refuse(f"which resolves to {target} outside the folder (a symbolic link)")
        if not os.path.isfile(target):
            refuse("which does not exist or is not a regular file")
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
        except ValueError:
            refuse(f"with a malformed offset or length {entries}")
        size = os.path.getsize(target)
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            refuse(f"with offset {offset} and length {length} beyond the file's {size} bytes")


def load_checked_model(path: str, allow_custom_ops: bool = False):
    """The ModelProto of `path` with its external data, after the checks above and onnx.checker."""
    import onnx
    from onnx import external_data_helper

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise unrelated types for damaged files
        raise ModelError(f"{path}: cannot load this camrt file: {_first_line(exc)}") from None
    check_external_data(model, path)
    check_custom_ops(model, path, allow_custom_ops)
    try:
        external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:  # onnx raises OSError, ValueError and its own types
        raise ModelError(f"{path}: cannot read the model's external data: {_first_line(exc)}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError, or protobuf errors for huge models
        raise ModelError(f"{path}: not a valid ONNX graph ({_first_line(exc)}); re-export it with `camrt export`") from None
    return model


def check_graph(model, initializers, path: str) -> None:
    """onnx.checker on a graph whose initializers were left as bytes (camrt.protoslice): each is
    stood in for by a one-element tensor of its name, which is all the structural checks read
    (every input defined, topological order, known ops and attributes)."""
    import onnx
    from onnx import helper

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    skeleton.graph.initializer.extend(helper.make_tensor(name, onnx.TensorProto.FLOAT, [1], [0.0]) for name in initializers)
    try:
        onnx.checker.check_model(skeleton)
    except Exception as exc:  # onnx.checker.ValidationError
        raise ModelError(f"{path}: not a valid ONNX graph ({_first_line(exc)}); re-export it with `camrt export`") from None


# --- the session ---------------------------------------------------------------------------


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return (RuntimeError, *(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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

        from .plugins import get_plugin_manager

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
        libraries = _custom_op_libraries(custom_op_libraries)
        for library in libraries:
            try:
                self._options.register_custom_ops_library(library)
            except _ort_errors() as exc:
                raise UsageError(f"cannot load the custom-op library {library}: {_first_line(exc)}") from None
        from .protoslice import SlicedModel, Unsliceable

        #: The file with its initializers left as bytes (camrt.protoslice: no copy of the weights
        #: through Python), or None when it keeps them as external data; then `_model` holds them,
        #: loaded by `load_checked_model` (external data confined to the model's folder).
        self._sliced: SlicedModel | None = None
        self._full: Any = None
        try:
            self._sliced = SlicedModel(self.path)
        except Unsliceable:
            self._model = self._full = load_checked_model(self.path, allow_custom_ops=bool(libraries))
        except Exception as exc:  # protobuf and onnx raise unrelated types for damaged files
            raise ModelError(f"{self.path}: cannot load this camrt file: {_first_line(exc)}") from None
        else:
            self._model = self._sliced.model
            check_custom_ops(self._model, self.path, bool(libraries))
            check_graph(self._model, self._sliced.initializers, self.path)
        #: fetch set -> session; ("tail", layer) -> TailPlan.
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

        graph = self._model.graph
        initializers = set(self._sliced.initializers) if self._sliced else {i.name for i in graph.initializer}
        inputs = {i.name: _dims(i) for i in graph.input if i.name not in initializers}
        for needed in (self.info.input_name, contract.TARGET_INPUT):
            if needed not in inputs:
                raise ContractError(f"{self.path}: the graph has no input {needed!r}; re-export the model with `camrt export`")
        #: The image input's shape as callers give it: NCHW, whatever the file's layout.
        self.input_shape = _as_nchw(inputs[self.info.input_name], self.info.preprocessing.layout)
        self._check_image_input(next(i for i in graph.input if i.name == self.info.input_name))
        outputs = {o.name: _dims(o) for o in graph.output}
        self.output_names: tuple[str, ...] = tuple(outputs)
        for needed in (contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT):
            if needed not in outputs:
                raise ContractError(f"{self.path}: the graph has no output {needed!r}; re-export the model with `camrt export`")
        logits_shape = outputs[contract.LOGITS_OUTPUT]
        classes = logits_shape[1] if len(logits_shape) == 2 else None
        if not isinstance(classes, int) or classes < 1:
            raise ContractError(f"{self.path}: {contract.LOGITS_OUTPUT!r} has no static number of classes ({logits_shape})")
        self.num_classes: int = classes
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
        `camrt.fused.heatmap_model`), cached under `name` next to `fetch`."""
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
                pruned = _subgraph(self._model, sorted(set(fetch)))
                subgraph = self._serialize(extend(pruned) if extend is not None else pruned)
                try:
                    self._sessions[key] = ort.InferenceSession(subgraph, sess_options=self._options,
                                                               providers=self._providers)
                except _ort_errors() as exc:
                    raise ModelError(f"{self.path}: onnxruntime cannot load this camrt file: {_first_line(exc)}") from None
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
    def check_targets(self, targets: Any, batch: int) -> np.ndarray:
        """int64 [batch]; each -1 (top-1) or 0 <= t < num_classes."""
        try:
            array = np.asarray(targets)
        except (TypeError, ValueError) as exc:
            raise InputError(f"targets must be integers, got {targets!r}") from exc
        if array.ndim != 1 or array.shape[0] != batch:
            raise InputError(f"got {array.size if array.ndim else 1} target(s) for a batch of {batch}; give one per input")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"targets must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
        bad = [int(t) for t in array if not (t == contract.TOP1_TARGET or 0 <= t < self.num_classes)]
        if bad:
            raise InputError(
                f"target(s) {bad} out of range: use {contract.TOP1_TARGET} (top-1) or a class index in "
                f"0..{self.num_classes - 1}"
            )
        return array

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
            fixed: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run forward (and backward) once; return only the `fetch` outputs.

        session: one made by `prepare(..., extend=...)` (default: the pruned subgraph of `fetch`);
        fixed: its feeds without a batch axis."""
        x = self.check_inputs(inputs)
        t = self.check_targets(targets, x.shape[0])
        fetch = list(dict.fromkeys(fetch))
        session = session or self.prepare(fetch)
        if x.shape[0] == 0:
            raise InputError("empty batch")
        feeds = {self.info.input_name: self._model_input(x), contract.TARGET_INPUT: t}
        needed = {i.name for i in session.get_inputs()}
        values = self._run_chunked(session, {k: v for k, v in feeds.items() if k in needed}, fetch, fixed)
        _check_finite(dict(zip(fetch, values)), "the model")
        return {name: self._input_gradient_as_nchw(name, value) for name, value in zip(fetch, values)}

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
                tail, side_model, side = _tail_graphs(self._full_model(), tensor, contract.LOGITS_OUTPUT, self.path, layer)
                try:
                    session = ort.InferenceSession(tail.SerializeToString(), sess_options=self._options,
                                                   providers=self._providers)
                    side_session = (ort.InferenceSession(side_model.SerializeToString(), sess_options=self._options,
                                                         providers=self._providers) if side_model is not None else None)
                except _ort_errors() as exc:
                    raise ModelError(f"{self.path}: onnxruntime cannot load the tail graph of layer {layer!r}: "
                                     f"{_first_line(exc)}") from None
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
        _check_finite({contract.LOGITS_OUTPUT: logits}, f"the tail of layer {layer!r}")
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
                raise ModelError(f"{self.path}: onnxruntime failed to run the model: {_first_line(exc)}") from None
            parts.append([v[:real] for v in values])
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(fetch))]


def _check_finite(values: Mapping[str, np.ndarray], what: str) -> None:
    """NonFiniteError naming the rows and outputs where `what` produced NaN or inf.

    A NaN activation or gradient would become a NaN (or silently normalised) heatmap; the rows are
    refused instead, so that a batch run can report them as error records."""
    bad: dict[int, list[str]] = {}
    for name, value in values.items():
        if value.dtype.kind == "f" and value.ndim and value.size:
            for row in np.flatnonzero(~np.isfinite(value.reshape(value.shape[0], -1)).all(axis=1)):
                bad.setdefault(int(row), []).append(name)
    if bad:
        rows = sorted(bad)
        detail = "; ".join(f"row {row}: {', '.join(bad[row])}" for row in rows[:8])
        raise NonFiniteError(
            f"{what} produced NaN or inf ({detail}{'; ...' if len(rows) > 8 else ''}); no heatmap is made "
            "from non-finite values: check the image and the model (e.g. a Log, Sqrt or Div that meets 0 or "
            "a negative number)", rows)


@dataclass(frozen=True)
class TailPlan:
    """The tail of one layer: its session, the layer tensor it is fed, and its side inputs."""

    layer: str
    tensor: str
    side: tuple[str, ...]
    session: Any
    side_session: Any = None


def _tail_graphs(model, tensor: str, logits: str, path: str, layer: str):
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
        side_model = _subgraph(model, computed, extra_outputs=[info(n) for n in computed])
    return tail, side_model, side


def _as_nchw(shape: tuple[int | str | None, ...], layout: str) -> tuple[int | str | None, ...]:
    """A rank-4 image-input shape of `layout`, reordered to NCHW (other ranks unchanged)."""
    if layout == contract.LAYOUT_NHWC and len(shape) == 4:
        return tuple(shape[axis] for axis in contract.NHWC_TO_NCHW)
    return shape


def _dims(value_info) -> tuple[int | str | None, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in value_info.type.tensor_type.shape.dim)


def _subgraph(model, outputs: Sequence[str], extra_outputs: Sequence[Any] = ()):
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


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)
