"""Wire protocol v1 constants and the client-side codec. The normative text is docs/PROTOCOL.md.

A message is a ZeroMQ multipart message: frame 0 is a msgpack map (the header), frames 1..n carry the
raw bytes of the tensors the header lists, in order. The daemon's ROUTER also accepts REQ peers, whose
messages start with an empty delimiter frame; it answers them with one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np

from .tensors import BF16Array, encode_array, encode_bytes_scalar

PROTOCOL_VERSION = 1
OPERATIONS: frozenset[str] = frozenset(
    {"infer", "models", "metadata", "health", "status", "stats", "cancel", "reload", "load", "unload", "lease", "attach"}
)
# Limits the daemon enforces by default (configurable in the daemon; the reply to an oversize request says so).
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 257  # header + at most 256 tensors
# BYTES elements in one request, all its inputs together: each costs a worker about a microsecond to
# check, decode and hand to the model, outside anything a deadline can stop (round 14: 16 million empty
# strings, 64 MB, held a worker ten seconds and got it killed as unresponsive, with another uid's request).
MAX_BYTES_ELEMENTS = 1 << 20
MAX_CLIENT_NAME = 64
# The longest `timeout_ms` an `infer` may carry: 2**31 - 1 ms, about 24.8 days. A deadline beyond it
# does not fit the daemon's 64-bit nanosecond clock arithmetic and its workers' stop frames; a request
# with 10**15 once made the supervisor fail halfway through a dispatch (a worker held for max_compute_ms,
# then a second reply to one request).
MAX_TIMEOUT_MS = 2**31 - 1
SOCKET_NAME = "openinfer.sock"
ENV_SOCKET = "OPENINFER_SOCKET"


def default_socket_dir() -> Path:
    """Where the daemon binds by default: $XDG_RUNTIME_DIR/openinfer, else /run/openinfer (root's service)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "openinfer"
    return Path("/run/openinfer")


def default_address() -> str:
    """The per-user socket when a daemon runs for this user, else the system service's socket."""
    path = default_socket_dir() / SOCKET_NAME
    system = Path("/run/openinfer") / SOCKET_NAME
    if not path.exists() and system.exists():
        return f"ipc://{system}"
    return f"ipc://{path}"


def resolve_address(address: str | None) -> str:
    """Explicit address, else $OPENINFER_SOCKET, else the daemon's default."""
    if address:
        return address
    return os.environ.get(ENV_SOCKET) or default_address()


# msgpack's own functions, not wrappers: every request and reply goes through them, and since msgpack 1.0
# (pyproject: msgpack>=1.0) their defaults are ours: packb(use_bin_type=True); unpackb(raw=False, strict_map_key=True,
# every max_*_len bounded by the buffer's size).
pack: Callable[[Any], bytes] = msgpack.packb
unpack: Callable[[bytes | bytearray | memoryview], Any] = msgpack.unpackb


def encode_infer_request(
    request_id: int,
    model: str,
    inputs: Mapping[str, np.ndarray | BF16Array | bytes | bytearray | memoryview | str],
    *,
    version: int | None = None,
    outputs: Sequence[str] | None = None,
    timeout_ms: int | None = None,
    client_name: str | None = None,
    priority: int | None = None,
) -> list[bytes | memoryview]:
    """Frames for one `infer` request; tensor payloads are not copied."""
    specs: list[dict[str, Any]] = []
    payloads: list[bytes | memoryview] = []
    for name, value in inputs.items():
        datatype: str
        shape: list[int]
        payload: bytes | memoryview
        if isinstance(value, (bytes, bytearray, memoryview, str)):  # one BYTES element, as it is (a file's content)
            datatype, shape, payload = "BYTES", [], encode_bytes_scalar(value)
        else:
            datatype, shape, payload = encode_array(value if isinstance(value, BF16Array) else np.asarray(value))
        specs.append({"name": name, "datatype": datatype, "shape": shape})
        payloads.append(payload)
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": "infer", "model": model, "inputs": specs}
    if version is not None:
        header["version"] = int(version)
    if outputs is not None:
        header["outputs"] = list(outputs)
    if timeout_ms is not None:
        header["timeout_ms"] = int(timeout_ms)
    if client_name:
        header["client"] = client_name
    if priority is not None:
        header["priority"] = int(priority)
    return [pack(header), *payloads]


def encode_op_request(request_id: int, op: str, **fields: Any) -> list[bytes]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    header.update({k: v for k, v in fields.items() if v is not None})
    return [pack(header)]


def retry_pause(attempt: int, retries: int, deadline: float, now: float) -> float | None:
    """The client retry policy for UNAVAILABLE: exponential backoff from 50 ms while retries and the
    call's deadline allow; None = give up and raise."""
    pause = 0.05 * 2**attempt
    if attempt >= retries or now + pause >= deadline:
        return None
    return pause
