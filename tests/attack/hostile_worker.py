"""A compromised worker: speaks the supervisor <-> worker channel and lies in the ways a worker taken over
by its model or its input could. Started by hostile_daemon.py in place of the real worker for models
whose name starts with "hostile-"; the rest of the name is the attack (see ATTACKS).

It needs nothing of the daemon but the channel's framing, so it runs against the socketpair channel (fd
4) and, for checks against older code, against the old ZeroMQ ipc:// channel named in its boot config.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import time

import msgpack

HELLO, READY, RESULT, ACK, TASK, PING, PONG, QUIT = b"H", b"Y", b"R", b"A", b"T", b"P", b"p", b"Q"
SPEC = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
OUT = {"name": "y", "datatype": "FP32", "shape": [-1, 4]}
FORGED_LOG = '{"ts":"2026-01-01T00:00:00.000Z","level":"info","logger":"openinfer.supervisor","msg":"FORGED supervisor line: reload complete"}'


class SocketpairChannel:
    def __init__(self) -> None:
        import socket

        from openinfer.wire.zmtp import FrameStream, Limits

        sock = socket.socket(fileno=4)
        self.stream = FrameStream(sock, Limits(frames=1 << 16, first_frame=1 << 30, message_bytes=1 << 40))
        self.pending: list[list[bytes]] = []

    def send(self, frames: list[bytes]) -> None:
        self.stream.send(frames)
        while self.stream.out_bytes:
            self.stream.flush()

    def send_raw(self, data: bytes) -> None:
        self.stream.sock.sendall(data)

    def recv(self) -> list[bytes]:
        import select

        while not self.pending:
            select.select([self.stream.sock], [], [])
            self.pending.extend([bytes(f) for f in event] for event in self.stream.read() if isinstance(event, list))
        return self.pending.pop(0)


class ZmqChannel:
    """The old channel: a DEALER connecting to the supervisor's ipc:// ROUTER (what the attack on the code
    before the fix used)."""

    def __init__(self, address: str, identity: bytes) -> None:
        import zmq

        self.socket = zmq.Context().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.connect(address)

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def send_raw(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self) -> list[bytes]:
        return self.socket.recv_multipart()


def answer(task: list[bytes], attack: str) -> list[bytes] | None:
    """The reply to one TASK, per attack (None: send nothing)."""
    task_id = task[0][1:9]
    header = msgpack.unpackb(task[1])
    x = memoryview(task[2]).cast("f")
    rows = header["inputs"][0]["shape"][0]
    now = time.monotonic_ns()
    meta = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [rows, 4]}], "recv_ns": now, "prep_us": 1.0, "compute_us": 1.0, "encode_us": 1.0, "cpu_us": 1.0, "send_ns": now}
    honest = [RESULT + task_id, msgpack.packb(meta), struct.pack(f"<{len(x)}f", *[2 * v for v in x])]
    if attack == "garbage-meta":
        return [RESULT + task_id, b"\xc1 this is not msgpack"]
    if attack == "missing-send-ns":
        del meta["send_ns"]
        return [RESULT + task_id, msgpack.packb(meta), honest[2]]
    if attack == "wrong-task":
        return [RESULT + struct.pack("<Q", struct.unpack("<Q", task_id)[0] + 1000), *honest[1:]]
    if attack == "short-output":
        return [*honest[:2], honest[2][:-4]]
    if attack == "claimed-hit":  # its model has no [cache]: nothing can have been answered from one
        return [RESULT + task_id, msgpack.packb({**meta, "cache": "hit"}), honest[2]]
    if attack == "claimed-stages":  # its model is no chain: it has no members whose times it could report
        return [RESULT + task_id, msgpack.packb({**meta, "stages": {"ocr_det": {"runs": 1, "compute_us": 1e9}}}), honest[2]]
    if attack == "list-datatype":  # round 64: unhashable where a string is checked against a set (TypeError)
        return [RESULT + task_id, msgpack.packb({**meta, "outputs": [{"name": "y", "datatype": [], "shape": [rows, 4]}]}), honest[2]]
    if attack == "forged-error":
        return [RESULT + task_id, msgpack.packb({"error": {"code": "PWNED", "message": "Z" * 100_000}, "recv_ns": now, "send_ns": now, "cpu_us": 0.0})]
    if attack == "stderr-forgery":
        sys.stderr.write(FORGED_LOG + "\n")
        sys.stderr.flush()
        return honest
    return honest


LEDGER_FD = 6  # the memfd the supervisor shares with a direct-path worker: deadline page, then the ledger
PAGE_BYTES = 4096


def forge_ledger(kind: int = 99, bytes_out: int = 0) -> None:
    """Write into the ledger (daemon/direct/ledger.py) what no conforming worker writes: a record whose
    kind does not exist, claiming a million answered requests of a client that never connected - or
    (kind 2, ANSWERED) an answer of `bytes_out` bytes, more than the worker's memory could hold."""
    import mmap

    from openinfer.daemon.direct.ledger import LEDGER_BYTES

    ledger = mmap.mmap(LEDGER_FD, LEDGER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=PAGE_BYTES)
    key = b"victim@uid=0"
    ledger[64 : 64 + 1 + len(key)] = bytes((len(key),)) + key
    ring = 64 + 1024 * 96
    record = struct.Struct("<QQQIHBBBxQQ" + "d" * 8 + "6x")
    record.pack_into(ledger, ring, 1, 1, 1, 0, 0, kind, 0, 0, 0, bytes_out, *([1.0] * 8))
    struct.pack_into("<Q", ledger, 0, 1)


def flood_ledger(groups: bool) -> None:
    """Keep the ledger full of records a conforming worker could write (ANSWERED, valid client keys, codes
    and timings) - each its own (client slot, code) group when `groups`, else all one group (control)."""
    import mmap
    import threading

    import numpy as np

    from openinfer.daemon.direct.ledger import LEDGER_BYTES, RECORD_DTYPE, RING_RECORDS

    ledger = mmap.mmap(LEDGER_FD, LEDGER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=PAGE_BYTES)
    for slot in range(1024):
        key = f"c{slot}@uid={slot}".encode()
        ledger[64 + slot * 96 : 64 + slot * 96 + 1 + len(key)] = bytes((len(key),)) + key
    ring_at = 64 + 1024 * 96
    ring = np.zeros(RING_RECORDS, dtype=RECORD_DTYPE)
    ring["kind"] = 2
    ring["timing"] = 10.0
    words = memoryview(ledger).cast("Q")

    def run() -> None:
        seq = 0
        while True:
            read = words[1]
            count = RING_RECORDS - (seq - read)
            if count > 0:
                s = np.arange(seq, seq + count, dtype=np.uint64)
                p = (s % RING_RECORDS).astype(np.int64)
                ring["seq"][p] = s + 1
                ring["serial"][p] = s + 1
                if groups:
                    ring["slot"][p] = ((s // 9) % 1025).astype(np.uint32)
                    ring["code"][p] = (s % 9).astype(np.uint8)
                ledger[ring_at : ring_at + ring.nbytes] = ring.tobytes()
                seq += count
                words[0] = seq
            while words[1] == read:  # refill as soon as the supervisor has read some of it
                os.sched_yield()

    threading.Thread(target=run, daemon=True).start()


def main() -> None:
    config = json.loads(sys.argv[2])
    attack = config["model"][len("hostile-") :]
    channel: SocketpairChannel | ZmqChannel
    if "channel" in config:
        channel = ZmqChannel(config["channel"], str(config["worker_id"]).encode())
    else:
        channel = SocketpairChannel()
    hello = {"pid": os.getpid(), "inputs": [SPEC], "outputs": [OUT], "load_ms": 1.0, "warmup_ms": 1.0, "warmup_error": None}
    if attack == "bad-hello":
        hello["outputs"] = [{"name": "y", "datatype": "FP32", "shape": ["many", "rows"]}]
    if attack == "list-datatype-hello":  # round 64: a HELLO the supervisor raised TypeError on, the worker left waiting
        hello["outputs"] = [dict(OUT, datatype=[])]
    if attack == "twice-hello":  # two outputs by one name: no client could ask for either
        hello["outputs"] = [OUT, dict(OUT, datatype="INT64")]
    channel.send([HELLO, msgpack.packb(hello)])
    if channel.recv()[0] != ACK:
        return
    channel.send([READY, msgpack.packb({"enabled": False, "compromised": True})])
    if attack == "ledger-forgery":
        forge_ledger()
    if attack == "ledger-bytes-out":  # one answer of 1 GiB + 1 byte out, from a worker held to 1 GiB (the test's limit)
        forge_ledger(kind=2, bytes_out=(1 << 30) + 1)
    if attack in ("ledger-flood", "ledger-flood-one"):
        flood_ledger(attack == "ledger-flood")
    if attack == "pong-flood":  # PONGs no PING asked for, as fast as the channel takes them
        for _ in range(1_000_000):
            channel.send([PONG, b"p", struct.pack("<QQQ", 0, 0, 0)])
    while True:
        frames = channel.recv()
        kind = frames[0][:1]
        if kind == PING:
            if attack == "cache-pong":  # a cache report from a worker whose model has no [cache]
                channel.send([PONG, frames[1], struct.pack("<QQQ", 7, 1 << 40, 0)])
            else:  # entries, cache bytes, bytes held for direct requests (daemon/worker/messages.py)
                channel.send([PONG, frames[1], struct.pack("<QQQ", 0, 0, 0)])
        elif kind == QUIT:
            return
        elif kind == TASK:
            if attack == "oversized":
                channel.send_raw(bytes((0x02,)) + (1 << 40).to_bytes(8, "big"))  # a 1 TiB frame, then stall
                time.sleep(3600)
            reply = answer(frames, attack)
            if reply is not None:
                channel.send(reply)


if __name__ == "__main__":
    main()
