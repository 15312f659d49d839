"""Supervisor <-> worker channel (internal; not the public wire protocol).

Every message is multipart; frame 0 starts with a one-byte kind (TASK and RESULT append the 8-byte
little-endian task id to it: one frame less per message on the hot path). The worker's DEALER identity
is its worker id.

  worker -> supervisor                        supervisor -> worker
  HELLO  [b"H", meta]  model loaded            ACK   [b"A"]           channel proven, go sandbox
  READY  [b"Y", sandbox]  serve policy on      TASK  [b"T"+task_id, client header, *data]
  RESULT [b"R"+task_id, meta, *outputs]       QUIT  [b"Q"]           finish and exit 0
  RESULTS [b"S", meta, per task: *outputs]  the answers of one BATCH, in its order
  FAILED [b"E", {"message"}]  boot failed      PING  [b"P", token]
                                               BATCH [b"B", {tasks, frames}, per task: header, *data]
  PONG   [b"p", token]
"""
from __future__ import annotations

import struct

HELLO = b"H"
READY = b"Y"
RESULT = b"R"
RESULTS = b"S"
FAILED = b"E"
PONG = b"p"
ACK = b"A"
TASK = b"T"
BATCH = b"B"
QUIT = b"Q"
PING = b"P"

_TASK_ID = struct.Struct("<Q")


def pack_task_id(task_id: int) -> bytes:
    return _TASK_ID.pack(task_id)


def unpack_task_id(raw: bytes | memoryview) -> int:
    return _TASK_ID.unpack(raw)[0]
