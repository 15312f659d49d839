"""Request checks done before anything is queued: framing, header, and tensors against model metadata.

Every check raises the typed error the protocol promises, with a message naming what was wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from openinfer.wire.errors import InvalidArgument, ResourceExhausted
from openinfer.wire.protocol import MAX_BYTES_ELEMENTS, MAX_CLIENT_NAME, MAX_FRAMES, MAX_HEADER_BYTES, MAX_TIMEOUT_MS, OPERATIONS, PROTOCOL_VERSION
from openinfer.wire.tensors import DATATYPES, ELEMENT_SIZE, check_bytes_elements



class ValidatedModel(Protocol):
    """What `check_infer` reads of a model: the supervisor's ServedModel, or a worker's own view of the
    model it serves (worker/direct_queue.py)."""

    name: str
    input_by_name: dict[str, dict[str, Any]]
    output_names: frozenset[str]
    input_signatures: list["InputSignature"]

_UINT64_MAX = 2**64 - 1
SIGNATURES_KEPT = 4  # per model: the input lists of the last distinct request shapes that passed


@dataclass(frozen=True, slots=True)
class InputSignature:
    """An `inputs` list that passed every check of `check_infer` for one model, kept on the model: a
    later request with an equal list (and int dimensions: `==` takes 1.0 and true for 1) only has its
    frame sizes checked. Requests of a client mostly repeat one shape, and the full checks were ~2.5 us
    of the supervisor's ~30 us per request under load."""

    inputs: list[dict[str, Any]]  # a private copy of the checked list
    frame_bytes: tuple[int | None, ...]  # per data frame, the byte length its spec implies (None: BYTES)
    bytes_elements: tuple[tuple[int, int], ...]  # (frame index, element count) of each BYTES input
    batch_specs: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, datatype, shape[1:]) per input
    rows: int | None  # dimension 0, shared by every input (None: some input has none, or they differ: never batched)


class OverLimit(ResourceExhausted):
    """A request over a size limit (header, frames, tensor bytes): RESOURCE_EXHAUSTED on the wire, and
    a strike against the connection (daemon/peer_guard.py), since no conforming client sends one."""


def decode_header(frame: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode and check the envelope fields shared by every operation."""
    if len(frame) > MAX_HEADER_BYTES:
        raise OverLimit(f"header is {len(frame)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise InvalidArgument(f"header frame is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def request_id_of(header: dict[str, Any]) -> int | None:
    rid = header.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _UINT64_MAX:
        return rid
    return None


def check_envelope(header: dict[str, Any], frame_count: int) -> str:
    """Version, id, op, client name and frame count; returns the operation name."""
    if type(header.get("v")) is not int or header["v"] != PROTOCOL_VERSION:  # 1.0 and true are not 1
        raise InvalidArgument(f"unsupported protocol version {header.get('v')!r}; this daemon speaks {PROTOCOL_VERSION}")
    rid = header.get("id")
    if type(rid) is not int or not 0 <= rid <= _UINT64_MAX:  # request_id_of, inlined: `type is int` refuses bool
        raise InvalidArgument("`id` must be an unsigned 64-bit integer")
    op = header.get("op")
    if not isinstance(op, str) or op not in OPERATIONS:
        raise InvalidArgument(f"unknown operation {op!r}; known: {', '.join(sorted(OPERATIONS))}")
    client = header.get("client")
    if client is not None:
        _check_client_label(client)
    if frame_count > MAX_FRAMES:
        raise OverLimit(f"{frame_count} frames; the limit is {MAX_FRAMES}")
    if op != "infer" and frame_count != 1:
        raise InvalidArgument(f"`{op}` takes no data frames, got {frame_count - 1}")
    return op


def _check_client_label(client: object) -> None:
    """The `client` label is shown to operators (`openinfer stats`, the access log), and any uid that may
    send a request chooses it: a control character in it (ESC opens a terminal escape sequence: retitle
    the window, clear the screen, a hyperlink) is refused here, on the front door and on a worker's
    endpoint alike, rather than carried to an operator's terminal."""
    if not isinstance(client, str) or len(client) > MAX_CLIENT_NAME:
        raise InvalidArgument(f"`client` must be a string of at most {MAX_CLIENT_NAME} characters")
    if not client.isprintable():  # C0, DEL, C1, and Unicode's other non-printables (bidi overrides, line separators)
        bad = next(ch for ch in client if not ch.isprintable())
        raise InvalidArgument(f"`client` must be printable text: it holds {bad!r} (U+{ord(bad):04X}); control, format and separator characters other than the space are refused")


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_infer(header: dict[str, Any], data_frames: list[Any], model: ValidatedModel, max_request_bytes: int, walk_bytes: bool = True) -> tuple[int, InputSignature]:
    """Validate an `infer` request against the model's metadata; returns the request's payload bytes
    and its inputs' signature (what batching groups by). `walk_bytes`: also walk each BYTES frame's
    element lengths (a worker does; the supervisor does not - a frame of millions of tiny elements would
    hold its one thread for seconds - and sends such inputs to workers member by member instead, where
    each is held to its own count: dispatch._batch_message, compute.member_part)."""
    inputs = header.get("inputs")
    if type(inputs) is list:
        for known in model.input_signatures:
            if inputs == known.inputs and _int_dims(inputs):
                nbytes = _fixed_frames_bytes(known.frame_bytes, data_frames)
                if nbytes is not None and nbytes <= max_request_bytes:
                    for index, count in known.bytes_elements if walk_bytes else ():
                        _check_bytes_frame(inputs[index]["name"], data_frames[index], count)
                    _check_options(header, model)
                    return nbytes, known
                break  # the full checks below name what is wrong
    if not isinstance(inputs, list):
        raise InvalidArgument("`inputs` must be an array of {name, datatype, shape} maps")
    if len(inputs) != len(data_frames):
        raise InvalidArgument(f"`inputs` lists {len(inputs)} tensors but {len(data_frames)} data frames follow")
    nbytes = 0
    for frame in data_frames:
        nbytes += len(frame)
    if nbytes > max_request_bytes:
        raise OverLimit(f"request carries {nbytes} bytes of tensors; the limit for {model.name!r} is {max_request_bytes}")
    seen: set[str] = set()
    expected = model.input_by_name
    frame_bytes: list[int | None] = []
    bytes_elements: list[tuple[int, int]] = []
    elements = 0  # of BYTES inputs, MAX_BYTES_ELEMENTS at most
    for index, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise InvalidArgument(f"inputs[{index}] must be a map")
        name = spec.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"inputs[{index}].name must be a string")
        want = expected.get(name)
        if want is None:
            raise InvalidArgument(f"model {model.name!r} has no input {name!r}; inputs are {sorted(expected)}")
        if name in seen:
            raise InvalidArgument(f"input {name!r} given twice")
        seen.add(name)
        datatype = spec.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidArgument(f"input {name!r}: unknown datatype {datatype!r}")
        if datatype != want["datatype"]:
            raise InvalidArgument(f"input {name!r}: datatype {datatype}, model expects {want['datatype']}")
        shape = spec.get("shape")
        if type(shape) is not list:
            raise InvalidArgument(f"input {name!r}: shape must be an array of non-negative integers")
        for dim in shape:  # a loop, not all(genexpr): this runs for every request
            if type(dim) is not int or dim < 0:  # `type is int` also refuses bool
                raise InvalidArgument(f"input {name!r}: shape must be an array of non-negative integers")
        want_shape = want["shape"]
        if len(shape) != len(want_shape):
            raise InvalidArgument(f"input {name!r}: rank {len(shape)} {shape}, model expects rank {len(want_shape)} {want_shape}")
        for axis, (got, need) in enumerate(zip(shape, want_shape)):
            if need >= 0 and got != need:
                raise InvalidArgument(f"input {name!r}: dimension {axis} is {got}, model expects {need} (shape {want_shape})")
        size = ELEMENT_SIZE.get(datatype)
        if size is not None:
            count = 1
            for dim in shape:
                count *= dim
            if count * size != len(data_frames[index]):
                raise InvalidArgument(
                    f"input {name!r}: {datatype}{shape} needs {count * size} bytes, data frame has {len(data_frames[index])}"
                )
            frame_bytes.append(count * size)
        else:
            count = 1
            for dim in shape:
                count *= dim
            elements += count
            if elements > MAX_BYTES_ELEMENTS:  # before any is read
                raise ResourceExhausted(f"the request's BYTES inputs hold {elements} elements or more; the limit is {MAX_BYTES_ELEMENTS} in one request (send fewer at a time)", {"limit": MAX_BYTES_ELEMENTS})
            if walk_bytes:
                _check_bytes_frame(name, data_frames[index], count)
            bytes_elements.append((index, count))
            frame_bytes.append(None)
    missing = expected.keys() - seen
    if missing:
        raise InvalidArgument(f"model {model.name!r} is missing inputs {sorted(missing)}")
    _check_options(header, model)
    signature = InputSignature(
        [{"name": spec["name"], "datatype": spec["datatype"], "shape": list(spec["shape"])} for spec in inputs],
        tuple(frame_bytes),
        tuple(bytes_elements),
        tuple([(spec["name"], spec["datatype"], tuple(spec["shape"][1:])) for spec in inputs]),
        _common_rows(inputs),
    )
    kept = model.input_signatures
    kept.insert(0, signature)
    del kept[SIGNATURES_KEPT:]
    return nbytes, signature


def _check_bytes_frame(name: str, frame: Any, count: int) -> None:
    """A BYTES input's frame must hold exactly the elements its shape says: read by another count (a
    batch reads its members' frames joined), its elements would become another request's."""
    try:
        check_bytes_elements(frame, count)
    except ValueError as exc:
        raise InvalidArgument(f"input {name!r}: {exc} (its shape says {count} elements)") from None


def _common_rows(inputs: list[dict[str, Any]]) -> int | None:
    """Dimension 0 when every input has the same one: the rows a batch may join. A request whose inputs
    disagree (valid alone: a model may broadcast one of them) runs alone - joined into a batch, its
    rows of one input would be cut as another member's."""
    if not inputs or not all(spec["shape"] for spec in inputs):
        return None
    rows = inputs[0]["shape"][0]
    for spec in inputs:
        if spec["shape"][0] != rows:
            return None
    return rows  # type: ignore[no-any-return]


def _int_dims(inputs: list[dict[str, Any]]) -> bool:
    for spec in inputs:
        for dim in spec["shape"]:
            if type(dim) is not int:
                return False
    return True


def _fixed_frames_bytes(frame_bytes: tuple[int | None, ...], data_frames: list[Any]) -> int | None:
    """The frames' total bytes if there is one per input and each has the size its spec implies."""
    if len(data_frames) != len(frame_bytes):
        return None
    nbytes = 0
    for frame, size in zip(data_frames, frame_bytes):
        length = len(frame)
        if size is not None and length != size:
            return None
        nbytes += length
    return nbytes


def _check_options(header: dict[str, Any], model: ValidatedModel) -> None:
    """The header's fields besides the inputs: outputs, timeout, priority, version."""
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise InvalidArgument("`outputs` must be a non-empty array of output names")
        unknown = [o for o in outputs if o not in model.output_names]
        if unknown:
            raise InvalidArgument(f"model {model.name!r} has no outputs {unknown}; outputs are {sorted(model.output_names)}")
        if len(set(outputs)) != len(outputs):
            raise InvalidArgument("`outputs` names an output twice")
    for key in ("timeout_ms", "priority"):
        value = header.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
            raise InvalidArgument(f"`{key}` must be an integer")
    priority = header.get("priority")
    if priority is not None and not 0 <= priority <= 9:
        raise InvalidArgument("`priority` must be between 0 (default) and 9 (most urgent)")
    timeout = header.get("timeout_ms")
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_MS:
        raise InvalidArgument(f"`timeout_ms` must be positive and at most {MAX_TIMEOUT_MS} (about 24.8 days)")
    version = header.get("version")
    if version is not None and not _is_uint(version):
        raise InvalidArgument("`version` must be a non-negative integer")
