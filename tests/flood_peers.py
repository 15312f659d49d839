"""Flooders for the front door's fairness tests (tests/attack/test_control_floods.py): one process holding
many hand-written ZMTP DEALER connections, each as the uid it was opened as (seteuid around connect(): the
kernel records the credentials of that moment, SO_PEERCRED), each keeping `outstanding` requests of one
operation in flight. Run as a script, as root:

    python flood_peers.py ADDRESS OP OUTSTANDING UID,UID,... [EMPTY_FRAMES [PAD]]   ("-" for a uid: the process's
                                     own; PAD: a header field of that many list items, to make each costly)
    python flood_peers.py ADDRESS partial BYTES UID,UID,...   (each connection holds half a BYTES-byte request)
    python flood_peers.py ADDRESS worker-cancel WINDOW UID [CONNS]  (WINDOW `cancel`s in flight on each of CONNS
                                                                   connections to a worker's endpoint)

It prints "flooding" once every connection has had a reply, then keeps on until its stdin is closed, and
prints the CLOCK_MONOTONIC time of every reply (system-wide: comparable with the test's clock) as JSON."""
from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from typing import Callable

import msgpack

from openinfer.wire import zmtp


def connect(address: str, uid: int | None) -> zmtp.FrameStream:
    if address.startswith("ipc://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address[len("ipc://") :]
    else:
        host, port = address[len("tcp://") :].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    if uid is not None:
        os.seteuid(uid)
    try:
        sock.connect(target)
    finally:
        if uid is not None:
            os.seteuid(0)
    sock.setblocking(False)
    return zmtp.FrameStream(sock, zmtp.Limits(message_bytes=1 << 30), handshake=True, socket_type=b"DEALER", accept_types=frozenset({b"ROUTER"}))


def hold_partial(address: str, size: int, uids: list[int | None]) -> None:
    """Each connection starts an infer whose data frame announces `size` bytes, sends half of them and holds:
    the daemon keeps the frame's buffer for it (unfinished requests count toward its memory rule)."""
    streams = [connect(address, uid) for uid in uids]
    header = msgpack.packb({"v": 1, "id": 2, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [size // 4]}]})
    for stream in streams:  # the handshake first (a `health` answered), then half a request by hand
        stream.send([msgpack.packb({"v": 1, "id": 1, "op": "health"})])
        got: list[object] = []
        while not got:
            select.select([stream.sock], [stream.sock] if stream.out_bytes else [], [], 1.0)
            stream.flush()
            got = list(stream.read())
        stream.sock.setblocking(True)
        stream.sock.sendall(zmtp.frame_header(len(header), zmtp.MORE) + header + zmtp.frame_header(size, 0) + bytes(size // 2))
        stream.sock.setblocking(False)
    print("holding", flush=True)
    sys.stdin.readline()
    closed = 0
    for stream in streams:
        try:
            stream.read()
        except zmtp.PeerClosed:
            closed += 1
    print(json.dumps({"closed": closed}), flush=True)


def pump(streams: list[zmtp.FrameStream], on_reply: Callable[[int, zmtp.FrameStream, list[bytes]], None]) -> None:
    """Until stdin is closed: write what waits on `streams` and hand every reply to on_reply(fd, stream, frames)."""
    by_fd = {stream.sock.fileno(): stream for stream in streams}
    while True:
        writing = [s.sock for s in streams if s.out_bytes]
        readable, _, _ = select.select([*by_fd, sys.stdin], writing, [], 1.0)
        if sys.stdin in readable and not sys.stdin.readline():
            return
        for stream in streams:
            stream.flush()
        for fd in readable:
            if fd is not sys.stdin:
                for event in by_fd[fd].read():
                    on_reply(fd, by_fd[fd], event)  # type: ignore[arg-type]


def main(address: str, op: str, outstanding: int, uids: list[int | None], empty_frames: int = 0, pad: int = 0) -> None:
    streams = [connect(address, uid) for uid in uids]
    tail = [b""] * empty_frames  # frames the daemon must parse before it can answer (round 53: 256 a request)
    # A header field the daemon decodes and ignores (~0.5 ms for 40,000 items), packed once: added to each
    # header's map by hand, so that it costs this process nothing per request.
    padding = msgpack.packb("pad") + msgpack.packb([0] * pad) if pad else b""

    def header(request_id: int) -> bytes:
        packed = msgpack.packb({"v": 1, "id": request_id, "op": op})
        return bytes([packed[0] + 1]) + packed[1:] + padding if pad else packed  # (a fixmap of 3 entries, now 4)

    next_id = iter(range(1, 1 << 62))
    for stream in streams:
        for _ in range(outstanding):
            stream.send([header(next(next_id)), *tail])
    answered: set[int] = set()
    times: list[float] = []

    def on_reply(fd: int, stream: zmtp.FrameStream, frames: list[bytes]) -> None:
        reply = msgpack.unpackb(frames[0])
        assert "result" in reply or empty_frames, reply
        times.append(time.monotonic())
        stream.send([header(next(next_id)), *tail])
        if fd not in answered:
            answered.add(fd)
            if len(answered) == len(streams):
                print("flooding", flush=True)

    pump(streams, on_reply)
    print(json.dumps(times), flush=True)


def flood_worker(address: str, uid: int, window: int, conns: int = 1) -> None:
    """As `uid` (for good: the lease is bound to it): a lease for `tiny`, attached to its first worker on
    `conns` connections, then `window` `cancel`s of ids that do not exist kept in flight on each (round 55:
    each is answered at read time, before any queue). Reports as main() does."""
    from openinfer.client import Client

    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    with Client(address, direct=False) as client:
        lease = client._call("lease", model="tiny")
    worker = "ipc://" + lease["workers"][0]["address"].removeprefix("ipc://")
    streams = [connect(worker, None) for _ in range(conns)]
    for stream in streams:
        stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        stream.send([msgpack.packb({"v": 1, "id": 1, "op": "attach", "lease": lease["lease"]})])
    next_id = iter(range(2, 1 << 62))
    times: list[float] = []
    attached: set[int] = set()

    def cancel() -> list[bytes]:
        return [msgpack.packb({"v": 1, "id": next(next_id), "op": "cancel", "target": 1 << 40})]

    def on_reply(fd: int, stream: zmtp.FrameStream, frames: list[bytes]) -> None:
        reply = msgpack.unpackb(frames[0])
        if fd not in attached:
            assert "result" in reply, reply
            attached.add(fd)
            for _ in range(window):
                stream.send(cancel())
            if len(attached) == len(streams):
                print("flooding", flush=True)
            return
        times.append(time.monotonic())
        stream.send(cancel())

    pump(streams, on_reply)
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
    if sys.argv[2] == "worker-cancel":
        flood_worker(sys.argv[1], int(sys.argv[4]), int(sys.argv[3]), int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    elif sys.argv[2] == "partial":
        hold_partial(sys.argv[1], int(sys.argv[3]), [None if uid == "-" else int(uid) for uid in sys.argv[4].split(",")])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), [None if uid == "-" else int(uid) for uid in sys.argv[4].split(",")], *(int(arg) for arg in sys.argv[5:7]))
