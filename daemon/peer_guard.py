"""Per-connection guard for the public socket: knows each client connection's file descriptor and
drops the connections that misbehave.

libzmq gives the application no per-peer disconnect and keeps the frames of an unfinished multipart
message inside the connection's pipe, invisible until the last frame arrives (MAXMSGSIZE bounds one
frame, not how many). So the guard works below libzmq:
- the frontend's socket monitor reports every accepted connection's fd (and when it closes);
- each message's ZMQ_SRCFD property names the connection it came from;
- dropping a connection = shutdown(2) on that fd (through a dup, libzmq keeps its own): libzmq reads
  EOF, closes the connection and rolls back the unfinished message it was holding.

Two rules use that:
- strikes: a connection that sends `server.peer_strike_limit` requests no conforming client sends
  (undecodable header, over a size limit) is dropped. Each of those got its error reply: the guard stops
  reading the connection at once but shuts it down DROP_GRACE_NS later, so libzmq can still deliver the
  replies already sent (a shutdown discards what is not yet written). Messages arriving in between are
  discarded unanswered;
- memory: when the supervisor's RSS passes `server.max_supervisor_rss_mb`, connections with nothing
  queued or running and no complete message for IDLE_GRACE_NS are dropped (a peer streaming a
  never-finished message never completes one; idle DEALER clients reconnect by themselves).
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import psutil
import zmq
from zmq.utils.monitor import parse_monitor_message

from .settings import Settings
from .timers import TimerHeap

log = logging.getLogger("openinfer.access")

CHECK_INTERVAL_NS = 100_000_000  # RSS is read this often (psutil: one /proc read, tens of us)
IDLE_GRACE_NS = 1_000_000_000  # a connection that completed a message this recently is kept
DROP_GRACE_NS = 100_000_000  # between the last strike and the shutdown: the error replies go out
_SRCFD = int(zmq.SRCFD)
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


@dataclass(eq=False)
class Connection:
    fd: int
    accepted_ns: int
    last_message_ns: int = 0  # 0: never completed a message
    strikes: int = 0
    dropping: bool = False  # struck out: nothing more is read from it; shutdown is scheduled
    route_ids: set[bytes] = field(default_factory=set)


def supervisor_rss_limit(settings: Settings) -> int:
    """Bytes. The default (setting 0) leaves room for everything the daemon may hold by design:
    the queued tensors, a few requests being received, and the process itself."""
    server = settings.server
    if server.max_supervisor_rss_mb > 0:
        return server.max_supervisor_rss_mb * 1024 * 1024
    return server.max_queued_bytes + 4 * server.max_request_bytes + 256 * 1024 * 1024


class PeerGuard:
    def __init__(self, frontend: zmq.Socket, settings: Settings, timers: TimerHeap) -> None:  # type: ignore[type-arg]
        self.settings = settings
        self.timers = timers
        self.monitor = frontend.get_monitor_socket(_EVENTS)
        self._frontend = frontend
        self.connections: dict[int, Connection] = {}
        self._by_route: dict[bytes, Connection] = {}
        self._next_check_ns = 0
        self._process = psutil.Process()
        self.dropped = 0

    # -- bookkeeping ----------------------------------------------------------------------------------
    def on_monitor(self) -> None:
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._forget(fd)  # an fd number reused by the kernel: the old connection is gone
                self.connections[fd] = Connection(fd, time.monotonic_ns())
            else:
                self._forget(fd)

    def _forget(self, fd: int) -> None:
        old = self.connections.pop(fd, None)
        if old is not None:
            for route_id in old.route_ids:
                self._by_route.pop(route_id, None)

    def saw(self, route_id: bytes, frame: zmq.Frame, now_ns: int) -> bool:
        """A complete message arrived on `route_id` (its first frame is `frame`); False: discard it, its
        connection struck out. Hot path: one lookup."""
        conn = self._by_route.get(route_id)
        if conn is None:
            conn = self._attach(route_id, frame)
            if conn is None:
                return True
        conn.last_message_ns = now_ns
        return not conn.dropping

    def _attach(self, route_id: bytes, frame: zmq.Frame) -> Connection | None:
        self.on_monitor()  # the ACCEPTED event may still be queued behind this message
        try:
            fd = int(frame.get(_SRCFD))
        except zmq.ZMQError:
            return None
        conn = self.connections.get(fd)
        if conn is not None:
            conn.route_ids.add(route_id)
            self._by_route[route_id] = conn
        return conn

    # -- rules ----------------------------------------------------------------------------------------
    def strike(self, route_id: bytes, reason: str) -> None:
        limit = self.settings.server.peer_strike_limit
        conn = self._by_route.get(route_id)
        if limit <= 0 or conn is None:
            return
        conn.strikes += 1
        if conn.strikes >= limit and not conn.dropping:
            conn.dropping = True
            why = f"{conn.strikes} malformed or over-limit requests (server.peer_strike_limit), last: {reason}"
            self.timers.call_at(time.monotonic_ns() + DROP_GRACE_NS, lambda: self.drop(conn, why))

    def check_memory(self, now_ns: int, busy_routes: Callable[[], Iterable[bytes]]) -> None:
        """Called from the loop; reads the RSS at most every CHECK_INTERVAL_NS."""
        if now_ns < self._next_check_ns:
            return
        self._next_check_ns = now_ns + CHECK_INTERVAL_NS
        limit = supervisor_rss_limit(self.settings)
        rss = int(self._process.memory_info().rss)
        if rss <= limit:
            return
        busy = {id(self._by_route[r]) for r in busy_routes() if r in self._by_route}
        victims = [c for c in self.connections.values() if id(c) not in busy and now_ns - c.last_message_ns > IDLE_GRACE_NS]
        if not victims:
            log.warning("supervisor memory over its limit, but every connection is busy", extra={"rss_mb": rss >> 20, "limit_mb": limit >> 20})
            return
        for conn in victims:
            self.drop(conn, f"supervisor RSS {rss >> 20} MiB over server.max_supervisor_rss_mb ({limit >> 20} MiB); this connection completed no message in the last {IDLE_GRACE_NS // 1_000_000} ms and has none in flight")

    def drop(self, conn: Connection, reason: str) -> None:
        """shutdown(2) the connection's socket; libzmq then closes it and frees what it buffered."""
        if self.connections.get(conn.fd) is not conn:
            return  # already gone (and the fd number may belong to someone else now)
        peer = "unknown"
        try:
            with socket.socket(fileno=os.dup(conn.fd)) as sock:
                if sock.family == socket.AF_UNIX:
                    peer = "pid={},uid={},gid={}".format(*_peercred(sock))
                else:
                    peer = str(sock.getpeername())
                sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            log.warning("could not drop a connection", extra={"fd": conn.fd, "reason": reason, "error": str(exc)})
            return
        self.dropped += 1
        self._forget(conn.fd)
        log.warning("connection dropped", extra={"fd": conn.fd, "peer": peer, "reason": reason})

    def close(self) -> None:
        try:
            self._frontend.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)


def _peercred(sock: socket.socket) -> tuple[int, int, int]:
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))

