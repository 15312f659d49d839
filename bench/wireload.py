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

import multiprocessing as mp
import time
import traceback
from array import array
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np

from loadgen import RunResult

WARMUP_REQUESTS = 50


class WirePool:
    def __init__(self, size: int, model: str, x: np.ndarray) -> None:
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for index in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_wire_main, args=(child, model, x), name=f"bench-wire-{index}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:
            conn.recv()

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def _shares(self, concurrency: int) -> list[int]:
        used = min(concurrency, len(self._procs))
        return [concurrency // used + (1 if i < concurrency % used else 0) for i in range(used)]

    def prepare(self, address: str, concurrency: int) -> None:
        conns = self._conns[: len(self._shares(concurrency))]
        for conn in conns:
            conn.send(("prepare", address))
        for conn in conns:
            _raise_if_failed(conn.recv())

    def run(self, address: str, concurrency: int, duration_s: float, warmup_s: float) -> RunResult:
        self.prepare(address, concurrency)
        shares = self._shares(concurrency)
        conns = self._conns[: len(shares)]
        start_ns = time.monotonic_ns() + 100_000_000
        measure_ns = start_ns + int(warmup_s * 1e9)
        end_ns = measure_ns + int(duration_s * 1e9)
        for conn, inflight in zip(conns, shares):
            conn.send(("run", address, inflight, start_ns, measure_ns, end_ns))
        parts = [_raise_if_failed(conn.recv()) for conn in conns]
        latencies = np.concatenate([np.frombuffer(p["latencies_ns"], dtype=np.int64) for p in parts])
        stages: dict[str, list[np.ndarray]] = {}
        errors: dict[str, int] = {}
        for part in parts:
            for key, values in part["stages_us"].items():
                stages.setdefault(key, []).append(np.frombuffer(values, dtype=np.float64))
            for code, n in part["errors"].items():
                errors[code] = errors.get(code, 0) + n
        return RunResult(concurrency, (end_ns - measure_ns) / 1e9, latencies, {k: np.concatenate(v) for k, v in stages.items()}, errors)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _raise_if_failed(reply: Any) -> Any:
    if isinstance(reply, dict) and "failure" in reply:
        raise RuntimeError(f"wire load process failed: {reply['failure']}")
    return reply


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
            wire = wires.get(command[1])
            if wire is None:
                wire = wires[command[1]] = _Wire(context, command[1], model, x)
                for _ in range(WARMUP_REQUESTS):
                    wire.send()
                    wire.recv()
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
