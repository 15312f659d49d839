"""Tensor encoding on the wire: Open Inference Protocol datatype names, shapes, raw little-endian bytes.

BYTES tensors are a sequence of elements, each a 4-byte little-endian length followed by that many bytes.
"""
from __future__ import annotations

import struct
import time
from contextvars import ContextVar
from typing import Any, Iterator

import numpy as np

from .errors import DeadlineExceeded

# OIP datatype name -> numpy dtype (always little-endian on the wire).
DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}
_U32 = struct.Struct("<I")  # a BYTES element's length prefix
# BF16 has no numpy dtype; it travels as raw 2-byte elements and decodes to uint16 bit patterns.
ELEMENT_SIZE: dict[str, int] = {name: dt.itemsize for name, dt in DATATYPE_TO_NUMPY.items() if name != "BYTES"}
ELEMENT_SIZE["BF16"] = 2
DATATYPES: frozenset[str] = frozenset(ELEMENT_SIZE) | {"BYTES"}

_NUMPY_KIND_TO_DATATYPE: dict[str, str] = {
    dt.str.lstrip("<|="): name for name, dt in DATATYPE_TO_NUMPY.items() if name not in ("BYTES",)
}
# The little-endian numeric dtypes themselves (the ones onnxruntime returns), for datatype_of's fast path.
_DATATYPE_BY_DTYPE: dict[np.dtype[Any], str] = {dt: name for name, dt in DATATYPE_TO_NUMPY.items() if name not in ("BYTES", "BF16")}


class BF16Array:
    """A bfloat16 tensor, which numpy has no dtype for: its bit patterns as uint16 (the upper half of each
    float32). Pass one as an input to send `BF16`; replies decode `BF16` outputs to plain uint16 bits,
    which `BF16Array(bits).to_float32()` widens."""

    __slots__ = ("bits",)

    def __init__(self, bits: np.ndarray) -> None:
        bits = np.asarray(bits)
        if bits.dtype != np.uint16:
            raise TypeError(f"BF16Array holds uint16 bit patterns, got {bits.dtype} (use BF16Array.from_float32)")
        self.bits = bits

    @classmethod
    def from_float32(cls, values: Any) -> "BF16Array":
        """Round to the nearest bfloat16 (ties to even), as onnxruntime's Cast does; NaN stays NaN."""
        wide = np.asarray(values, dtype=np.float32, order="C").view(np.uint32)  # a scalar stays 0-d
        rounded = (wide + (0x7FFF + ((wide >> 16) & 1))) >> 16
        bits = np.where(np.isnan(wide.view(np.float32)), (wide >> 16) | 0x40, rounded).astype(np.uint16)
        return cls(bits)

    def to_float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    def __getitem__(self, key: Any) -> "BF16Array":
        return BF16Array(self.bits[key])

    def __repr__(self) -> str:
        return f"BF16Array({self.to_float32()!r})"


# A deadline (CLOCK_MONOTONIC ns; 0: none) for the loops over BYTES elements below, which a request's size
# drives and nothing else can stop: a daemon's worker sets it around a request's preparation and the
# encoding of its outputs, so that a million strings in or out end in DEADLINE_EXCEEDED at the model's
# max_compute_ms rather than in the worker's kill (round 16). A client never sets it.
ELEMENTS_DEADLINE_NS: ContextVar[int] = ContextVar("openinfer_elements_deadline_ns", default=0)
ELEMENTS_CHUNK = 65536  # elements between two looks at the deadline
_unchecked = [0]  # elements converted since the last look, over every call (a batch's members are many small ones)


def elements_done(count: int) -> None:
    """`count` more elements converted: past ELEMENTS_CHUNK since the last look, look at the deadline
    (round 18: 64 batch members of 65,000 strings each were never looked at)."""
    unchecked = _unchecked[0] + count
    if unchecked < ELEMENTS_CHUNK:
        _unchecked[0] = unchecked
        return
    _unchecked[0] = 0
    stop_ns = ELEMENTS_DEADLINE_NS.get()
    if stop_ns and time.monotonic_ns() >= stop_ns:
        raise DeadlineExceeded("stopped while converting its BYTES elements: past its deadline (the request's timeout, or the model's max_compute_ms); the worker was kept")


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name for a numpy array (object/str/bytes arrays are BYTES)."""
    known = _DATATYPE_BY_DTYPE.get(array.dtype)
    if known is not None:  # every reply's outputs pass here: a dict lookup, not dtype arithmetic
        return known
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    if array.dtype == np.bool_:
        return "BOOL"
    key = array.dtype.newbyteorder("<").str.lstrip("<|=")
    try:
        return _NUMPY_KIND_TO_DATATYPE[key]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def encode_array(array: np.ndarray | BF16Array) -> tuple[str, list[int], bytes | memoryview]:
    """(datatype, shape, payload) for one array; numeric payloads are zero-copy when already contiguous LE."""
    if isinstance(array, BF16Array):
        bits = np.asarray(array.bits, dtype="<u2", order="C")  # not ascontiguousarray: it makes a scalar [1]
        return "BF16", [int(d) for d in bits.shape], memoryview(bits).cast("B") if bits.size else b""  # type: ignore[arg-type]
    datatype = datatype_of(array)
    shape = [int(d) for d in array.shape]
    if datatype == "BYTES":
        return datatype, shape, encode_bytes_elements(array)
    wire_dtype = DATATYPE_TO_NUMPY[datatype]
    if array.dtype != wire_dtype or not array.flags.c_contiguous:
        array = np.asarray(array, dtype=wire_dtype, order="C")
    if not array.size:
        return datatype, shape, b""
    return datatype, shape, memoryview(array).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers


_BYTES_LIKE = (bytes, bytearray, memoryview)


def bytes_element(element: Any) -> bytes:
    """One BYTES element: bytes-like as it is, str as UTF-8; anything else is refused (bytes(5) would be
    five zero bytes, bytes(2**40) a terabyte)."""
    if isinstance(element, str):
        try:
            return element.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"a BYTES element is not valid UTF-8 text: {exc.reason} at {exc.start}") from None
    if isinstance(element, _BYTES_LIKE):
        return bytes(element)
    raise TypeError(f"a BYTES element must be bytes or str, got {type(element).__name__}")


def encode_bytes_elements(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    flat = array.reshape(-1)
    for start in range(0, len(flat), ELEMENTS_CHUNK):
        chunk = flat[start : start + ELEMENTS_CHUNK]
        for element in chunk:
            raw = bytes_element(element)
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        elements_done(len(chunk))
    return b"".join(parts)


def encode_bytes_scalar(value: bytes | bytearray | memoryview | str) -> bytes:
    """The payload of a rank-0 BYTES tensor holding `value` (str as UTF-8). Not via numpy: a numpy bytes
    scalar drops trailing NUL bytes, and a file's content must arrive whole."""
    raw = bytes_element(value)
    return struct.pack("<I", len(raw)) + raw


def _bytes_element_spans(view: memoryview, count: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each of `count` length-prefixed elements; ValueError unless the payload holds
    exactly that many (no bytes left over)."""
    size = len(view)
    offset = 0
    for start in range(0, count, ELEMENTS_CHUNK):
        end = min(count, start + ELEMENTS_CHUNK)
        for index in range(start, end):
            if offset + 4 > size:
                raise ValueError(f"BYTES payload ends inside the length of element {index}")
            (length,) = _U32.unpack_from(view, offset)
            offset += 4
            if offset + length > size:
                raise ValueError(f"BYTES element {index} claims {length} bytes past the end of the payload")
            yield offset, offset + length
            offset += length
        elements_done(end - start)
    if offset != size:
        raise ValueError(f"BYTES payload has {size - offset} trailing bytes after {count} elements")


def decode_bytes_elements(payload: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """Parse `count` length-prefixed elements; raises ValueError if the payload does not hold exactly that."""
    view = memoryview(payload).cast("B")
    if count > view.nbytes // 4:  # (each element has a 4-byte length): checked before room is made for them
        raise ValueError(f"a BYTES payload of {view.nbytes} bytes cannot hold {count} elements (4 bytes of length each, at least)")
    out = np.empty(count, dtype=object)
    for index, (start, end) in enumerate(_bytes_element_spans(view, count)):
        out[index] = bytes(view[start:end])
    return out


def check_bytes_elements(payload: bytes | bytearray | memoryview, count: int) -> None:
    """What decode_bytes_elements checks, without copying the elements: ValueError unless the payload
    holds exactly `count` length-prefixed elements."""
    for _ in _bytes_element_spans(memoryview(payload).cast("B"), count):
        pass


def expected_nbytes(datatype: str, shape: list[int]) -> int | None:
    """Exact payload size for fixed-width datatypes; None for BYTES (variable)."""
    size = ELEMENT_SIZE.get(datatype)
    return None if size is None else size * element_count(shape)


def decode_array(datatype: str, shape: list[int], payload: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a payload into an ndarray; numeric types are zero-copy views (read-only) over the payload."""
    if datatype == "BYTES":
        return decode_bytes_elements(payload, element_count(shape)).reshape(shape)
    if datatype == "BF16":
        return np.frombuffer(payload, dtype="<u2").reshape(shape)
    expected = expected_nbytes(datatype, shape)
    if expected is None:
        raise ValueError(f"unknown datatype {datatype!r}")
    if len(payload) != expected:
        raise ValueError(f"payload is {len(payload)} bytes, {datatype}{shape} needs {expected}")
    return np.frombuffer(payload, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)
