"""The worker's own endpoint: clients holding a lease send `infer` here, one hop, instead of through the
supervisor (docs/PROTOCOL.md section 17).

The supervisor binds the socket (its path, mode and group are the front door's) and hands it over at
spawn as fd 5; this worker accepts on it, speaks ZMTP on each connection (openinfer.wire.zmtp) and holds
the same rules as the front door, scaled to one worker: connection caps per worker and per identity, a
handshake deadline, a size check on every frame before it is stored, a reply backlog past which a
connection is not read, strikes for requests no conforming client sends. Identity comes from the kernel
(SO_PEERCRED) at accept. Nothing on a connection is parsed beyond the header's envelope until it has
attached a lease (lease.py) issued to that identity for this worker's model version.
"""
from __future__ import annotations

import logging
import resource
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, ContextManager

import msgpack

from openinfer.daemon.observability.client_key import client_key
from openinfer.daemon.direct.lease import Lease, LeaseRefused, verify
from openinfer.daemon.direct.peer_credentials import peer_credentials, peer_gids
from openinfer.daemon.frontdoor.fair_turns import FairTurns, hold_pending
from openinfer.daemon.frontdoor.validation import OverLimit, check_envelope, decode_header, request_id_of
from openinfer.wire.errors import InvalidArgument, OpenInferError, PermissionDenied, ResourceExhausted
from openinfer.wire.protocol import MAX_FRAMES, MAX_HEADER_BYTES, PROTOCOL_VERSION
from openinfer.wire.zmtp import Buffer, Event, FrameStream, HeldWrites, Limits, Oversized, PeerClosed, ProtocolError

from .direct_budgets import STALLED_NS, held_budgets, replies_to_cut, uploads_to_refuse

log = logging.getLogger("openinfer.worker")

LISTEN_FD = 5  # the spawner puts the worker's listening socket here (spawner.DIRECT_FD)
HANDSHAKE_TIMEOUT_NS = 10_000_000_000  # to complete the ZMTP handshake, and again to attach a lease
FDS_KEPT = 16  # of the worker's open-file limit, for what is not a client connection (channel, epoll, pages)
# Replies not read for this long count as nothing to send (_nothing_to_send): long enough for a client
# whose event loop is held up a while (closed, its unread answers are lost), short enough for an attack.
UNREAD_NS = 5_000_000_000
_DELIMITER = b""
DIRECT_OPERATIONS = ("attach", "infer", "cancel")
_READABLE, _WRITABLE, _HANGUP = 0x001, 0x004, 0x018  # EPOLLIN, EPOLLOUT, EPOLLERR | EPOLLHUP


# What one read of a client's connection takes (see on_event): like the front door's (frontdoor/connections.py).
READ_BYTES = 16 * 1024
MAX_EVENTS_PER_READ = 256
MAX_FRAMES_PER_READ = 1024  # (as the front door: frontdoor/connections.py)


@dataclass(frozen=True)
class DirectLimits:
    """The front door's limits as they apply to one worker (the supervisor passes them at spawn)."""

    max_connections: int = 128
    max_connections_per_identity: int = 32
    max_request_bytes: int = 64 * 1024 * 1024
    max_reply_backlog_bytes: int = 64 * 1024 * 1024
    strike_limit: int = 16


@dataclass(eq=False, slots=True)
class DirectConnection:
    conn_id: int
    stream: FrameStream
    uid: int
    identity: str  # "uid=N": what a lease must name
    accepted_ns: int
    lease: Lease | None = None
    strikes: int = 0
    reading: bool = True
    draining: bool = False  # told GOAWAY: what it read before is served, anything later is sent back
    struck: bool = False  # over the strike limit: read no more, closed once what it sent before is answered
    ended: bool = False  # its peer shut its sending side: read no more, closed once what it sent is answered
    closed: bool = False
    pending: deque[Event] | None = None  # messages read and not handled yet (its identity's turns; its replies backed up)
    pending_bytes: int = 0  # what they hold
    in_turns: bool = False  # among the door's ready connections (FairTurns)
    wants_read: bool = False  # readable, waiting for its identity's turn to be read
    open_ids: set[int] = field(default_factory=set)  # requests accepted here and not yet answered
    last_read_ns: int = 0  # when bytes last came: a request still arriving that long ago has stalled
    out_moved_ns: int = 0  # when its outbox last began to fill or shrank: replies unread since then have stalled

    @property
    def fd(self) -> int:
        return self.stream.sock.fileno() if not self.closed else -1

    @property
    def turn_key(self) -> str:  # whose turns its reads and messages take (FairTurns)
        return self.identity

    @property
    def dropping(self) -> bool:  # (FairTurns: read no more, its pending messages dropped)
        return self.struck or self.ended

    @property
    def in_bytes(self) -> int:  # (what direct_budgets looks at)
        return self.stream.in_bytes

    @property
    def out_bytes(self) -> int:
        return self.stream.out_bytes


def connection_caps(limits: DirectLimits) -> tuple[int, int]:
    """(connections, connections per identity) this worker takes: the configured caps, within its
    open-file limit (sandbox.max_open_files) and leaving a quarter of them to other identities. One uid's
    idle connections once took every descriptor (the cap was 128, the limit 64): accept failed with EMFILE
    and no other client could connect."""
    room = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FDS_KEPT
    total = max(2, min(limits.max_connections, room))
    return total, max(1, min(limits.max_connections_per_identity, total * 3 // 4))


def _nothing_to_send(conn: DirectConnection, now_ns: int) -> bool:
    """Its outbox is empty, or what waits there has not moved for UNREAD_NS (its peer does not read):
    either way closing it takes nothing from a client that reads. Waiting bytes alone once made a
    connection look busy for good: two uids without a grant held every slot of every worker with PONGs
    and replies they never read (round 17), and the rules that close idle connections never fired.
    (PONGs never set out_moved_ns: a backlog of them alone counts at once.)"""
    return not conn.stream.out_bytes or now_ns - conn.out_moved_ns >= UNREAD_NS


def _unleased_for(conn: DirectConnection, now_ns: int) -> int:
    """How long a connection has been without a valid lease (and has nothing in flight or to send)."""
    if conn.open_ids or not _nothing_to_send(conn, now_ns):
        return 0
    if conn.lease is None:
        return now_ns - conn.accepted_ns
    return now_ns - conn.lease.expires_ns


Poller = Any  # select.epoll (typed loosely: the worker imports select lazily before its sandbox)
OnRequest = Callable[[DirectConnection, bool, int, dict[str, Any], list[Buffer], int], None]
OnCancel = Callable[[DirectConnection, int], bool]
OnOutcome = Callable[[DirectConnection, str, str, int | None, OpenInferError | None, int], None]


class DirectDoor:
    def __init__(self, listener: socket.socket, poller: Poller, limits: DirectLimits, model: str, version: int, worker_id: int, on_request: OnRequest, on_cancel: OnCancel, on_outcome: OnOutcome) -> None:
        self.listener = listener
        self.poller = poller
        self.limits = limits
        self.model = model
        self.version = version
        self.worker_id = worker_id
        self.on_request = on_request  # (conn, delimited, request id, header, data frames, received_ns) of an infer
        self.on_cancel = on_cancel  # (conn, target id) -> whether a queued request was cancelled
        self.on_outcome = on_outcome  # counts what this door answered itself: (conn, client key, op, request id, error or None, received_ns)
        self.key = b""  # the lease key, from the supervisor (ACK, then KEY on every reload)
        self.by_fd: dict[int, DirectConnection] = {}
        # Reads and messages are served in fair turns between identities, as at the front door: one bounded
        # read a ready connection was fair between connections only, and one uid with 36 connections held
        # another client's infer 0.6-0.8 s (round 56); the loop serves the turns between its runs.
        self.turns = FairTurns(self._handle_turn, self._read_turn, finish_lone_read=True)
        self._held_writes: HeldWrites[DirectConnection] = HeldWrites(lambda conn: conn.stream, self._write_held)
        self.per_identity: dict[str, int] = {}
        self.handshaking: dict[int, DirectConnection] = {}
        self._next_id = 1
        self._listening = True
        self.draining = False
        self.refused = 0
        self._message_limits = Limits(frames=MAX_FRAMES + 1, first_frame=MAX_HEADER_BYTES, message_bytes=limits.max_request_bytes + MAX_HEADER_BYTES)
        # Until a connection holds a valid lease, nothing but a header is read from it (an `attach` is
        # one): a frame it declares larger is skipped as it arrives, never given memory. Before this, a
        # peer without a lease declared a 60 MB frame in 18 bytes, and the worker set the 60 MB aside.
        self._unattached_limits = Limits(frames=2, first_frame=MAX_HEADER_BYTES, message_bytes=MAX_HEADER_BYTES)
        self.max_connections, self.max_per_identity = connection_caps(limits)
        self.held_budget, self.hard_held_budget = held_budgets(limits.max_request_bytes)
        # One packer for every reply (protocol.pack builds one per call): this loop is the only thread that replies.
        self._pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
        poller.register(listener.fileno(), _READABLE)

    # -- accepting ------------------------------------------------------------------------------------
    def on_listener(self) -> None:
        for _ in range(16):
            if len(self.by_fd) > self.max_connections or self.draining:
                self._pause_listening()
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: stop accepting for now, never die of it
                self._pause_listening()
                return
            sock.setblocking(False)
            pid, uid, gid = peer_credentials(sock)
            identity = f"uid={uid}"
            if self.per_identity.get(identity, 0) >= self.max_per_identity or (len(self.by_fd) >= self.max_connections and not self._make_room_for(identity)):
                self.refused += 1
                sock.close()
                continue
            conn = DirectConnection(self._next_id, FrameStream(sock, self._unattached_limits, handshake=True), uid, identity, time.monotonic_ns())
            self._next_id += 1
            self.by_fd[sock.fileno()] = conn
            self.per_identity[identity] = self.per_identity.get(identity, 0) + 1
            self.handshaking[conn.conn_id] = conn
            self.poller.register(sock.fileno(), _READABLE | (_WRITABLE if conn.stream.out_bytes else 0))

    def _make_room_for(self, identity: str) -> bool:
        """Every slot is taken: close the oldest idle connection of the identity holding the most, when
        it holds at least two more than `identity`. Two uids' idle connections, re-attached now and then,
        once held every slot of a worker for good, and every other client waited out its timeout."""
        counts = self.per_identity
        most = max(counts, key=counts.__getitem__, default=None)
        if most is None or most == identity or counts[most] < counts.get(identity, 0) + 2:
            return False
        now_ns = time.monotonic_ns()
        # (a byte of a frame kept pending does not make a connection busy: it must have moved lately)
        idle = [c for c in self.by_fd.values() if c.identity == most and not c.open_ids and _nothing_to_send(c, now_ns) and (not c.stream.in_bytes or now_ns - c.last_read_ns >= STALLED_NS)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_read_ns)
        log.info("closing an idle direct connection to make room for another identity", extra={"identity": most, "for": identity, "connections": counts[most]})
        self._close_idle(oldest, "this worker needed the connection for another client: take a new lease")
        return True

    def _close_idle(self, conn: DirectConnection, reason: str) -> None:
        """Close a connection with nothing in flight, saying GOAWAY first: a request its client sends
        meanwhile was never read, and the client sends it elsewhere (17.5) instead of taking the close
        for a crash."""
        if conn.stream.open:
            self._say_goaway(conn, reason)
        self._close_after_writing(conn)

    def _say_goaway(self, conn: DirectConnection, reason: str) -> None:
        """GOAWAY, with the ids of the requests read on this connection and not answered yet (`read`): this
        worker may run them, and answers each before it closes unless it dies. A request it reads after
        its GOAWAY is answered as a lease expiry, never run (DirectQueue.admit). So a client that sees the
        connection close with a request unanswered knows whether it may send it again: never if it is in
        `read` - it may be what killed the worker, and would kill the next one (PROTOCOL.md 17.5)."""
        self.reply(conn, False, {"v": PROTOCOL_VERSION, "id": None, "goaway": True, "reason": reason, "read": sorted(conn.open_ids)})

    def _close_after_writing(self, conn: DirectConnection) -> None:
        """Close once what the socket takes now of its last words (an answer, a GOAWAY) is written."""
        try:
            conn.stream.flush()
        except PeerClosed:
            pass
        self.close(conn)

    def rekey(self, key: bytes) -> None:
        """A reload rotated the lease key: every lease attached here is revoked now (each connection's
        next request is told its lease expired; the renewal at the front door applies the reloaded
        policy), not when it would have expired."""
        self.key = key
        for conn in self.by_fd.values():
            if conn.lease is not None:
                conn.lease = replace(conn.lease, expires_ns=0)
                conn.stream.limits = self._unattached_limits  # headers only from its next frame on, not its next message

    def _pause_listening(self) -> None:
        if self._listening:
            self.poller.unregister(self.listener.fileno())
            self._listening = False

    def _resume_listening(self) -> None:
        if not self._listening and not self.draining and len(self.by_fd) < self.max_connections:
            self.poller.register(self.listener.fileno(), _READABLE)
            self._listening = True

    # -- traffic --------------------------------------------------------------------------------------
    def on_event(self, fd: int, mask: int) -> None:
        conn = self.by_fd.get(fd)
        if conn is None:
            return
        try:
            if mask & _WRITABLE and self._flushed(conn):
                if (conn.struck or conn.ended) and not conn.open_ids:
                    raise PeerClosed()  # its replies are written: it goes
                if not conn.reading and not conn.draining and not conn.ended and not conn.struck:
                    conn.reading = True
                self.poller.modify(fd, _READABLE if conn.reading else 0)
                if conn.reading and (conn.pending or conn.wants_read):
                    self.turns.add(conn)  # those read before its replies backed up first, or a cut read's rest
            if mask & _READABLE and conn.reading:
                if not conn.pending:  # (else nothing more is read until its turns have handled them)
                    conn.wants_read = True
                self.turns.add(conn)
            elif mask & _HANGUP and not mask & _READABLE:
                raise PeerClosed()
            if not conn.closed and conn.stream.out_bytes:
                self._watch(conn)
        except (PeerClosed, ProtocolError):
            self.close(conn)

    def _read_turn(self, conn: DirectConnection) -> None:
        """One read of `conn`, in its identity's turn: at most READ_BYTES and MAX_EVENTS_PER_READ (round 55:
        4 MiB of pipelined `cancel` in one read held the worker ~2 s; from 4 connections it was killed as
        unresponsive); its complete messages become its pending ones, each a turn of its own."""
        try:
            conn.last_read_ns = time.monotonic_ns()
            was_open = conn.stream.open
            events = conn.stream.read(max_bytes=READ_BYTES, max_events=MAX_EVENTS_PER_READ, chunk_bytes=READ_BYTES, max_frames=MAX_FRAMES_PER_READ)
            conn.wants_read = conn.stream.read_cut  # more in the kernel: read again in a later turn
            if not was_open and conn.stream.open:
                self.handshaking.pop(conn.conn_id, None)
            if events:
                hold_pending(conn, events)
            if conn.stream.in_bytes > MAX_HEADER_BYTES and not conn.closed:
                self._keep_within_budget(conn.last_read_ns)
            if not conn.closed and conn.stream.out_bytes:
                self._watch(conn)
        except PeerClosed:
            self._peer_ended(conn)
        except ProtocolError:
            self.close(conn)
        except MemoryError:  # no room for a frame it declared (the worker's RLIMIT_AS): that connection goes, not the worker
            log.warning("closing a direct connection: no memory for what it sends", extra={"identity": conn.identity, "held_bytes": conn.stream.in_bytes})
            self.close(conn)

    def _peer_ended(self, conn: DirectConnection) -> None:
        """Its peer sent all it will (a close, or a shutdown of its sending side): what it sent and this
        worker took is still answered and written, if the peer is there to read it (round 56: a client
        that shut its sending side after pipelining its requests got no reply to those queued; round 58:
        nor those answered and still waiting to be written - a reply larger than the socket's buffer);
        then it is closed (on_event once its outbox is written, or housekeeping: nothing on the per-request
        path). A peer gone for good makes the next write fail, and the connection goes then."""
        if not conn.closed:
            conn.ended = True
            self._read_no_more(conn)

    def _read_no_more(self, conn: DirectConnection) -> None:
        """An ended or struck-out connection: nothing more is read from it; what it sent before and this
        worker took is answered and written, then it goes (on_event, housekeeping)."""
        if not conn.open_ids and not conn.stream.out_bytes:
            self.close(conn)
            return
        conn.reading = False
        conn.pending, conn.pending_bytes = None, 0
        self.handshaking.pop(conn.conn_id, None)
        self.poller.modify(conn.fd, _WRITABLE if conn.stream.out_bytes else 0)  # (EPOLLHUP still comes if it goes)

    def _handle_turn(self, conn: DirectConnection, event: Event) -> None:
        """One message read from `conn`, in its identity's turn. One whose replies back up keeps the rest
        until they are written (FairTurns skips a connection not reading); a struck-out one's are dropped."""
        try:
            self._on_message(conn, event)
            if not conn.closed and conn.stream.out_bytes:
                self._watch(conn)
        except (PeerClosed, ProtocolError):
            self.close(conn)
        except MemoryError:
            log.warning("closing a direct connection: no memory for what it sent", extra={"identity": conn.identity})
            self.close(conn)

    def _on_message(self, conn: DirectConnection, event: Event) -> None:
        received_ns = time.monotonic_ns()
        if isinstance(event, Oversized):
            frames = event.frames
            delimited = bool(frames) and len(frames[0]) == 0
            kept = frames[1:] if delimited else frames  # what arrived before the limit: the header, if any
            oversized_id = None
            if kept:
                try:
                    oversized_id = request_id_of(decode_header(kept[0]))
                except OpenInferError:
                    pass
            exc: OpenInferError
            if self._fits_leased(event):  # refused only because it was read while no valid lease was attached
                exc = self._not_leased(conn, received_ns) or PermissionDenied("attach a lease first, and send requests with tensors once it is answered: until then only headers are read from a connection")
            else:
                exc = OverLimit(f"request over this worker's limits: {event.reason} (server.max_request_bytes = {self.limits.max_request_bytes})")
            self.on_outcome(conn, conn.identity, "(oversized)", oversized_id, exc, received_ns)
            self.error(conn, delimited, oversized_id, exc, received_ns)
            if exc.details.get("lease") != "expired":  # a lease that expired under a conforming client is no strike
                self.strike(conn)
            return
        delimited = len(event) > 1 and len(event[0]) == 0
        body = event[1:] if delimited else event
        request_id: int | None = None
        op = "(malformed)"
        client = conn.identity  # the accounting key: "<name>@<identity>" once the header names itself
        try:
            if not body:
                raise InvalidArgument("empty message: expected a header frame")
            header = decode_header(body[0])
            request_id = request_id_of(header)
            op = check_envelope(header, len(body))
            client = client_key(header.get("client"), conn.identity)
            if op == "attach":
                answer = self._attach(conn, request_id, header)  # type: ignore[arg-type]
                self.on_outcome(conn, client, op, request_id, None, received_ns)
                self.reply(conn, delimited, answer)
                return
            if op not in DIRECT_OPERATIONS:
                raise InvalidArgument(f"`{op}` is not served on a worker endpoint: send it to the front door (only attach, infer and cancel come here)")
            refused = self._not_leased(conn, received_ns)
            if refused is not None:
                raise refused
            if op == "cancel":
                target = header.get("target")
                cancelled = isinstance(target, int) and self.on_cancel(conn, target)
                self.on_outcome(conn, client, op, request_id, None, received_ns)
                self.reply(conn, delimited, {"v": PROTOCOL_VERSION, "id": request_id, "result": {"cancelled": cancelled}})
                return
            self.on_request(conn, delimited, request_id, header, body[1:], received_ns)  # type: ignore[arg-type]
        except OpenInferError as exc:
            # Into the books before the reply leaves: a client that reads `stats` right after finds it there.
            self.on_outcome(conn, client, op, request_id, exc, received_ns)
            self.error(conn, delimited, request_id, exc, received_ns)
            if request_id is None or isinstance(exc, OverLimit) or conn.lease is None:
                self.strike(conn)  # a conforming client attaches first: anything else before it is a strike

    def _fits_leased(self, event: Oversized) -> bool:
        """Whether a message over a limit would have been read on a connection with a valid lease."""
        full = self._message_limits
        return (event.limit == "frames" and event.size <= full.frames) or (event.limit == "message_bytes" and event.size <= full.message_bytes)

    def _not_leased(self, conn: DirectConnection, received_ns: int) -> PermissionDenied | None:
        """Why this connection may not send `infer` or `cancel` now (None: it may). Without a valid lease
        it is read as an unattached one again: headers only."""
        lease = conn.lease
        if lease is not None and lease.expires_ns > received_ns:
            return None
        conn.stream.limits = self._unattached_limits
        if lease is None:
            return PermissionDenied("attach a lease first: send `attach` with the lease the front door's `lease` operation returned")
        return PermissionDenied("the lease has expired: take a new one from the front door and attach it", {"lease": "expired"})

    def _attach(self, conn: DirectConnection, request_id: int, header: dict[str, Any]) -> dict[str, Any]:
        """Check the lease before anything else is read from this connection; the reply to send."""
        try:
            lease = verify(self.key, header.get("lease"), conn.identity, self.model, self.version, time.monotonic_ns(), partial(peer_gids, conn.stream.sock))
        except LeaseRefused as exc:
            raise PermissionDenied(str(exc), {"lease": "expired"} if exc.expired else None) from None
        conn.lease = lease
        conn.stream.limits = self._message_limits
        result = {"model": self.model, "version": self.version, "worker": self.worker_id, "expires_in_ms": max(0, (lease.expires_ns - time.monotonic_ns()) // 1_000_000)}
        return {"v": PROTOCOL_VERSION, "id": request_id, "result": result}

    # -- replies --------------------------------------------------------------------------------------
    def held(self) -> ContextManager[None]:
        """Replies sent inside are held per connection and written when it ends: a batch's replies to
        one client cost one sendmsg, not one each (each is in the ledger before it is written)."""
        return self._held_writes.block()

    def _flushed(self, conn: DirectConnection) -> bool:
        before = conn.stream.out_bytes
        done = conn.stream.flush()
        if conn.stream.out_bytes < before:
            conn.out_moved_ns = time.monotonic_ns()
        return done

    def _write_held(self, conn: DirectConnection) -> None:
        if conn.closed:
            return
        before = conn.stream.out_bytes
        try:
            conn.stream.flush()
            if before == 0 and conn.stream.out_bytes:
                conn.out_moved_ns = time.monotonic_ns()
        except PeerClosed:
            self.close(conn)
            return
        if conn.stream.out_bytes:
            self._watch(conn)

    def send(self, conn: DirectConnection, frames: list[Buffer]) -> None:
        if conn.closed:
            return
        if self._held_writes.hold(conn, frames):
            return
        before = conn.stream.out_bytes
        try:
            conn.stream.send(frames)
        except PeerClosed:
            self.close(conn)
            return
        if conn.stream.out_bytes:
            if not before:
                conn.out_moved_ns = time.monotonic_ns()
            self._watch(conn)

    def reply(self, conn: DirectConnection, delimited: bool, header: dict[str, Any], payloads: list[Buffer] | None = None) -> None:
        frames: list[Buffer] = [_DELIMITER, self._pack(header)] if delimited else [self._pack(header)]
        if payloads:
            frames.extend(payloads)
        self.send(conn, frames)

    def error(self, conn: DirectConnection, delimited: bool, request_id: int | None, exc: OpenInferError, received_ns: int) -> None:
        self.reply(conn, delimited, {"v": PROTOCOL_VERSION, "id": request_id, "error": exc.to_wire(), "timing": {"total_us": (time.monotonic_ns() - received_ns) / 1000}})

    def _watch(self, conn: DirectConnection) -> None:
        if conn.stream.out_bytes > self.limits.max_reply_backlog_bytes:
            conn.reading = False  # a slow reader slows only itself: its requests wait in the kernel
        self.poller.modify(conn.fd, _WRITABLE | (_READABLE if conn.reading else 0))
        self._keep_replies_within_budget(time.monotonic_ns())

    def _keep_replies_within_budget(self, now_ns: int) -> None:
        """Replies waiting for readers that do not read: past the budgets, their connections are closed
        (direct_budgets.replies_to_cut)."""
        for conn in replies_to_cut(list(self.by_fd.values()), now_ns, self.held_budget, self.hard_held_budget):
            log.warning("closing a direct connection: replies it does not read hold too much", extra={"identity": conn.identity, "backlog_bytes": conn.stream.out_bytes, "soft_budget": self.held_budget, "hard_budget": self.hard_held_budget})
            self.close(conn)

    # -- rules ----------------------------------------------------------------------------------------
    def strike(self, conn: DirectConnection) -> None:
        """A message no conforming client sends. At the limit the connection is read no more; the requests
        it sent before are still answered (round 58's suspicion: it was closed once the replies already
        queued were written, and those still running were answered to nobody)."""
        conn.strikes += 1
        if self.limits.strike_limit and conn.strikes >= self.limits.strike_limit and not conn.struck and not conn.closed:
            conn.struck = True
            self._read_no_more(conn)

    def _keep_within_budget(self, now_ns: int) -> None:
        """Requests still arriving past the budgets are refused (direct_budgets.uploads_to_refuse): each is
        answered RESOURCE_EXHAUSTED before its connection is closed (the rest of its bytes would have to
        be read to keep the stream)."""
        for conn, why in uploads_to_refuse(list(self.by_fd.values()), now_ns, self.held_budget, self.hard_held_budget):
            self._refuse_unfinished(conn, why)

    def _refuse_unfinished(self, conn: DirectConnection, why: str) -> None:
        held = conn.stream.in_bytes
        log.warning("closing a direct connection: its unfinished request holds too much", extra={"identity": conn.identity, "held_bytes": held, "why": why, "soft_budget": self.held_budget, "hard_budget": self.hard_held_budget})
        header = conn.stream.unfinished_header()
        request_id = None
        if header is not None:
            try:
                request_id = request_id_of(decode_header(header))
            except OpenInferError:
                pass
        exc = ResourceExhausted(f"this worker cannot hold the request while it arrives ({held} bytes announced): {why}; unfinished requests may hold {self.held_budget} bytes (a quarter of its memory limit). Send it again", {"limit": self.held_budget})
        self.error(conn, False, request_id, exc, time.monotonic_ns())
        self._close_after_writing(conn)

    def housekeeping(self, now_ns: int) -> None:
        for conn in [c for c in self.handshaking.values() if now_ns - c.accepted_ns > HANDSHAKE_TIMEOUT_NS]:
            self.close(conn)
        self._keep_within_budget(now_ns)  # requests that stalled since their last bytes came
        self._keep_replies_within_budget(now_ns)  # and replies that stalled since they last moved
        for conn in [c for c in self.by_fd.values() if now_ns - c.accepted_ns > 2 * HANDSHAKE_TIMEOUT_NS and _unleased_for(c, now_ns) > 2 * HANDSHAKE_TIMEOUT_NS]:
            self._close_idle(conn, "no valid lease for 20 s: take a new lease")  # it holds one of the worker's few descriptors for nothing
        for conn in self.by_fd.values():
            if conn.lease is not None and conn.lease.expires_ns <= now_ns:
                conn.stream.limits = self._unattached_limits
        # A struck-out one goes once answered and written, or once it stops reading what it is sent.
        for conn in [c for c in self.by_fd.values() if c.struck and _nothing_to_send(c, now_ns) and (not c.open_ids or c.stream.out_bytes)]:
            self.close(conn)
        # An ended connection goes once nothing is owed and all is written - not when its replies have gone
        # unread for UNREAD_NS (round 59: a client that read late after its half-close lost all ten): a peer
        # that never reads them is closed by the rules any connection is (its lease gone, budgets, room).
        for conn in [c for c in self.by_fd.values() if c.ended and not c.open_ids and not c.stream.out_bytes]:
            self.close(conn)

    def goaway(self, reason: str) -> None:
        """This worker is retiring: no new connections; every client is told to take a new lease (its
        requests already sent are still answered, until it closes its connection or the drain ends)."""
        self.draining = True
        self._pause_listening()
        self.listener.close()  # connections still in its backlog are reset: their clients go elsewhere at once
        for conn in list(self.by_fd.values()):
            if conn.stream.open and not conn.draining:
                conn.draining = True
                self._say_goaway(conn, reason)

    def close(self, conn: DirectConnection) -> None:
        if conn.closed:
            return
        fd = conn.fd
        try:
            self.poller.unregister(fd)
        except (OSError, ValueError):
            pass
        self.by_fd.pop(fd, None)
        self.handshaking.pop(conn.conn_id, None)
        left = self.per_identity.get(conn.identity, 0) - 1
        if left > 0:
            self.per_identity[conn.identity] = left
        else:
            self.per_identity.pop(conn.identity, None)
        conn.stream.close()
        conn.closed = True
        self._resume_listening()

    def flush_all(self, until: float) -> None:
        """Write what waits in the connections' outboxes, until `until` (time.monotonic())."""
        while time.monotonic() < until:
            waiting = [conn for conn in self.by_fd.values() if conn.stream.out_bytes and not conn.closed]
            if not waiting:
                return
            poller = select.poll()  # poll(2): no new file descriptor (the serve policy forbids making one)
            for conn in waiting:
                poller.register(conn.fd, select.POLLOUT)
            poller.poll(max(1, int((until - time.monotonic()) * 1000)))
            for conn in waiting:
                try:
                    conn.stream.flush()
                except PeerClosed:
                    self.close(conn)

    def close_all(self) -> None:
        for conn in list(self.by_fd.values()):
            self.close(conn)

    @property
    def idle(self) -> bool:
        return not self.by_fd

    def held_bytes(self) -> int:
        """What its connections hold: requests still arriving (the room their frames announce), read and
        waiting for their turn, and replies not yet read."""
        return sum(conn.stream.in_bytes + conn.pending_bytes + conn.stream.out_bytes for conn in self.by_fd.values())


def reject_busy(identity: str, in_flight: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(f"{identity} has {in_flight} requests in flight on this worker: limit max_in_flight={limit} (per worker on the direct path)")
