"""A cheap closed-loop load generator that speaks the wire protocol (docs/PROTOCOL.md) directly.

The Python `Client` spends ~135-195 us of CPU per request; on a 2-core machine the clients then take
the daemon's CPU and compress whatever is being compared. Like Triton's C++ perf_analyzer, this one
keeps its own cost small (~20-30 us per request, reported with every run): one DEALER socket per
process, `c` requests in flight on it (each with its own id), the request bytes encoded once, replies
parsed only as far as the header.

`WirePool` has the contract of loadgen.ClientPool / batching.AsyncPool: `prepare(address, c)`,
`run(address, c, duration_s, warmup_s) -> RunResult`, `pids`, `close()`.
"""
from __future__ import annotations

import time
import traceback
from array import array
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np

from loadgen import SharedLoopsPool

WARMUP_REQUESTS = 50


class WirePool(SharedLoopsPool):
    def __init__(self, size: int, model: str, x: np.ndarray) -> None:
        super().__init__(size, _wire_main, lambda index: (model, x), "bench-wire")


class _Wire:
    """One DEALER socket to one daemon; the request is encoded once, only the id changes."""

    def __init__(self, context: Any, address: str, model: str, x: np.ndarray) -> None:
        import zmq

        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(address)
        spec = [{"name": "x", "datatype": "FP32", "shape": list(x.shape)}]
        self.head = {"v": 1, "id": 0, "op": "infer", "model": model, "inputs": spec}
        self.payload = np.ascontiguousarray(x).tobytes()
        self.next_id = 1

    def send(self) -> int:
        request_id = self.next_id
        self.next_id += 1
        self.head["id"] = request_id
        self.socket.send_multipart([msgpack.packb(self.head), self.payload], copy=True)
        return request_id

    def recv(self) -> dict[str, Any]:
        return msgpack.unpackb(self.socket.recv_multipart(copy=True)[0])


def _wire_main(conn: Connection, model: str, x: np.ndarray) -> None:
    import zmq

    context = zmq.Context()
    wires: dict[str, _Wire] = {}
    conn.send("hello")
    while True:
        command = conn.recv()
        if command[0] == "quit":
            for wire in wires.values():
                wire.socket.close(linger=0)
            context.term()
            return
        try:
            known = wires.get(command[1])
            if known is None:
                known = wires[command[1]] = _Wire(context, command[1], model, x)
                for _ in range(WARMUP_REQUESTS):
                    known.send()
                    known.recv()
            wire = known
            if command[0] == "prepare":
                conn.send("ok")
            else:
                conn.send(_closed_loop(wire, *command[2:]))
        except Exception:
            conn.send({"failure": traceback.format_exc()})


def _closed_loop(wire: _Wire, inflight: int, start_ns: int, measure_ns: int, end_ns: int) -> dict[str, Any]:
    """`inflight` requests outstanding on one socket; each reply starts the next request."""
    now = time.monotonic_ns
    while now() < start_ns:
        time.sleep(0.001)
    sent_at: dict[int, int] = {}
    for _ in range(inflight):
        sent_at[wire.send()] = now()
    latencies = array("q")
    stages: dict[str, array[float]] = {}
    errors: dict[str, int] = {}
    while sent_at:
        header = wire.recv()
        t1 = now()
        t0 = sent_at.pop(header["id"])
        if t0 >= measure_ns and t1 <= end_ns:
            error = header.get("error")
            if error is not None:
                errors[error["code"]] = errors.get(error["code"], 0) + 1
            else:
                latencies.append(t1 - t0)
                for key, value in header.get("timing", {}).items():
                    slot = stages.get(key)
                    if slot is None:
                        slot = stages[key] = array("d")
                    slot.append(value)
        if t1 < end_ns:
            sent_at[wire.send()] = now()
    return {"latencies_ns": latencies.tobytes(), "stages_us": {k: v.tobytes() for k, v in stages.items()}, "errors": errors}
