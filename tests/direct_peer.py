"""A hand-written client of a worker's endpoint (docs/PROTOCOL.md section 17), for tests that must see the
raw protocol: what is sent when, and each reply as it comes."""
from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time
from typing import Any

import msgpack
import numpy as np

from daemon_harness import RunningDaemon, wait_for
from flood_peers import connect
from openinfer.client import Client
from openinfer.wire import zmtp

X = np.ones((1, 64), np.float32)


def lease_of(daemon: RunningDaemon, model: str = "tiny") -> dict[str, Any]:
    with Client(daemon.address, direct=False) as client:
        return client._call("lease", model=model)


class Peer:
    """A hand-written ZMTP DEALER on one worker endpoint (or the daemon's socket)."""

    def __init__(self, address: str) -> None:
        self.stream = connect(address, None)

    def ask(self, frames: list[bytes], timeout: float = 10) -> dict[str, Any] | None:
        """The reply header, or None once the worker closed the connection."""
        try:
            self.stream.send(frames)
        except zmtp.PeerClosed:
            return None
        return self.next_reply(timeout)

    def next_reply(self, timeout: float = 10) -> dict[str, Any] | None:
        """The next reply header (GOAWAY aside), or None once the peer closed the connection."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                select.select([self.stream.sock], [self.stream.sock] if self.stream.out_bytes else [], [], 0.1)
                self.stream.flush()
                for event in self.stream.read():
                    header = msgpack.unpackb(event[0])
                    if not header.get("goaway"):
                        return header  # type: ignore[no-any-return]
        except zmtp.PeerClosed:
            return None
        raise AssertionError("no reply")

    def replies(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The next `count` reply headers (GOAWAY aside)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            assert time.monotonic() < deadline, f"{len(got)} of {count} replies"
            select.select([self.stream.sock], [self.stream.sock] if self.stream.out_bytes else [], [], 0.1)
            self.stream.flush()
            got += [h for h in (msgpack.unpackb(event[0]) for event in self.stream.read()) if not h.get("goaway")]
        return got

    def send_all(self, frames: list[list[bytes]]) -> None:
        """Send every message and wait until the kernel has taken them all (the handshake first: until it
        ends, the stream holds what is sent)."""
        deadline = time.monotonic() + 10
        while not self.stream.open:
            assert time.monotonic() < deadline, "no handshake"
            select.select([self.stream.sock], [self.stream.sock] if self.stream.out_bytes else [], [], 0.1)
            self.stream.flush()
            assert not self.stream.read(), "a message before the handshake ended"
        # Held, then written at once: they arrive together and are read in one pass (a sendmsg each let a
        # worker wake on the first and start running it alone: a round-87 test flaked so under load).
        for message in frames:
            self.stream.hold(message)
        self.stream.flush()
        while self.stream.out_bytes:
            select.select([], [self.stream.sock], [], 1.0)
            self.stream.flush()

    def replies_until_closed(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Every reply header (GOAWAY aside) until the peer closes the connection."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"{len(got)} replies, and the connection still open"
            select.select([self.stream.sock], [], [], 0.5)
            try:
                got += [h for h in (msgpack.unpackb(event[0]) for event in self.stream.read(max_bytes=1 << 30)) if not h.get("goaway")]
            except zmtp.PeerClosed:
                return got

    def close(self) -> None:
        self.stream.close()


def attach(token: bytes, request_id: int = 1) -> list[bytes]:
    return [msgpack.packb({"v": 1, "id": request_id, "op": "attach", "lease": token})]


def infer(request_id: int) -> list[bytes]:
    return [msgpack.packb({"v": 1, "id": request_id, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}), X.tobytes()]


def busy(request_id: int, n: int, **fields: Any) -> list[bytes]:
    """An infer of the busy-loop model: `n` loop iterations (onnx_builders.busy_loop_model)."""
    header = {"v": 1, "id": request_id, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}, {"name": "n", "datatype": "INT64", "shape": []}], **fields}
    return [msgpack.packb(header), np.zeros(1, np.float32).tobytes(), np.array(n, np.int64).tobytes()]


def worker_pid(daemon: RunningDaemon, model: str) -> int:
    with Client(daemon.address, direct=False) as admin:
        return next(w["pid"] for w in admin.status()["workers"] if w["model"] == model)


def unread_by_peer(sock: socket.socket) -> int:
    """Bytes this Unix socket sent that its peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]  # type: ignore[no-any-return]


def pipeline_answered(daemon: RunningDaemon, peer: Peer, ids: range) -> None:
    """`peer` sends an infer of `tiny` with a 256 KiB reply for each id and reads nothing until the daemon
    has answered them all: their replies back up (more than the socket takes)."""
    rows = np.ones((1024, 64), np.float32).tobytes()

    def served() -> int:
        with Client(daemon.address, direct=False) as admin:
            return sum(w["tasks_served"] for w in admin.status()["workers"] if w["model"] == "tiny")

    before = served()
    peer.send_all([[msgpack.packb({"v": 1, "id": i, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1024, 64]}]}), rows] for i in ids])
    wait_for(lambda: served() >= before + len(ids), 30, "all answered (their replies back up, unread)")


def replies_after_a_half_close(daemon: RunningDaemon, peer: Peer, ids: range) -> list[dict[str, Any]]:
    """pipeline_answered, then `peer` shuts its sending side and reads every reply until the connection closes."""
    pipeline_answered(daemon, peer, ids)
    peer.stream.sock.shutdown(socket.SHUT_WR)
    return peer.replies_until_closed()
