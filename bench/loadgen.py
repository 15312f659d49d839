"""Closed-loop load from separate client PROCESSES (multiprocessing, spawn).

Python threads share one GIL, so threaded clients would measure the client. Each process here runs one
request at a time, back to back, for a fixed window, and reports every request's latency. The pool is
spawned once and reused for every target and concurrency level: a level of c uses the first c processes
and the others sleep in `recv()`.

Targets:
  ("daemon", address)  `openinfer.client.Client(address).infer("tiny", {"x": x})`, client-side latency
                       around the whole call, plus the reply's server-side `timing` stages.
  ("bare", address)    a raw pyzmq DEALER + msgpack round trip with the same sizes as a tiny request
                       (see floors.py): header ~90 B + 256 B tensor out, header ~80 B + 256 B back.
                       It speaks wire protocol v1, so it also drives the daemon without the client
                       library's per-call cost (latency.py --client raw).
"""
from __future__ import annotations

import multiprocessing as mp
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

WARMUP_REQUESTS = 50  # per process, the first time it talks to a target (connect, caches, allocator)


@dataclass
class RunResult:
    """One measurement window of one target at one concurrency, all processes merged."""

    concurrency: int
    window_s: float
    latencies_ns: np.ndarray
    stages_us: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    path: str | None = None  # generators that know it: "direct" (PROTOCOL.md 17) or "front-door"
    path_events: dict[str, int] = field(default_factory=dict)  # e.g. leases taken, requests resent

    @property
    def completed(self) -> int:
        return int(self.latencies_ns.size)

    @property
    def throughput_rps(self) -> float:
        return self.completed / self.window_s if self.window_s > 0 else 0.0


class SpawnedPool:
    """`size` spawned processes, each running `main(conn, *args_for(index))` and answering commands sent
    over its pipe (each says "hello" once its imports are done). The load generators build on it."""

    def __init__(self, size: int, main: Callable[..., None], args_for: Callable[[int], tuple[Any, ...]], name: str) -> None:
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for index in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=main, args=(child, *args_for(index)), name=f"{name}-{index}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:
            conn.recv()

    @property
    def size(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def _ask(self, conns: list[Connection], commands: list[tuple[Any, ...]]) -> list[Any]:
        for conn, command in zip(conns, commands):
            conn.send(command)
        return [raise_if_failed(conn.recv()) for conn in conns]

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

    def __enter__(self) -> "SpawnedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedLoopsPool(SpawnedPool):
    """Processes that each carry a share of the requests in flight (many per process): the command is
    ("run", address, share, start_ns, measure_ns, end_ns); see batching.AsyncPool, wireload.WirePool."""

    def prepare(self, address: str, concurrency: int) -> None:
        used = len(share(concurrency, self.size))
        self._ask(self._conns[:used], [("prepare", address)] * used)

    def run(self, address: str, concurrency: int, duration_s: float, warmup_s: float) -> RunResult:
        self.prepare(address, concurrency)
        shares = share(concurrency, self.size)
        start_ns, measure_ns, end_ns = run_window(duration_s, warmup_s)
        parts = self._ask(self._conns[: len(shares)], [("run", address, n, start_ns, measure_ns, end_ns) for n in shares])
        return merge_parts(concurrency, (end_ns - measure_ns) / 1e9, parts)


def run_window(duration_s: float, warmup_s: float) -> tuple[int, int, int]:
    """(start, measure, end) on the shared monotonic clock: every process starts at the same instant,
    discards `warmup_s`, then records requests that start and finish inside the window."""
    start_ns = time.monotonic_ns() + 100_000_000
    measure_ns = start_ns + int(warmup_s * 1e9)
    return start_ns, measure_ns, measure_ns + int(duration_s * 1e9)


def share(concurrency: int, processes: int) -> list[int]:
    """Requests in flight per process: `concurrency` spread over the pool as evenly as possible."""
    used = min(concurrency, processes)
    return [concurrency // used + (1 if i < concurrency % used else 0) for i in range(used)]


def merge_parts(concurrency: int, window_s: float, parts: list[dict[str, Any]]) -> RunResult:
    """The per-process {latencies_ns, stages_us, errors} of one window as one RunResult."""
    latencies = np.concatenate([np.frombuffer(p["latencies_ns"], dtype=np.int64) for p in parts]) if parts else np.empty(0, np.int64)
    stages: dict[str, list[np.ndarray]] = {}
    errors: dict[str, int] = {}
    for part in parts:
        for key, values in part["stages_us"].items():
            stages.setdefault(key, []).append(np.frombuffer(values, dtype=np.float64))
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return RunResult(concurrency, window_s, latencies, {k: np.concatenate(v) for k, v in stages.items()}, errors)


class ClientPool(SpawnedPool):
    """`size` spawned client processes (the sync Client), one closed loop each."""

    def __init__(self, size: int) -> None:
        super().__init__(size, _client_main, lambda index: (index,), "bench-client")

    def prepare(self, target: tuple[str, str], concurrency: int) -> None:
        """Connect the first `concurrency` processes to `target` and warm them up (first contact only).

        Call it before taking CPU snapshots so connection set-up is not counted; run() calls it too."""
        self._ask(self._conns[:concurrency], [("prepare", target)] * concurrency)

    def run(self, target: tuple[str, str], concurrency: int, duration_s: float, warmup_s: float = 0.25) -> RunResult:
        """Run `concurrency` closed loops against `target`; count what completes in the window."""
        if concurrency > self.size:
            raise ValueError(f"pool has {self.size} processes, {concurrency} requested")
        self.prepare(target, concurrency)
        start_ns, measure_ns, end_ns = run_window(duration_s, warmup_s)
        parts = self._ask(self._conns[:concurrency], [("run", target, start_ns, measure_ns, end_ns)] * concurrency)
        return merge_parts(concurrency, (end_ns - measure_ns) / 1e9, parts)


def raise_if_failed(reply: Any) -> Any:
    if isinstance(reply, dict) and "failure" in reply:
        raise RuntimeError(f"client process failed: {reply['failure']}")
    return reply


# -- inside a client process ------------------------------------------------------------------------
Call = Callable[[], dict[str, float] | None]  # one request; returns the server timing, if any


def _client_main(conn: Connection, index: int) -> None:
    import traceback

    from common import tiny_input

    x = tiny_input(seed=index)
    calls: dict[tuple[str, str], Call] = {}
    conn.send("hello")
    while True:
        command = conn.recv()
        if command[0] == "quit":
            return
        try:
            target = command[1]
            call = calls.get(target)
            if call is None:
                call = calls[target] = _make_call(target, x)
                for _ in range(WARMUP_REQUESTS):
                    call()
            if command[0] == "prepare":
                conn.send("ok")
            else:
                conn.send(_closed_loop(call, *command[2:]))
        except Exception:
            conn.send({"failure": traceback.format_exc()})


def _make_call(target: tuple[str, str], x: np.ndarray) -> Call:
    kind, address = target
    if kind == "daemon":
        return _daemon_call(address, x)
    if kind == "bare":
        return _bare_call(address, x)
    raise ValueError(f"unknown target kind {kind!r}")


def _daemon_call(address: str, x: np.ndarray) -> Call:
    from openinfer.client import Client

    client = Client(address, timeout=10.0)
    inputs = {"x": x}

    def call() -> dict[str, float]:
        return client.infer("tiny", inputs).timing

    return call


def _bare_call(address: str, x: np.ndarray) -> Call:
    import msgpack
    import zmq

    from openinfer.wire.errors import error_from_wire

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    payload = x.tobytes()
    spec = [{"name": "x", "datatype": "FP32", "shape": list(x.shape)}]
    counter = iter(range(1, 1 << 62))
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def call() -> dict[str, float] | None:
        request_id = next(counter)
        header = packb({"v": 1, "id": request_id, "op": "infer", "model": "tiny", "inputs": spec, "timeout_ms": 10000}, use_bin_type=True)
        sock.send_multipart([header, payload])
        frames = sock.recv_multipart()
        reply = unpackb(frames[0], raw=False)
        if "error" in reply:
            raise error_from_wire(reply["error"])  # counted by code, like the client library's errors
        if reply["id"] != request_id:
            raise RuntimeError(f"bare round trip: reply id {reply['id']} for request {request_id}")
        return reply.get("timing")  # the daemon's stages when the peer is the daemon; None from floor B

    return call


def _closed_loop(call: Call, start_ns: int, measure_ns: int, end_ns: int) -> dict[str, Any]:
    from openinfer.client import OpenInferError

    now = time.monotonic_ns
    delay = (start_ns - now()) / 1e9
    if delay > 0:
        time.sleep(delay)
    tally = WindowTally(measure_ns, end_ns)
    while True:
        t0 = now()
        try:
            timing = call()
            code = None
        except OpenInferError as exc:
            timing, code = None, exc.code
        t1 = now()
        tally.add(t0, t1, timing, code)
        if t1 >= end_ns:
            break
    return tally.result()


class WindowTally:
    """What a closed loop measured: the requests sent and answered inside [measure_ns, end_ns] - their
    latency and server stages, or their error code. `result()` is what the pools read back."""

    def __init__(self, measure_ns: int, end_ns: int) -> None:
        self.measure_ns, self.end_ns = measure_ns, end_ns
        self.latencies = array("q")
        self.stages: dict[str, array[float]] = {}
        self.errors: dict[str, int] = {}

    def add(self, t0: int, t1: int, timing: dict[str, float] | None, code: str | None) -> None:
        if t0 < self.measure_ns or t1 > self.end_ns:
            return
        if code is not None:
            self.errors[code] = self.errors.get(code, 0) + 1
            return
        self.latencies.append(t1 - t0)
        for key, value in (timing or {}).items():
            slot = self.stages.get(key)
            if slot is None:
                slot = self.stages[key] = array("d")
            slot.append(value)

    def result(self) -> dict[str, Any]:
        return {"latencies_ns": self.latencies.tobytes(), "stages_us": {k: v.tobytes() for k, v in self.stages.items()}, "errors": self.errors}


def concurrency_levels(text: str) -> list[int]:
    """`1,4,8,16` -> [1, 4, 8, 16]."""
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise ValueError(f"bad concurrency levels {text!r}")
    return levels

