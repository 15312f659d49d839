"""What a worker sends the supervisor, checked where it arrives.

A worker runs a model that may be hostile and parses client bytes: it may be compromised. So every
message from it is parsed here into typed values and checked against what that worker was given (the
task ids it holds, the outputs those tasks asked for, sizes, types) before any bookkeeping changes.
A message that does not fit raises BadWorkerMessage; the caller retires the worker and fails exactly the
tasks it held. Nothing a worker sends is passed on unchecked: error codes outside the protocol's set
become INTERNAL, messages are truncated, tensor specs are rebuilt from checked values.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from openinfer.wire.errors import ErrorCode
from openinfer.wire.protocol import unpack
from openinfer.wire.tensors import DATATYPES, ELEMENT_SIZE
from openinfer.wire.zmtp import Buffer

from openinfer.daemon.steps.contract import MAX_MODEL_CALLS
from openinfer.daemon.worker import messages

MAX_NAME = 1024  # characters in a tensor name
MAX_RANK = 64
MAX_TENSORS = 4096  # per model (metadata) or per message
MAX_MESSAGE_TEXT = 2000  # characters of an error message passed to a client
MAX_STAGE_US = 1e12  # a stage time beyond ~11 days is not a measurement
_CODES = frozenset(code.value for code in ErrorCode)


class BadWorkerMessage(Exception):
    """The message does not fit what the worker was given; the text says what (for the log)."""


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    load_ms: float | None
    warmup_error: str | None


@dataclass(frozen=True, slots=True)
class WorkerTiming:
    recv_ns: int
    send_ns: int
    prep_us: float
    compute_us: float
    encode_us: float
    cpu_us: float


@dataclass(frozen=True, slots=True)
class TaskResult:
    timing: WorkerTiming
    outputs: list[dict[str, Any]]  # checked specs, one per data frame
    frames: list[Buffer]
    error: dict[str, str] | None  # {"code", "message"}, code within the protocol's set
    cache: str | None = None  # "hit" or "miss" for a model with [cache]
    stages: dict[str, dict[str, Any]] | None = None  # a chain's: per member, {runs, compute_us}


@dataclass(frozen=True, slots=True)
class BatchResult:
    timing: WorkerTiming
    rows_layout: bool  # one frame per output for the whole batch, else per member its frames
    outputs: Any  # rows: list of specs; members: per member a list of specs
    frames: list[Buffer]
    failed: bool  # the batch failed: each member is retried alone, or, with bad_members, the rest together
    bad_members: dict[int, dict[str, str]] | None = None  # members whose own inputs failed it: their answers
    error: dict[str, str] | None = None  # why it failed


def _meta(frames: Sequence[Buffer], index: int = 1) -> dict[str, Any]:
    if len(frames) <= index:
        raise BadWorkerMessage("message too short")
    try:
        meta = unpack(frames[index])
    except Exception as exc:
        raise BadWorkerMessage(f"meta frame is not msgpack: {type(exc).__name__}") from None
    if not isinstance(meta, dict):
        raise BadWorkerMessage("meta frame is not a map")
    return meta


def _text(value: Any, limit: int, what: str) -> str:
    if not isinstance(value, str):
        raise BadWorkerMessage(f"{what} is not a string")
    return value[:limit]


def _number(meta: dict[str, Any], key: str, *, integer: bool = False) -> Any:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadWorkerMessage(f"`{key}` is not a number")
    if not integer and (not math.isfinite(value) or not 0 <= value < MAX_STAGE_US):
        raise BadWorkerMessage(f"`{key}` = {value!r} is not a duration")
    return value


def _clock(meta: dict[str, Any], key: str, floor_ns: int) -> int:
    """A monotonic timestamp from the worker (same clock): between `floor_ns` and now, else clamped —
    a worker cannot make a reply's timing negative or claim the future."""
    value = _number(meta, key, integer=True)
    now = time.monotonic_ns()
    return min(max(value, floor_ns), now)


def _timing(meta: dict[str, Any], floor_ns: int, ok: bool) -> WorkerTiming:
    recv_ns = _clock(meta, "recv_ns", floor_ns)
    send_ns = _clock(meta, "send_ns", recv_ns)
    if ok:
        return WorkerTiming(recv_ns, send_ns, _number(meta, "prep_us"), _number(meta, "compute_us"), _number(meta, "encode_us"), _number(meta, "cpu_us"))
    return WorkerTiming(recv_ns, send_ns, 0.0, 0.0, 0.0, _number(meta, "cpu_us"))


def tensor_spec(raw: Any, *, metadata: bool) -> dict[str, Any]:
    """A checked {name, datatype, shape}; in metadata a dimension may be -1 (dynamic)."""
    if not isinstance(raw, dict):
        raise BadWorkerMessage("tensor spec is not a map")
    name = _text(raw.get("name"), MAX_NAME + 1, "tensor name")
    if not name or len(name) > MAX_NAME:
        raise BadWorkerMessage("tensor name empty or too long")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # (a list is unhashable: TypeError, round 64)
        raise BadWorkerMessage(f"unknown datatype {datatype!r}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise BadWorkerMessage("shape is not a list of at most 64 dimensions")
    lowest = -1 if metadata else 0
    for dim in shape:
        if type(dim) is not int or dim < lowest or dim > 1 << 48:
            raise BadWorkerMessage(f"bad dimension {dim!r}")
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def _frame_matches(spec: dict[str, Any], frame: Buffer) -> None:
    size = ELEMENT_SIZE.get(spec["datatype"])
    if size is None:
        return  # BYTES: variable length; the client checks the element framing
    count = 1
    for dim in spec["shape"]:
        count *= dim
    if count * size != len(frame):
        raise BadWorkerMessage(f"output {spec['name']!r}: {spec['datatype']}{spec['shape']} needs {count * size} bytes, frame has {len(frame)}")


def _error(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise BadWorkerMessage("error is not a map")
    code = raw.get("code")
    message = _text(raw.get("message", ""), MAX_MESSAGE_TEXT, "error message")
    return {"code": code if isinstance(code, str) and code in _CODES else ErrorCode.INTERNAL.value, "message": message}


# -- messages ------------------------------------------------------------------------------------------
def parse_hello(frames: Sequence[Buffer]) -> Hello:
    meta = _meta(frames)
    inputs, outputs = meta.get("inputs"), meta.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) > MAX_TENSORS or len(outputs) > MAX_TENSORS or not outputs:
        raise BadWorkerMessage("HELLO without valid inputs/outputs lists")
    load_ms = meta.get("load_ms")
    warmup_error = meta.get("warmup_error")
    checked_inputs = [tensor_spec(spec, metadata=True) for spec in inputs]
    checked_outputs = [tensor_spec(spec, metadata=True) for spec in outputs]
    for specs in (checked_inputs, checked_outputs):
        if len({spec["name"] for spec in specs}) != len(specs):  # a name is how clients pick a tensor
            raise BadWorkerMessage("HELLO names a tensor twice")
    return Hello(
        pid=_number(meta, "pid", integer=True),
        inputs=checked_inputs,
        outputs=checked_outputs,
        load_ms=float(load_ms) if isinstance(load_ms, (int, float)) and not isinstance(load_ms, bool) and math.isfinite(load_ms) else None,
        warmup_error=_text(warmup_error, 500, "warm-up error") if warmup_error is not None else None,
    )


READY_DEPTH = 4  # the description's maps and lists nest 3 deep (threads -> tid -> fields)


def parse_ready(frames: Sequence[Buffer]) -> dict[str, Any]:
    """The worker's description of its sandbox: shown in `status`, logged, never acted on. Kept as plain
    data: scalars, and lists and string-keyed maps of them nested at most READY_DEPTH deep, in 64 KiB
    (round 63: a list nested 1,021 deep - msgpack reads 1,024 - raised RecursionError out of the log call
    in the middle of the supervisor's handling of READY, so systemd never got READY=1, and made every
    later `status` fail INTERNAL: msgpack writes fewer levels than it reads)."""
    if len(frames) > 1 and len(frames[1]) > 64 * 1024:
        raise BadWorkerMessage("READY description over 64 KiB")
    meta = _meta(frames)
    return {_key(key): _plain(value, READY_DEPTH - 1) for key, value in meta.items()}


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise BadWorkerMessage("READY description has a key that is not a string")
    return key[:64]


def _plain(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value[:MAX_MESSAGE_TEXT]
    if isinstance(value, (list, dict)) and depth <= 0:
        raise BadWorkerMessage(f"READY description nested deeper than {READY_DEPTH}")
    if isinstance(value, list):
        return [_plain(item, depth - 1) for item in value]
    if isinstance(value, dict):
        return {_key(key): _plain(item, depth - 1) for key, item in value.items()}
    raise BadWorkerMessage(f"READY description holds a {type(value).__name__}")


@dataclass(frozen=True)
class PongReport:
    cache_held: tuple[int, int] | None  # (entries, bytes) of its verdict cache; None: the model has no [cache]
    request_bytes: int  # held for direct requests in flight and replies not yet read


def parse_pong_report(frame: Buffer, cache: Any, memory_limit: int | None) -> PongReport:
    """A PONG's report (messages.PONG_REPORT); BadWorkerMessage when the worker cannot have made it: a
    cache it was not given, or more than its cache may hold, or more held for requests than its memory
    limit allows."""
    if len(frame) != messages.PONG_REPORT.size:
        raise BadWorkerMessage("PONG report of the wrong size")
    entries, cache_bytes, request_bytes = messages.PONG_REPORT.unpack(bytes(frame))
    if cache is None and (entries or cache_bytes):
        raise BadWorkerMessage("PONG reports a cache its model does not have")
    if cache is not None and (entries > cache.entries or cache_bytes > cache.max_bytes):
        raise BadWorkerMessage("PONG reports more cache than its model's [cache] allows")
    if memory_limit is not None and request_bytes > memory_limit:
        raise BadWorkerMessage("PONG reports more held for requests than its memory limit")
    return PongReport((entries, cache_bytes) if cache is not None else None, request_bytes)


def _cache_outcome(meta: dict[str, Any]) -> str | None:
    outcome = meta.get("cache")
    if outcome not in (None, "hit", "miss"):
        raise BadWorkerMessage("`cache` is neither hit nor miss")
    return outcome  # type: ignore[no-any-return]


def _chain_stages(meta: dict[str, Any], members: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    """A chain's per-member times: only its own members, each with a count and a duration."""
    raw = meta.get("stages")
    if raw is None:
        return None
    if not members:
        raise BadWorkerMessage("per-model stages from a worker that serves no chain")
    if not isinstance(raw, dict) or set(raw) != set(members):
        raise BadWorkerMessage("stages are not the chain's members")
    stages = {}
    for name in members:
        entry = raw[name]
        if not isinstance(entry, dict) or set(entry) != {"runs", "compute_us"}:
            raise BadWorkerMessage(f"stage {name!r} is not {{runs, compute_us}}")
        runs = _number(entry, "runs", integer=True)
        if not 0 <= runs <= MAX_MODEL_CALLS:
            raise BadWorkerMessage(f"stage {name!r}: {runs} runs")
        stages[name] = {"runs": runs, "compute_us": float(_number(entry, "compute_us"))}
    return stages


def parse_result(frames: Sequence[Buffer], dispatched_ns: int, wanted: Sequence[str], members: Sequence[str] = ()) -> TaskResult:
    """RESULT for the task the worker runs: its outputs must be exactly `wanted`, in order; a chain's
    (`members`) may say how long each member ran."""
    meta = _meta(frames)
    data = list(frames[2:])
    if "error" in meta:
        if data:
            raise BadWorkerMessage("an error result with data frames")
        cache = _cache_outcome(meta)  # "miss": looked up, then failed (round 24: such lookups went uncounted)
        if cache == "hit":
            raise BadWorkerMessage("an error said to be answered from the cache")
        return TaskResult(_timing(meta, dispatched_ns, ok=False), [], [], _error(meta["error"]), cache)
    raw_outputs = meta.get("outputs")
    if not isinstance(raw_outputs, list) or len(raw_outputs) != len(data):
        raise BadWorkerMessage("outputs do not match the data frames")
    outputs = [tensor_spec(spec, metadata=False) for spec in raw_outputs]
    if [spec["name"] for spec in outputs] != list(wanted):
        raise BadWorkerMessage("outputs are not the ones the task asked for")
    for spec, frame in zip(outputs, data):
        _frame_matches(spec, frame)
    timing = _timing(meta, dispatched_ns, ok=True)
    stages = _chain_stages(meta, members)
    # Each member's time within the request's (not their sum: a drive step may run members in threads at once).
    if stages is not None and max(stage["compute_us"] for stage in stages.values()) > timing.compute_us + 1.0:
        raise BadWorkerMessage("a stage of the chain ran longer than the request computed")
    return TaskResult(timing, outputs, data, None, _cache_outcome(meta), stages)


def _bad_members(raw: Any, size: int) -> dict[int, dict[str, str]] | None:
    """A failed batch's [[member, error], ...]: each a member it has, once, with a protocol error."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not 0 < len(raw) <= size:
        raise BadWorkerMessage("a failed batch's bad members are not a list of its members")
    bad: dict[int, dict[str, str]] = {}
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 2 or type(entry[0]) is not int or not 0 <= entry[0] < size or entry[0] in bad:
            raise BadWorkerMessage("a failed batch names a member it does not have")
        bad[entry[0]] = _error(entry[1])
    return bad


def parse_batch(frames: Sequence[Buffer], task_ids: list[int], rows: list[int], wanted: Sequence[str], dispatched_ns: int) -> BatchResult:
    """RESULTS for the batch the worker runs (`task_ids`, with `rows` each)."""
    meta = _meta(frames)
    data = list(frames[2:])
    if meta.get("tasks") != task_ids:
        raise BadWorkerMessage("RESULTS names other tasks than the batch it was given")
    if "error" in meta:
        if data:
            raise BadWorkerMessage("an error result with data frames")
        error = _error(meta["error"])
        return BatchResult(_timing(meta, dispatched_ns, ok=False), False, [], [], True, _bad_members(meta.get("bad"), len(task_ids)), error)
    timing = _timing(meta, dispatched_ns, ok=True)
    layout = meta.get("layout")
    raw = meta.get("outputs")
    if layout == "rows":
        if not isinstance(raw, list) or len(raw) != len(data):
            raise BadWorkerMessage("outputs do not match the data frames")
        outputs = [tensor_spec(spec, metadata=False) for spec in raw]
        total = sum(rows)
        for spec, frame in zip(outputs, data):
            if spec["datatype"] == "BYTES" or spec["shape"][:1] != [total]:
                raise BadWorkerMessage("a rows-layout output without the batch's rows")
            _frame_matches(spec, frame)
        if [spec["name"] for spec in outputs] != list(wanted):
            raise BadWorkerMessage("outputs are not the ones the batch asked for")
        return BatchResult(timing, True, outputs, data, False)
    if layout != "members" or not isinstance(raw, list) or len(raw) != len(task_ids):
        raise BadWorkerMessage("unknown layout or wrong number of members")
    per_member: list[list[dict[str, Any]]] = []
    offset = 0
    for member, specs in enumerate(raw):
        if not isinstance(specs, list) or len(specs) != len(wanted):
            raise BadWorkerMessage("a member's outputs do not match the batch's")
        checked = [tensor_spec(spec, metadata=False) for spec in specs]
        if [spec["name"] for spec in checked] != list(wanted):
            raise BadWorkerMessage("outputs are not the ones the batch asked for")
        for spec in checked:
            if offset >= len(data):
                raise BadWorkerMessage("fewer data frames than outputs")
            if spec["shape"][:1] != [rows[member]]:
                raise BadWorkerMessage("a member's output has other rows than its input")
            _frame_matches(spec, data[offset])
            offset += 1
        per_member.append(checked)
    if offset != len(data):
        raise BadWorkerMessage("more data frames than outputs")
    return BatchResult(timing, False, per_member, data, False)


def task_id_of(kind_frame: Buffer) -> int:
    if len(kind_frame) != 9:
        raise BadWorkerMessage("RESULT kind frame without an 8-byte task id")
    return messages.unpack_task_id(bytes(kind_frame[1:9]))
