"""The two floors a server on this machine is judged against.

Floor A: onnxruntime `session.run` in-process on the tiny model (batch 1, 1 intra-op thread): the work
itself; everything a server adds is overhead.

Floor B: the bare transport a two-hop design pays, with no validation, accounting or onnxruntime:
  client DEALER -> broker process (ROUTER front, ROUTER back, a minimal Python poll loop that forwards
  frames to an idle worker, queueing when none is) -> echo worker process (DEALER) that decodes the
  msgpack header and answers with a msgpack header + the 256-byte payload.
Messages have the sizes of a tiny-model request and reply. The broker forwards frames as bytes
(copy=True: cheaper than zmq.Frame below ~64 KiB, DESIGN.md §5) and drains up to 64 messages per poll,
like the supervisor.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
import numpy as np

READY = b"READY"


# -- floor A ----------------------------------------------------------------------------------------
def measure_inprocess(model: Path, repeats: int, duration_s: float) -> list[np.ndarray]:
    """Per-call `session.run` latencies (ns) for each repeat, measured in a fresh spawned process
    (telemetry off there, as in workers; the benchmark's own environment is left alone)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_inprocess_main, args=(child, str(model), repeats, duration_s), name="bench-floor-a")
    proc.start()
    child.close()
    try:
        reply = parent.recv()
    finally:
        proc.join()
    if isinstance(reply, str):
        raise RuntimeError(f"floor A failed: {reply}")
    return [np.frombuffer(raw, dtype=np.int64) for raw in reply]


def _inprocess_main(conn: Connection, model: str, repeats: int, duration_s: float) -> None:
    import os
    import traceback

    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    try:
        import onnxruntime as ort

        from common import tiny_input

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        feed = {"x": tiny_input()}
        run = session.run
        for _ in range(500):
            run(None, feed)
        now = time.monotonic_ns
        out = []
        for _ in range(repeats):
            samples = np.empty(2_000_000, dtype=np.int64)
            n = 0
            end = now() + int(duration_s * 1e9)
            while n < samples.size:
                t0 = now()
                run(None, feed)
                t1 = now()
                samples[n] = t1 - t0
                n += 1
                if t1 >= end:
                    break
            out.append(samples[:n].tobytes())
        conn.send(out)
    except Exception:
        conn.send(traceback.format_exc())


# -- floor B ----------------------------------------------------------------------------------------
class BareBroker:
    """A broker process and `workers` echo worker processes on ipc:// paths under `workdir`.

    `address` is the broker's front end, for loadgen's ("bare", address) target; `pids` is every
    process of the path (for CPU accounting)."""

    def __init__(self, workdir: Path, workers: int = 2) -> None:
        self.address = f"ipc://{workdir}/floor-front.sock"
        self._back = f"ipc://{workdir}/floor-back.sock"
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.broker = ctx.Process(target=_broker_main, args=(self.address, self._back, child, workers), name="bench-floor-broker", daemon=True)
        self.broker.start()
        child.close()
        if parent.recv() != "bound":
            raise RuntimeError("floor B broker failed to bind")
        self.workers = [ctx.Process(target=_echo_main, args=(self._back,), name=f"bench-floor-echo-{i}", daemon=True) for i in range(workers)]
        for proc in self.workers:
            proc.start()
        if not parent.poll(30) or parent.recv() != "ready":
            raise RuntimeError("floor B echo workers did not check in")
        self._conn = parent

    @property
    def broker_pid(self) -> int:
        return int(self.broker.pid)  # type: ignore[arg-type]

    @property
    def worker_pids(self) -> list[int]:
        return [int(p.pid) for p in self.workers]  # type: ignore[arg-type]

    def close(self) -> None:
        for proc in [self.broker, *self.workers]:
            proc.kill()
        for proc in [self.broker, *self.workers]:
            proc.join()

    def __enter__(self) -> "BareBroker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _broker_main(front_address: str, back_address: str, conn: Connection, expected_workers: int) -> None:
    import zmq

    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    for sock in (front, back):
        sock.setsockopt(zmq.LINGER, 0)
    front.bind(front_address)
    back.bind(back_address)
    conn.send("bound")
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    idle: deque[bytes] = deque()
    pending: deque[list[bytes]] = deque()
    checked_in = 0
    front_recv, back_recv = front.recv_multipart, back.recv_multipart
    front_send, back_send = front.send_multipart, back.send_multipart
    again = zmq.Again
    noblock = zmq.NOBLOCK
    while True:
        for sock, _ in poller.poll():
            if sock is back:
                for _ in range(64):
                    try:
                        frames = back_recv(noblock)
                    except again:
                        break
                    worker = frames[0]
                    if len(frames) == 2:  # [worker, READY]
                        checked_in += 1
                        if checked_in == expected_workers:
                            conn.send("ready")
                    else:  # [worker, client, header, payload]
                        front_send(frames[1:])
                    if pending:
                        back_send([worker, *pending.popleft()])
                    else:
                        idle.append(worker)
            else:
                for _ in range(64):
                    try:
                        frames = front_recv(noblock)
                    except again:
                        break
                    if idle:
                        back_send([idle.popleft(), *frames])
                    else:
                        pending.append(frames)


def _echo_main(back_address: str) -> None:
    import msgpack
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(back_address)
    sock.send(READY)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    outputs = [{"name": "y", "datatype": "FP32", "shape": [1, 64]}]
    while True:
        client, header, payload = sock.recv_multipart()
        request = unpackb(header, raw=False)
        reply = packb({"v": 1, "id": request["id"], "model": "tiny", "version": 1, "outputs": outputs}, use_bin_type=True)
        sock.send_multipart([client, reply, payload])


def message_sizes() -> dict[str, int]:
    """Bytes of floor B's request and reply headers and payload (for the results file)."""
    import msgpack

    request = msgpack.packb({"v": 1, "id": 1 << 40, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}], "timeout_ms": 10000}, use_bin_type=True)
    reply = msgpack.packb({"v": 1, "id": 1 << 40, "model": "tiny", "version": 1, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64]}]}, use_bin_type=True)
    return {"request_header_bytes": len(request), "reply_header_bytes": len(reply), "payload_bytes": 256}

