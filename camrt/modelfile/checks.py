"""Checking a camrt file before onnxruntime sees it (hostile files).

The graph is loaded without its external data first; every tensor that keeps its data in another
file must name a file inside the model's folder (no absolute path, no `..`, no symbolic link out of
the folder), checked before any of it is read. Nodes of custom op domains (which need a custom-op
library) are refused unless libraries are given (`custom_op_libraries` or
``CAMRT_CUSTOM_OP_LIBRARIES``); the graph must then pass `onnx.checker`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ..errors import ModelError, UsageError, first_line, require_regular_file

#: Op domains onnxruntime implements itself; any other domain needs a custom-op library.
BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: Built-in-domain ops that make onnxruntime read files named in the model (execution-provider caches).
FILE_READING_OPS = frozenset({("com.microsoft", "EPContext")})
CUSTOM_OP_LIBRARIES_ENV = "CAMRT_CUSTOM_OP_LIBRARIES"


def resolve_custom_op_libraries(given: Sequence[str | os.PathLike] | None) -> list[str]:
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
        raise ModelError(f"{path}: cannot load this camrt file: {first_line(exc)}") from None
    check_external_data(model, path)
    check_custom_ops(model, path, allow_custom_ops)
    try:
        external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:  # onnx raises OSError, ValueError and its own types
        raise ModelError(f"{path}: cannot read the model's external data: {first_line(exc)}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError, or protobuf errors for huge models
        raise ModelError(f"{path}: not a valid ONNX graph ({first_line(exc)}); re-export it with `camrt export`") from None
    return model


def check_graph(model, initializers, path: str) -> None:
    """onnx.checker on a graph whose initializers were left as bytes (camrt.modelfile.slicing): each is
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
        raise ModelError(f"{path}: not a valid ONNX graph ({first_line(exc)}); re-export it with `camrt export`") from None


# --- the session ---------------------------------------------------------------------------
