"""What the blocking and the asyncio client have in common, written once: options, request ids, how a
request is encoded and checked before it leaves, how long to wait, how replies and errors are read,
what is retried, and the bookkeeping of leases and links of the direct path. The two clients differ only
in how they wait (client/sync_client.py, client/async_client.py)."""
from __future__ import annotations

import itertools
import os
import random
import struct
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import zmq

import msgpack

from openinfer.wire.errors import DeadlineExceeded, Internal, InvalidArgument, OpenInferError, ResourceExhausted, Unavailable, WorkerCrashed, error_from_wire
from openinfer.wire.protocol import MAX_HEADER_BYTES, MAX_TIMEOUT_MS, encode_infer_request, encode_op_request, pack, resolve_address, unpack
from openinfer.wire.tensors import DATATYPE_TO_NUMPY, BF16Array
from openinfer.wire.zmtp import PeerClosed

from .direct import DEFAULT_MAX_REPLY_BYTES, DirectLink, Lease, NoDirectPath, Pending, check_limits, lease_expired, parse_lease, read_replies, reply_limits, request_bytes

DEFAULT_TIMEOUT_S = 30.0
_MAX_MSGSIZE = 2**63 - 1  # ZMQ_MAXMSGSIZE is an int64
# How much longer than its own `timeout` a client waits before it gives up by itself (PROTOCOL.md 10.2):
# the daemon's DEADLINE_EXCEEDED, which says where the time went, arrives after the deadline it counts
# from when it read the request. 10 % of the timeout, at least 600 ms and at most 1 s: a request stuck
# behind a run its worker cannot stop is answered by the daemon half a second past its deadline (10.1);
# a client that gave up first said only "no reply", and its in-flight slot was still taken meanwhile.
REPLY_SLACK_FRACTION = 0.1
REPLY_SLACK_MIN_S = 0.6
REPLY_SLACK_MAX_S = 1.0
# On the direct path at least this: a worker whose run does not stop at its deadline (a step's Python
# loop, which onnxruntime's stop flag cannot reach) is killed half a second past it, and the closed
# connection then answers the request DEADLINE_EXCEEDED, which says where the time went. A second more
# than the kill's half second: on a loaded machine the kill comes later. Giving up first is safe all the
# same: the link then takes nothing new until the reply or the close (DirectLink.owed).
DIRECT_REPLY_SLACK_MIN_S = 1.5


# A request with more tensor bytes than this is checked against the front door's limits before it is
# sent (the first such request asks `health` for them, once); smaller ones cannot be over any default.
LARGE_REQUEST_BYTES = 1 << 20
STAY_QUEUE_US = 100  # a reply that waited longer than this in its worker's queue moves the next request on
TEMPLATES_KEPT = 256  # request shapes whose header is kept packed
GONE_KEPT = 256  # unreachable worker addresses remembered
# The largest front-door reply header decoded: `stats` of a daemon with its 1,024 client rows is well under
# 1 MiB. (A worker's infer reply on the direct path: direct.MAX_INFER_REPLY_HEADER_BYTES, 1 MiB.)
MAX_REPLY_HEADER_BYTES = 8 << 20
UNDECODABLE_REASON_CHARS = 200  # of a reply header's decoding error, in the Internal error that names it
_PACKER = msgpack.Packer()
_ID_KEY = pack("id")
_SENT_KEY = pack("sent_ns")
_UINT64 = struct.Struct(">BQ")  # msgpack uint 64: the send time, patched into a kept header
_FAST_DATATYPES = {dtype: name for name, dtype in DATATYPE_TO_NUMPY.items() if name not in ("BYTES", "BOOL")}


def dropped(read_event: Callable[[], list[bytes]]) -> bool:
    """Whether a socket monitor's pending events (read with `read_event` until zmq.Again) include a
    dropped connection."""
    seen = False
    while True:
        try:
            event = read_event()
        except zmq.Again:
            return seen
        seen = seen or int.from_bytes(event[0][:2], "little") == zmq.EVENT_DISCONNECTED


MAX_TIMEOUT_S = MAX_TIMEOUT_MS / 1000


def bad_timeout(timeout: float) -> InvalidArgument:
    return InvalidArgument(f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f} (about 24.8 days); got {timeout!r}")


def reply_slack(timeout: float) -> float:
    return min(REPLY_SLACK_MAX_S, max(REPLY_SLACK_MIN_S, timeout * REPLY_SLACK_FRACTION))


class ClientCore:
    """The state and decisions of one client; no I/O."""

    def __init__(self, address: str | None, timeout: float, client_name: str | None, retries: int, direct: bool, curve: bool, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        if not 0.0 < timeout <= MAX_TIMEOUT_S:  # (NaN too)
            raise bad_timeout(timeout)
        if type(max_reply_bytes) is not int or not 0 < max_reply_bytes <= _MAX_MSGSIZE:
            raise InvalidArgument(f"max_reply_bytes must be a positive integer of bytes (at most 2**63 - 1); got {max_reply_bytes!r}")
        # The largest reply frame this client takes from the front door (ZMQ_MAXMSGSIZE) and the cap on
        # what a lease may declare for a worker's replies: a daemon's, or a fake one's, say-so never
        # sizes this client's memory alone.
        self.max_reply_bytes = max_reply_bytes
        self.address = resolve_address(address)
        self.timeout = timeout
        self.client_name = client_name
        # Retry policy: only UNAVAILABLE (daemon unreachable, draining, model not serving) is retried, with
        # exponential backoff from 50 ms, within the call's timeout. A request that failed with
        # WORKER_CRASHED is never retried: a poison input would kill the next worker too.
        self.retries = retries
        self.direct = direct and self.address.startswith("ipc://") and not curve
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)
        self.leases: dict[tuple[str, int | None], Lease] = {}
        self.links: dict[str, DirectLink] = {}
        self._turn = random.randrange(1 << 16)  # clients start at different workers
        self._stay: str | None = None  # the worker this client keeps sending to (pick_address)
        # Worker endpoints that could not be connected to: gone, though a lease taken before the daemon
        # noticed may still name them. Addresses are never reused (worker ids only grow).
        self.gone: set[str] = set()
        self._templates: dict[tuple[Any, ...], bytes] = {}
        self.door_limits: dict[str, int] | None = None  # the front door's, from `health` (None: not asked yet)
        self._slack_for, self._slack = 0.0, 0.0  # give_up_at's slack, for this budget

    def next_id(self) -> int:
        return next(self._ids)

    # -- requests -------------------------------------------------------------------------------------
    def infer_frames(self, request_id: int, model: str, inputs: Mapping[str, np.ndarray | BF16Array | bytes | str], version: int | None, outputs: Sequence[str] | None, budget: float, priority: int | None) -> list[Any]:
        """The request's frames. A client mostly repeats one request shape: its header, but for the id, is
        packed once and kept (at most TEMPLATES_KEPT), and contiguous little-endian arrays go as they are."""
        if not 0.0 < budget <= MAX_TIMEOUT_S:  # (NaN too)
            raise bad_timeout(budget)
        timeout_ms = max(1, int(budget * 1000))
        key: list[Any] = [model, version, tuple(outputs) if outputs is not None else None, timeout_ms, priority]
        payloads: list[Any] = []
        for name, value in inputs.items():
            if type(value) is not np.ndarray:  # BF16Array and array-likes: the general encoder
                return self._encode_slow(request_id, model, inputs, version, outputs, timeout_ms, priority, sent=True)
            datatype = _FAST_DATATYPES.get(value.dtype)
            try:  # the bytes as they are; a view that is not C-contiguous, or has no elements, cannot be cast (TypeError)
                payload = memoryview(value).cast("B") if datatype is not None else None  # type: ignore[arg-type]
            except TypeError:
                payload = None
            if payload is None:
                return self._encode_slow(request_id, model, inputs, version, outputs, timeout_ms, priority, sent=True)
            key.append((name, datatype, value.shape))
            payloads.append(payload)
        template_key = tuple(key)
        prefix = self._templates.get(template_key)
        if prefix is None:
            frames = self._encode_slow(0, model, inputs, version, outputs, timeout_ms, priority)
            fields = unpack(frames[0])
            del fields["id"]
            prefix = _PACKER.pack_map_header(len(fields) + 2) + b"".join(pack(k) + pack(v) for k, v in fields.items()) + _SENT_KEY
            if len(self._templates) >= TEMPLATES_KEPT:
                self._templates.clear()
            self._templates[template_key] = prefix
        return [prefix + _UINT64.pack(0xCF, time.monotonic_ns()) + _ID_KEY + _PACKER.pack(request_id), *payloads]

    def _encode_slow(self, request_id: int, model: str, inputs: Mapping[str, np.ndarray | BF16Array | bytes | str], version: int | None, outputs: Sequence[str] | None, timeout_ms: int, priority: int | None, sent: bool = False) -> list[Any]:
        try:
            frames = encode_infer_request(request_id, model, inputs, version=version, outputs=outputs, timeout_ms=timeout_ms, client_name=self.client_name, priority=priority)
        except (TypeError, ValueError) as exc:  # an input the wire cannot carry: the caller's mistake, said before sending
            raise InvalidArgument(f"cannot send these inputs: {exc}") from None
        if sent:  # when the timeout starts, for a worker that reads the request later (PROTOCOL.md 17.4)
            frames[0] = pack({**unpack(frames[0]), "sent_ns": time.monotonic_ns()})
        if len(frames[0]) > MAX_HEADER_BYTES:
            raise InvalidArgument(f"request header is {len(frames[0])} bytes; the protocol's limit is {MAX_HEADER_BYTES} (too many inputs or names too long)")
        return frames

    def needs_door_limits(self, frames: list[Any]) -> bool:
        """Whether this request is large enough to be checked and the limits are not known yet."""
        return self.door_limits is None and request_bytes(frames) > LARGE_REQUEST_BYTES

    def door_limits_from(self, health: dict[str, Any]) -> None:
        """Keep the limits `health` names (an older daemon names none: the daemon's answer decides)."""
        limits = health.get("limits")
        kept: dict[str, int] = {}
        if isinstance(limits, dict):
            kept = {k: v for k, v in limits.items() if k in ("max_request_bytes", "max_header_bytes", "max_frames") and type(v) is int and v > 0}
        self.door_limits = kept if len(kept) == 3 else {}

    def check_door_size(self, frames: list[Any]) -> None:
        limits = self.door_limits
        if limits and request_bytes(frames) > LARGE_REQUEST_BYTES:
            check_limits(frames, limits["max_request_bytes"], limits["max_header_bytes"], limits["max_frames"], "the daemon's limit", "server.max_request_bytes")

    def op_frames(self, request_id: int, op: str, fields: dict[str, Any]) -> list[Any]:
        if self.client_name:
            fields = {**fields, "client": self.client_name}
        return encode_op_request(request_id, op, **fields)

    @staticmethod
    def op_result(header: dict[str, Any]) -> dict[str, Any]:
        if "error" in header:
            raise error_from_wire(header["error"])
        result = header.get("result")
        return result if isinstance(result, dict) else {}

    @staticmethod
    def wait_s(budget: float, direct: bool = False) -> float:
        slack = reply_slack(budget)
        return budget + (max(slack, DIRECT_REPLY_SLACK_MIN_S) if direct else slack)

    def connection_lost(self) -> Unavailable:
        """The front door's connection closed while a request was in flight: its reply cannot come."""
        # libzmq tells no reason: a reply frame over ZMQ_MAXMSGSIZE closes the connection like a daemon
        # that went away does, so the message names both.
        return Unavailable(
            f"the connection to the daemon at {self.address} closed while this request was in flight (it may or may not have run); "
            f"a reply with a frame over this client's max_reply_bytes ({self.max_reply_bytes} bytes) closes it too",
            {"connection": "lost"},
        )

    @staticmethod
    def retryable(exc: Unavailable) -> bool:
        """A request lost with its connection may have run: never sent twice behind the caller's back."""
        return exc.details.get("connection") != "lost"

    def reply_header(self, raw: bytes | memoryview) -> Any:
        """A front-door reply's header, decoded. One that does not decode (invalid msgpack, an int map key,
        bad UTF-8, trailing bytes) is no daemon's: Internal naming what was wrong, never msgpack's own
        ValueError, which a caller catching OpenInferError would not expect. One over
        MAX_REPLY_HEADER_BYTES is not decoded at all: decoded, a header costs up to ~73 times its size
        (a fake daemon's 15 MiB of empty maps took 1.1 GiB)."""
        size = len(raw)
        if size > MAX_REPLY_HEADER_BYTES:
            raise ResourceExhausted(f"the reply from {self.address} has a header of {size} bytes, over this client's limit of {MAX_REPLY_HEADER_BYTES} (no daemon's reply header is near it)", {"limit": MAX_REPLY_HEADER_BYTES})
        try:
            return unpack(raw)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if len(reason) > UNDECODABLE_REASON_CHARS:
                reason = reason[:UNDECODABLE_REASON_CHARS] + "..."
            raise Internal(f"the reply from {self.address} is not a valid protocol header ({len(raw)} bytes): {reason!r}", {"reply": "undecodable"}) from None

    def timed_out(self, budget: float, direct: bool = False) -> DeadlineExceeded:
        slack = self.wait_s(budget, direct) - budget
        return DeadlineExceeded(f"no reply from {self.address} within {budget:.3g} s (plus {slack:.3g} s of slack)")

    def give_up_at(self, deadline: float, budget: float) -> float:
        """When a direct request stops waiting for its reply: its deadline plus the direct slack. Counted
        from the deadline, not from the send, so that what came before the send (a lease, a connection, an
        attach, a first try refused as lease-expired) is part of the caller's timeout, not added to it."""
        if budget != self._slack_for:  # (every request asks; its budget rarely changes)
            self._slack_for, self._slack = budget, self.wait_s(budget, direct=True) - budget
        return deadline + self._slack

    def lease_wait_s(self, deadline: float) -> float:
        """How long a request may wait for the daemon's answer to its `lease`: what is left of its own
        timeout, and never more than the client's."""
        return min(self.timeout, max(0.001, deadline - time.monotonic()))

    @staticmethod
    def unsent(budget: float, waiting_for: str) -> DeadlineExceeded:
        """The request's timeout passed before it could be sent: what it was waiting for."""
        return DeadlineExceeded(f"the request's timeout ({budget:.3g} s) passed before it was sent: {waiting_for}")

    def no_time_left(self, exc: NoDirectPath, budget: float) -> OpenInferError:
        """The direct path failed and the request's deadline has passed: the error to raise instead of a
        1 ms try at the front door (which would fail "no reply within 0.001 s"). An unreachable daemon
        stays UNAVAILABLE."""
        cause = exc.__cause__
        return cause if isinstance(cause, Unavailable) else self.unsent(budget, str(exc))

    # -- the direct path ------------------------------------------------------------------------------
    def lease_taken(self, key: tuple[str, int | None], result: Any, taken_ns: int) -> Lease:
        lease = parse_lease(result, taken_ns)
        lease.max_reply_bytes = min(lease.max_reply_bytes, self.max_reply_bytes)
        self.leases[key] = lease
        return lease

    def attached(self, link: DirectLink, lease: Lease, header: dict[str, Any]) -> None:
        """The worker's answer to `attach`: the link carries `lease` from now on, or the lease is gone
        (refused as expired: NoDirectPath, the request goes to the front door) or the error is raised."""
        if "error" in header:
            if lease_expired(header):
                self.leases.pop((lease.model, lease.version), None)
                raise NoDirectPath("the lease was refused as expired")
            raise error_from_wire(header["error"])
        link.attached_ns = lease.expires_ns
        if link.stream.limits.message_bytes != lease.max_reply_bytes:
            link.stream.limits = reply_limits(lease.max_reply_bytes)

    def lease_refused(self, exc: OpenInferError) -> None:
        """The front door would not give a lease: some refusals mean "not here" (use the front door),
        the others are the caller's to see (PERMISSION_DENIED, NOT_FOUND ...)."""
        if (isinstance(exc, InvalidArgument) and "unknown operation" in exc.message) or exc.details.get("direct") == "off":
            self.direct = False  # an older daemon, or one without a direct path: the front door for good
            raise NoDirectPath(exc.message) from None
        if isinstance(exc, Unavailable):
            raise NoDirectPath(exc.message) from exc  # the front door may still answer; if not, this is the error
        raise exc

    def pick_address(self, lease: Lease) -> str | None:
        """Which of the lease's workers gets the next request (None: every one is retiring or gone).
        The one with the fewest requests outstanding from this client; among those, the worker that
        answered last - it is awake, and a worker looks for its next request a moment before it sleeps
        (pool.worker_spin_us) - unless that answer had waited in its queue; else the next in turn."""
        stay = self._stay
        if stay is not None:
            link = self.links.get(stay)
            if link is not None and not link.pending and link.usable() and stay in lease.addresses:
                return stay  # the common case of a blocking client, in one look
        addresses = lease.addresses
        usable = [a for a in addresses if a not in self.gone and ((link := self.links.get(a)) is None or link.usable())]
        if not usable:
            return None
        load = {a: len(self.links[a].pending) if a in self.links else 0 for a in usable}
        least = min(load.values())
        if stay in load and load[stay] == least:
            return stay
        self._turn = (self._turn + 1) % len(addresses)
        choice = next(a for a in addresses[self._turn :] + addresses[: self._turn] if a in load and load[a] == least)
        self._stay = choice
        return choice

    def answered(self, address: str, header: dict[str, Any]) -> None:
        """A reply from the worker at `address`: stay with it unless the request waited in its queue."""
        timing = header.get("timing")
        queue_us = timing.get("queue_us") if isinstance(timing, dict) else None
        if type(queue_us) in (int, float) and queue_us > STAY_QUEUE_US:  # type: ignore[operator]
            self._stay = None
        elif self._stay is None:
            self._stay = address

    @staticmethod
    def gave_up(link: DirectLink, request_id: int) -> None:
        """The caller's timeout passed with no reply: the link takes nothing new until that reply comes."""
        if not link.closed:
            link.owed.add(request_id)

    def link_lost(self, link: DirectLink) -> None:
        """Its worker is gone: what waited there fails (WORKER_CRASHED, or DEADLINE_EXCEEDED past its
        deadline), and leases naming it are renewed before the next request. On a link whose worker said
        GOAWAY, a close is the end of its drain: the worker answers everything it read before it closes,
        so a request still unanswered that the GOAWAY did not list as read was never taken and goes to
        the front door instead. One it listed fails WORKER_CRASHED - the worker died while it could run
        it, and a poison input sent again would kill the next worker too - and one whose deadline or
        max_compute_ms has passed DEADLINE_EXCEEDED (the daemon waits that long for a run before it
        kills a worker it retired): never run twice."""
        link.closed = True
        link.stream.close()
        if self.links.get(link.address) is link:
            del self.links[link.address]
        now = time.monotonic()
        for pending in link.pending.values():
            if pending.reply is None and pending.error is None:
                if link.broken is not None:
                    pending.error = Internal(f"{link.broken}; this client closed the connection")
                elif now >= pending.deadline:
                    pending.error = DeadlineExceeded("its deadline passed while it ran, and its worker was killed")
                elif pending.overrun_after is not None and now >= pending.overrun_after:
                    pending.error = DeadlineExceeded("it was still running past the model's max_compute_ms, and its worker was killed and is being replaced")
                elif link.said_goaway and pending.request_id not in link.read_by_worker:  # (not a link we stopped using ourselves: round 23)
                    pending.error = NoDirectPath(f"the worker at {link.address} retired before taking the request")
                elif link.said_goaway:
                    pending.error = WorkerCrashed(f"the worker at {link.address} had taken this request when it retired, and exited without answering it (it may have crashed running it: it is not sent again)")
                else:
                    pending.error = WorkerCrashed(f"the worker at {link.address} exited while running this request")
        self._forget_leases_naming(link.address)

    def unreachable(self, address: str) -> None:
        """A worker of a lease cannot be connected to (it retired since the lease was issued, or is
        exiting): nothing was sent; the request tries the lease's other workers (pick_address leaves this
        one out), then the front door, and the next request takes a new lease."""
        if len(self.gone) >= GONE_KEPT:
            self.gone.clear()
        self.gone.add(address)
        self._forget_leases_naming(address)

    def _forget_leases_naming(self, address: str) -> None:
        for key, lease in list(self.leases.items()):
            if address in lease.addresses:
                del self.leases[key]

    def notice_goaway(self, link: DirectLink) -> None:
        """Take in what already arrived on an idle link (a GOAWAY, or the close after one) before a
        request is sent there; one recv that usually finds nothing."""
        try:
            read_replies(link)
        except PeerClosed:
            self.link_lost(link)

    def settle_owed(self) -> None:
        """Read what came on links that owe a reply (the sync client reads a link only while it waits
        there): the reply, or the close, makes the link usable again or ends it."""
        for link in [link for link in self.links.values() if link.owed]:
            self.notice_goaway(link)

    def tidy_links(self) -> None:
        """Before a sync client's request: close drained links (forget_drained) and settle owed ones
        (settle_owed). Every request comes here; most find neither, in one look at each link."""
        for link in self.links.values():
            if link.owed or (link.draining and not link.pending):
                break
        else:
            return
        self.forget_drained()
        self.settle_owed()

    def forget_drained(self, unwatch: Callable[[DirectLink], None] | None = None) -> None:
        """Links whose worker said GOAWAY and that have nothing pending: close them. `unwatch(link)` runs
        before each is closed (an event loop must stop watching its fd while the fd still names it: after
        the close it reads -1, and a stale registration once took a later link's events - round 10)."""
        done = [link for link in self.links.values() if link.draining and not link.pending]
        for link in done:
            if unwatch is not None:
                unwatch(link)
            link.closed = True
            link.stream.close()
            del self.links[link.address]

    def close_links(self) -> None:
        for link in self.links.values():
            for pending in link.pending.values():
                if pending.reply is None and pending.error is None:
                    pending.error = Unavailable("client closed")
            link.stream.close()
            link.closed = True
        self.links.clear()

    @staticmethod
    def register(link: DirectLink, request_id: int, deadline: float, lease: Lease | None = None) -> Pending:
        overrun = time.monotonic() + lease.max_compute_s if lease is not None and lease.max_compute_s is not None else None
        pending = Pending(request_id, deadline, overrun)
        link.pending[request_id] = pending
        return pending
