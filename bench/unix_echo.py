"""The floor of bench/peers.py: a raw Unix stream socket round trip, Python on both ends, no framework.

    python bench/unix_echo.py PATH        # the echo server: one process, one epoll loop, prints "ready"

The server echoes whatever it reads; a client sends the tiny model's input (256 bytes) and reads 256
bytes back. `EchoClients` is one spawned client process holding `c` connections, each a closed loop
(one blocking socket at c = 1, an epoll loop over all of them above): the same contract as the other
generators (loadgen.SharedLoopsPool: prepare/run -> loadgen.RunResult). Nothing a server does can be
cheaper than this on this machine, in Python; each figure of peers.py is reported against it.
"""
from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
import traceback
from array import array
from multiprocessing.connection import Connection
from pathlib import Path

from loadgen import SharedLoopsPool

MESSAGE_BYTES = 256  # x FP32[1, 64]
WARMUP_ROUND_TRIPS = 200


# -- the server ----------------------------------------------------------------------------------------
def serve(path: str) -> None:
    """Accept and echo until killed: one recv and one send per readable connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if sock is listener:
                conn, _ = listener.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                continue
            assert isinstance(sock, socket.socket)
            data = sock.recv(65536)
            if data:
                sock.send(data)  # <= 256 bytes into an empty socket buffer: never partial here
            else:
                selector.unregister(sock)
                sock.close()


class EchoServer:
    """`python unix_echo.py PATH` in a subprocess; `pid` for CPU accounting, `path` for the clients."""

    def __init__(self, workdir: Path) -> None:
        self.path = str(workdir / "echo.sock")
        self._process = subprocess.Popen([sys.executable, __file__, self.path], stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        if self._process.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError(f"unix echo server did not start (status {self._process.poll()})")

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# -- the client process --------------------------------------------------------------------------------
class EchoClients(SharedLoopsPool):
    """One spawned process running `c` closed loops against the echo server (address = socket path)."""

    def __init__(self) -> None:
        super().__init__(1, _client_main, lambda index: (), "bench-unix-echo")


def _client_main(conn: Connection) -> None:
    sockets: dict[str, list[socket.socket]] = {}
    message = bytes(range(256)) * (MESSAGE_BYTES // 256)
    conn.send("hello")
    while True:
        command = conn.recv()
        if command[0] == "quit":
            return
        try:
            path = command[1]
            if command[0] == "prepare":
                _connections(sockets, path, 1, message)
                conn.send("ok")
            else:
                loops, start_ns, measure_ns, end_ns = command[2:]
                conns = _connections(sockets, path, loops, message)[:loops]
                run = _one_loop if loops == 1 else _many_loops
                conn.send({"latencies_ns": run(conns, message, start_ns, measure_ns, end_ns).tobytes(), "stages_us": {}, "errors": {}})
        except Exception:
            conn.send({"failure": traceback.format_exc()})


def _connections(sockets: dict[str, list[socket.socket]], path: str, count: int, message: bytes) -> list[socket.socket]:
    """At least `count` connected sockets to `path`, each warmed up the first time."""
    held = sockets.setdefault(path, [])
    while len(held) < count:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        for _ in range(WARMUP_ROUND_TRIPS):
            sock.sendall(message)
            _read_reply(sock)
        held.append(sock)
    return held


def _read_reply(sock: socket.socket) -> None:
    got = 0
    while got < MESSAGE_BYTES:
        chunk = sock.recv(MESSAGE_BYTES - got)
        if not chunk:
            raise ConnectionError("echo server closed the connection")
        got += len(chunk)


def _wait_until(start_ns: int) -> None:
    delay = (start_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _one_loop(conns: list[socket.socket], message: bytes, start_ns: int, measure_ns: int, end_ns: int) -> array[int]:
    """c = 1: a blocking send and recv, back to back (the cheapest round trip Python can make)."""
    sock, now, latencies = conns[0], time.monotonic_ns, array("q")
    _wait_until(start_ns)
    while True:
        t0 = now()
        sock.sendall(message)
        _read_reply(sock)
        t1 = now()
        if t0 >= measure_ns and t1 <= end_ns:
            latencies.append(t1 - t0)
        if t1 >= end_ns:
            return latencies


def _many_loops(conns: list[socket.socket], message: bytes, start_ns: int, measure_ns: int, end_ns: int) -> array[int]:
    """c > 1: every connection a closed loop, one epoll loop over all of them (replies are one read here)."""
    now, latencies = time.monotonic_ns, array("q")
    selector = selectors.DefaultSelector()
    sent: dict[int, int] = {}
    _wait_until(start_ns)
    for sock in conns:
        selector.register(sock, selectors.EVENT_READ, sock)
        sent[sock.fileno()] = now()
        sock.sendall(message)
    open_loops = len(conns)
    try:
        while open_loops:
            for key, _ in selector.select():
                ready: socket.socket = key.data
                _read_reply(ready)
                t1 = now()
                t0 = sent[ready.fileno()]
                if t0 >= measure_ns and t1 <= end_ns:
                    latencies.append(t1 - t0)
                if t1 < end_ns:
                    sent[ready.fileno()] = now()
                    ready.sendall(message)
                else:
                    selector.unregister(ready)
                    open_loops -= 1
    finally:
        selector.close()
    return latencies


if __name__ == "__main__":
    serve(sys.argv[1])
