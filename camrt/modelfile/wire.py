"""The protobuf wire format, read straight from bytes: enough to scan an ONNX file's top-level
fields (metadata, where the initializers lie) without parsing its graph or its weights."""

from __future__ import annotations

# ModelProto field numbers (onnx.proto3): 1 ir_version, 7 graph, 14 metadata_props;
# StringStringEntryProto: 1 key, 2 value.
MODEL_IR_VERSION = 1
MODEL_GRAPH = 7
MODEL_METADATA = 14
MAX_MODEL_FIELD = 32
# GraphProto: 12 output; ValueInfoProto: 1 name.
GRAPH_OUTPUT = 12
VALUE_INFO_NAME = 1
#: Wire type of length-delimited fields (messages, strings, bytes).
LEN = 2


class NotProtobuf(ValueError):
    pass


def varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotProtobuf("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(buf, pos: int, end: int):
    """Yield (field number, wire type, value) of one message; LEN values are (start, stop)."""
    while pos < end:
        tag, pos = varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise NotProtobuf("field number 0")
        if wire == 0:
            value, pos = varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise NotProtobuf(f"wire type {wire}")
        if pos > end:
            raise NotProtobuf("field runs past the end")
        yield number, wire, value
