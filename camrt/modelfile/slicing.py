"""A camrt file opened without parsing its weights: the graph is parsed, the initializers stay bytes.

A contract file is mostly initializers (ResNet-50: the weights and the gradient graph's constants).
`onnx.load` copies all of them into Python objects, and serialising a pruned subgraph for
onnxruntime copies them again: most of a cold `camrt explain`. `SlicedModel` maps the file, parses
only the rest (nodes, inputs, outputs, metadata) and records where each initializer's bytes lie.
`serialize` writes a pruned model followed by a second ``graph`` field that holds only the
initializers the pruned nodes read, copied from the file as they are: protobuf merges a message
field that appears twice, so onnxruntime reads one graph (protobuf encoding, "Last One Wins" for
scalars and merging for embedded messages).

Files whose initializers live in external data are refused (`Unsliceable`): the caller loads them
with onnx instead.
"""

from __future__ import annotations

import mmap
import os

from .wire import LEN, MODEL_GRAPH, fields

# onnx.proto3 field numbers: GraphProto 5 initializer; TensorProto 8 name, 13 external_data,
# 14 data_location.
_GRAPH_INITIALIZER = 5
_TENSOR_NAME = 8
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14


class Unsliceable(ValueError):
    """The file cannot be sliced (external data); load it whole."""


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _entry(number: int, wire: int, value, buf) -> bytes:
    """Re-encode one field read by `fields` (LEN values are spans of `buf`)."""
    tag = _varint_bytes(number << 3 | wire)
    if wire == LEN:
        start, stop = value
        return tag + _varint_bytes(stop - start) + bytes(buf[start:stop])
    if wire == 0:
        return tag + _varint_bytes(value)
    raise Unsliceable(f"unexpected wire type {wire} in field {number}")


class SlicedModel:
    """The model without initializers (`model`, an onnx ModelProto) + the initializers' byte spans."""

    def __init__(self, path: str | os.PathLike):
        import onnx

        with open(path, "rb") as handle:
            self._buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._buf)  # slices of it are not copies
        buf = self._buf
        head, graph_parts = [], []
        #: initializer name -> (start, stop) of its TensorProto bytes in the file
        self.initializers: dict[str, tuple[int, int]] = {}
        for number, wire, value in fields(buf, 0, len(buf)):
            if number != MODEL_GRAPH:
                head.append(_entry(number, wire, value, buf))
                continue
            for sub, sub_wire, span in fields(buf, *value):
                if sub == _GRAPH_INITIALIZER and sub_wire == LEN:
                    self.initializers[self._tensor_name(span)] = span
                else:
                    graph_parts.append(_entry(sub, sub_wire, span, buf))
        graph = b"".join(graph_parts)
        skeleton = b"".join(head) + _varint_bytes(MODEL_GRAPH << 3 | LEN) + _varint_bytes(len(graph)) + graph
        self.model = onnx.ModelProto()
        self.model.ParseFromString(skeleton)

    def _tensor_name(self, span: tuple[int, int]) -> str:
        name = None
        for number, wire, value in fields(self._buf, *span):
            if number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION) and (number == _TENSOR_EXTERNAL_DATA or value == 1):
                raise Unsliceable("an initializer is stored as external data")
            if number == _TENSOR_NAME and wire == LEN:
                name = bytes(self._buf[value[0]:value[1]]).decode("utf-8")
        if name is None:
            raise Unsliceable("an initializer has no name")
        return name

    def serialize(self, model) -> bytes:
        """`model` (derived from `self.model`: no initializers of the file) with the file's
        initializers that its nodes read, as bytes for onnxruntime."""
        read = set()
        for node in model.graph.node:
            read.update(node.input)
            for attr in node.attribute:  # names a subgraph (If/Loop/Scan body) reads from outside
                for sub in [attr.g, *attr.graphs]:
                    read.update(i for n in sub.node for i in n.input)
        tag = _varint_bytes(_GRAPH_INITIALIZER << 3 | LEN)
        parts = []
        for name in sorted(read & self.initializers.keys()):
            start, stop = self.initializers[name]
            parts += [tag, _varint_bytes(stop - start), self._view[start:stop]]
        weights = b"".join(parts)
        return (model.SerializeToString() + _varint_bytes(MODEL_GRAPH << 3 | LEN) + _varint_bytes(len(weights))
                + weights)
