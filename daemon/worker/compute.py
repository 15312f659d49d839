"""What a worker does with one request's or one batch's tensors: onnxruntime feeds from wire frames,
the run, and wire frames from the outputs. Shared by the tasks the supervisor sends (channel_tasks.py)
and the requests clients send straight to the worker (direct_queue.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from openinfer.wire.errors import DeadlineExceeded
from openinfer.wire.tensors import DATATYPE_TO_NUMPY, ELEMENT_SIZE, ELEMENTS_CHUNK, BF16Array, datatype_of, elements_done, decode_array, encode_array
from openinfer.wire.zmtp import Buffer

from .session import bf16_input


def feed_from(header: dict[str, Any], frames: list[Buffer], raw: bool = False) -> dict[str, Any]:
    """The request's inputs for onnxruntime, or as they came (`raw`: BYTES stay bytes) for a pre step."""
    feed: dict[str, Any] = {}
    for spec, frame in zip(header["inputs"], frames):
        array = decode_array(spec["datatype"], list(spec["shape"]), frame)
        feed[spec["name"]] = array if raw else for_onnxruntime(spec["datatype"], array)
    return feed


def for_onnxruntime(datatype: str, array: np.ndarray) -> Any:
    if datatype == "BYTES":  # onnxruntime wants str elements for tensor(string)
        if array.size <= ELEMENTS_CHUNK:
            text = _as_text(array) if array.size else array
            elements_done(array.size)
            return text
        flat, text = array.reshape(-1), np.empty(array.size, dtype=object)
        for start in range(0, array.size, ELEMENTS_CHUNK):  # a look at the request's deadline between chunks
            text[start : start + ELEMENTS_CHUNK] = _as_text(flat[start : start + ELEMENTS_CHUNK])
            elements_done(ELEMENTS_CHUNK)
        return text.reshape(array.shape)
    if datatype == "BF16":  # uint16 bits, which onnxruntime must be told are bfloat16
        return bf16_input(array)
    return array


_as_text = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])


def plain(value: Any) -> Any:
    return value if isinstance(value, BF16Array) else np.asarray(value)


class BadMembers(Exception):
    """Members of a batch whose own inputs do not decode (a malformed BYTES frame, a string that is not
    UTF-8), each with why: they alone fail, and the others batch again. All of them, not the first: one a
    failed batch let a client with many such requests keep another's in batches that failed until its
    deadline (round 25)."""

    def __init__(self, bad: list[tuple[int, Exception]]) -> None:
        super().__init__(str(bad[0][1]))
        self.bad = bad


def batch_feed(plan: dict[str, Any], frames: list[Buffer]) -> dict[str, Any]:
    """The batch's inputs: views of the joined frames, or each member's frames concatenated (members whose
    own frames do not decode raise BadMembers naming each)."""
    specs = plan["inputs"]
    if plan["joined"]:
        return feed_from(plan, frames)
    count, rows = len(specs), plan["rows"]
    parts, bad = member_parts(specs, [(n, frames[member * count : (member + 1) * count]) for member, n in enumerate(rows)])
    if bad:
        raise BadMembers(bad)
    return join_members(specs, rows, parts)


def member_parts(specs: list[dict[str, Any]], members: list[tuple[int, list[Buffer]]]) -> tuple[list[list[Any]], list[tuple[int, Exception]]]:
    """Each batch member's (rows, frames) checked and decoded alone (member_part): the parts of those that
    decode, in order, and (position, error) for each that does not - it alone fails, the others batch on
    (round 20: found in the join, one bad member failed its whole batch). DeadlineExceeded is raised:
    whose time ran out is unknown."""
    parts: list[list[Any]] = []
    bad: list[tuple[int, Exception]] = []
    for position, (rows, frames) in enumerate(members):
        try:
            parts.append([member_part(spec["datatype"], spec["shape"][1:], rows, frame) for spec, frame in zip(specs, frames)])
        except DeadlineExceeded:
            raise
        except Exception as exc:
            bad.append((position, exc))
    return parts, bad


def join_members(specs: list[dict[str, Any]], rows: list[int], parts: list[list[Any]]) -> dict[str, Any]:
    """The batch's feed: each input's member parts (member_parts) joined along dimension 0."""
    return {spec["name"]: join_parts(spec["datatype"], spec["shape"][1:], [(n, part[index]) for n, part in zip(rows, parts)]) for index, spec in enumerate(specs)}


def member_part(datatype: str, rest: list[int], rows: int, frame: Buffer) -> Any:
    """One member's rows of a batch input, checked alone: its BYTES decoded and made the str elements
    onnxruntime takes (UTF-8 checked here, not in the join: round 23), or its frame, which must hold
    exactly its rows (ValueError)."""
    if datatype == "BYTES":  # no fixed row size: the elements decoded, to be joined as arrays
        return for_onnxruntime(datatype, decode_array(datatype, [rows, *rest], frame))
    if (frame.nbytes if isinstance(frame, memoryview) else len(frame)) != rows * ELEMENT_SIZE[datatype] * math.prod(rest):
        raise ValueError(f"a batch member's frame does not hold its {rows} rows of {datatype}{rest}")
    return frame


def join_parts(datatype: str, rest: list[int], parts: list[tuple[int, Any]]) -> Any:
    """One input of a batch, for onnxruntime: the members' (rows, member_part) joined along dimension 0."""
    if datatype == "BYTES":
        return np.concatenate([part for _, part in parts], axis=0)
    total = sum(rows for rows, _ in parts)
    return for_onnxruntime(datatype, decode_array(datatype, [total, *rest], b"".join([part for _, part in parts])))


def encode_outputs(wanted: list[str], results: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Specs and payloads of one request's outputs."""
    specs = []
    payloads = []
    for name, value in zip(wanted, results):
        datatype, shape, payload = encode_array(plain(value))
        specs.append({"name": name, "datatype": datatype, "shape": shape})
        payloads.append(payload)
    return specs, payloads


@dataclass(slots=True)
class RowCutter:
    """One output of a batch run, cut into its members' rows. A little-endian C-contiguous numeric
    array (what onnxruntime returns) is checked and described once per batch, and each member's rows
    are a byte range of it (no copy, no per-member encode_array); anything else goes through
    encode_array member by member."""

    value: Any
    datatype: str | None  # None: the general path
    rest: list[int]  # the shape after dimension 0
    row_bytes: int
    flat: memoryview | None

    @classmethod
    def of(cls, value: Any, total_rows: int) -> "RowCutter":
        """`total_rows`: the batch's; an output with another dimension 0 (a model that does not keep the
        batch dimension) is sliced as it is, member by member, and the reply says what each got. One
        with no dimension 0 at all raises ValueError: the batch's members then run alone."""
        if not getattr(value, "shape", ()):
            raise ValueError("a batch output with no dimension 0: its members' rows cannot be cut from it")
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == total_rows and value.flags.c_contiguous and value.size:
            datatype = datatype_of(value)
            if datatype != "BYTES" and value.dtype == DATATYPE_TO_NUMPY[datatype]:
                rest = [int(d) for d in value.shape[1:]]
                return cls(value, datatype, rest, value.itemsize * math.prod(rest), memoryview(value).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
        return cls(value, None, [], 0, None)

    def cut(self, start: int, rows: int) -> tuple[str, list[int], Any]:
        """(datatype, shape, payload) of rows [start, start + rows), as encode_array gives them."""
        flat = self.flat
        if flat is None:
            part = self.value[start : start + rows]
            return encode_array(part if isinstance(part, BF16Array) else np.ascontiguousarray(part))
        at = start * self.row_bytes
        return self.datatype, [rows, *self.rest], flat[at : at + rows * self.row_bytes]  # type: ignore[return-value]


def member_outputs(wanted: list[str], cutters: list[RowCutter], start: int, rows: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Specs and payloads of one batch member's outputs: its rows of each."""
    specs = []
    payloads = []
    for name, cutter in zip(wanted, cutters):
        datatype, shape, payload = cutter.cut(start, rows)
        specs.append({"name": name, "datatype": datatype, "shape": shape})
        payloads.append(payload)
    return specs, payloads


def split_outputs(results: list[Any], wanted: list[str], rows: list[int]) -> tuple[dict[str, Any], list[Any]]:
    """Output frames of a batch. Fixed-size outputs go whole, one frame each ("rows": the supervisor
    cuts each member's rows out of it by byte offset); BYTES elements have no fixed row size, so a batch
    with such an output is split here, member by member ("members")."""
    total = sum(rows)
    encoded = [encode_array(value) for value in results]
    if all(datatype != "BYTES" and shape[:1] == [total] for datatype, shape, _ in encoded):
        specs = [{"name": name, "datatype": datatype, "shape": shape} for name, (datatype, shape, _) in zip(wanted, encoded)]
        return {"layout": "rows", "outputs": specs}, [payload for _, _, payload in encoded]
    per_member: list[list[dict[str, Any]]] = []
    payloads: list[Any] = []
    cutters = [RowCutter.of(value, total) for value in results]
    start = 0
    for n in rows:
        member_specs, member_payloads = member_outputs(wanted, cutters, start, n)
        per_member.append(member_specs)
        payloads.extend(member_payloads)
        start += n
    return {"layout": "members", "outputs": per_member}, payloads
