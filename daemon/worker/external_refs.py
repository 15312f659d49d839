"""Every external-data reference in an ONNX model, found without onnx or onnxruntime.

onnxruntime reads a tensor's bytes from the file its `external_data` names, relative to the model's path -
or to the working directory for a model loaded from bytes, so `../` could reach the whole filesystem.
The worker therefore lists the references itself and hands onnxruntime every file from memory
(external_data.py). This walks protobuf's wire format (tags and lengths; nothing is interpreted but the
few fields below) through every place a TensorProto can sit:

  ModelProto        graph 7, training_info 20, functions 25
  TrainingInfoProto initialization 1, algorithm 2 (GraphProto)
  GraphProto        node 1, initializer 5, sparse_initializer 15
  NodeProto         attribute 5
  AttributeProto    t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
  FunctionProto     node 7, attribute_proto 11 (an attribute's default value: onnxruntime inlines its tensor)
  SparseTensorProto values 1, indices 2
  TensorProto       name 8, external_data 13 (StringStringEntryProto key 1, value 2), data_location 14

A tensor counts as external when data_location is EXTERNAL (1) or when it carries any `location` entry at
all: a reference is checked whether or not onnxruntime would follow it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

EXTERNAL = 1
MAX_DEPTH = 100  # messages nested deeper are refused: protobuf's default limit, which onnxruntime's parser keeps

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class MalformedModel(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str  # the tensor's name, for messages
    location: str | None  # None: marked EXTERNAL without a location


def external_refs(model: bytes | memoryview) -> list[ExternalRef]:
    """The external references of every tensor in the model, in file order."""
    found: list[ExternalRef] = []
    _model(memoryview(model), found, 0)
    return found


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value): a memoryview for length-delimited fields, an int otherwise."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedModel("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _LENGTH:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise MalformedModel("a length runs past the end of its message")
            yield number, wire, buf[pos : pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > end:
                raise MalformedModel("a fixed-size field runs past the end of its message")
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise MalformedModel(f"unsupported wire type {wire}")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedModel("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _messages(buf: memoryview, wanted: dict[int, Callable[[memoryview, list[ExternalRef], int], None]], found: list[ExternalRef], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MalformedModel(f"messages nested more than {MAX_DEPTH} deep")
    for number, wire, value in _fields(buf):
        visit = wanted.get(number)
        if visit is not None:
            if wire != _LENGTH:
                raise MalformedModel(f"field {number} should be a message")
            visit(value, found, depth + 1)  # type: ignore[arg-type]


def _model(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    _messages(buf, {7: _graph, 20: _training_info, 25: _function}, found, depth)


def _training_info(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    _messages(buf, {1: _graph, 2: _graph}, found, depth)


def _graph(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    _messages(buf, {1: _node, 5: _tensor, 15: _sparse_tensor}, found, depth)


def _node(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    _messages(buf, {5: _attribute}, found, depth)


def _attribute(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    _messages(buf, {5: _tensor, 6: _graph, 10: _tensor, 11: _graph, 22: _sparse_tensor, 23: _sparse_tensor}, found, depth)


def _function(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    _messages(buf, {7: _node, 11: _attribute}, found, depth)  # (11 was missed: round 72)


def _sparse_tensor(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    _messages(buf, {1: _tensor, 2: _tensor}, found, depth)


def _tensor(buf: memoryview, found: list[ExternalRef], depth: int) -> None:
    name = ""
    external = False
    locations: list[str] = []
    for number, wire, value in _fields(buf):
        if number == 8 and wire == _LENGTH:
            name = _text(value)  # type: ignore[arg-type]
        elif number == 14 and wire == _VARINT:
            external = value == EXTERNAL
        elif number == 13 and wire == _LENGTH:
            key = entry = None
            for entry_number, entry_wire, entry_value in _fields(value):  # type: ignore[arg-type]
                if entry_wire == _LENGTH and entry_number == 1:
                    key = _text(entry_value)  # type: ignore[arg-type]
                elif entry_wire == _LENGTH and entry_number == 2:
                    entry = _text(entry_value)  # type: ignore[arg-type]
            if key == "location":
                locations.append(entry or "")
    if locations:
        found.extend(ExternalRef(name, location) for location in locations)
    elif external:
        found.append(ExternalRef(name, None))


def _text(value: memoryview) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedModel("a string field is not UTF-8") from None
