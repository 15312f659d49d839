"""Supervisor <-> worker channel (internal; not the public wire protocol).

The channel is a socketpair made at spawn (the worker's end is its fd 4): no other process can reach it,
and the supervisor knows which worker is on each. Messages are multipart, framed as ZMTP frames
(openinfer.wire.zmtp) without a greeting. Frame 0 starts with a one-byte kind (TASK and RESULT append the
8-byte little-endian task id to it: one frame less per message on the hot path; a TASK then carries its
stop: the task's deadline (CLOCK_MONOTONIC ns, the same clock in every process of the host) and the
model's max_compute_ms in ns, 8 bytes each - the worker stops the run at the earlier of the deadline and
max_compute after it starts it, and answers DEADLINE_EXCEEDED; then, for a model whose verdict cache is
per identity, the client's kernel-proven identity, UTF-8). Everything a worker
sends is checked by the supervisor against what that worker was given (daemon/workerpool/worker_inbound.py) before
any state changes; a message that does not fit retires the worker.

  worker -> supervisor                        supervisor -> worker
  HELLO  [b"H", meta]  model loaded            ACK   [b"A", lease key] channel proven, go sandbox
  READY  [b"Y", sandbox]  serve policy on      TASK  [b"T"+task_id+stop(+identity), client header, *data]
  RESULT [b"R"+task_id, meta, *outputs]       QUIT  [b"Q", sent_ns(, drain_ns)]  finish and exit 0 (drain from sent_ns)
  RESULTS [b"S", meta, *outputs]  the answers of one BATCH (layout below)
  FAILED [b"E", {"message"}]  boot failed      PING  [b"P", token]
                                               BATCH [b"B", plan, *data]  (layout below)
  PONG   [b"p", token, report]                KEY   [b"K", lease key]   after a reload
                                               APART [b"U", table]  whose direct requests to batch
                                                                    apart (direct/batch_apart.py)
                                               BAR   [b"X", [identity, message, retry_after_s]]  a
                                                     client refused the model (crash strikes): its
                                                     queued direct requests are answered so

QUIT's drain_ns (u64 LE) is how long clients told GOAWAY may still send; absent, the worker's own (4 s).
A hard stop sends 0: the worker answers what it queued and did not start as a lease expiry and leaves
after the run it is in (serve.py _leave).

PONG report = three u64 LE: verdict-cache entries, cache bytes, bytes held for direct requests in flight
(arriving, queued or running) and replies not yet read (serve.py _pong_report; recycling.py).

BATCH plan = {tasks, rows (per task), inputs (the batch's specs, dim 0 = all rows), outputs, joined,
deadline_ns (the earliest of its tasks'), max_compute_ns}:
joined -> one data frame per input holding every task's rows in task order; else per task its input
frames. RESULTS meta["layout"]: "rows" -> one frame per output for the whole batch (the supervisor cuts
each task's rows out by byte offset); "members" -> per task its output frames (BYTES outputs).
"""
from __future__ import annotations

import struct

HELLO = b"H"
READY = b"Y"
RESULT = b"R"
RESULTS = b"S"
FAILED = b"E"
PONG = b"p"
PONG_REPORT = struct.Struct("<QQQ")
ACK = b"A"
TASK = b"T"
BATCH = b"B"
QUIT = b"Q"
PING = b"P"
KEY = b"K"  # [b"K", key]: the new lease key (every reload makes one; direct.py checks leases with it)
APART = b"U"  # [b"U", msgpack {identity: until_ns}]: after the ACK and on every change (direct/batch_apart.py)
BAR = b"X"  # [b"X", msgpack [identity, message, retry_after_s]]: a client refused the model (workerpool/crash_blame.py)

_TASK_ID = struct.Struct("<Q")
_STOP = struct.Struct("<QQ")  # a TASK's deadline_ns and max_compute_ns, after its task id
TASK_HEAD_BYTES = 1 + _TASK_ID.size + _STOP.size  # kind, task id, stop; then the identity, if any

# What the worker accepts from the supervisor on its channel (the supervisor enforces its own, tighter
# limits on what workers send: worker_inbound.py).
CHANNEL_LIMITS = {"frames": 1 << 20, "first_frame": 1 << 30, "message_bytes": 1 << 40}


def pack_task_id(task_id: int) -> bytes:
    return _TASK_ID.pack(task_id)


def unpack_task_id(raw: bytes | memoryview) -> int:
    return _TASK_ID.unpack(raw)[0]


def pack_stop(deadline_ns: int, max_compute_ns: int) -> bytes:
    return _STOP.pack(deadline_ns, max_compute_ns)


def unpack_stop(raw: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(deadline_ns, max_compute_ns) of a TASK's frame 0."""
    deadline_ns, max_compute_ns = _STOP.unpack_from(raw, 1 + _TASK_ID.size)
    return deadline_ns, max_compute_ns
