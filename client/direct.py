"""The client's side of the direct path (docs/PROTOCOL.md section 17), shared by Client and AsyncClient.

A lease from the front door names a model version's workers and proves who may use them; the client
connects to each worker's endpoint (its own ZMTP over a Unix socket: openinfer.wire.zmtp), attaches the
lease, and sends `infer` there: one hop. What happens to a request when things change:
- the lease expires or a reload revokes it: the worker answers PERMISSION_DENIED with details
  {"lease": "expired"}; the client takes a new lease, attaches it and sends the request again (once);
- the worker retires (reload, scale-down): it says GOAWAY on the connection, listing the requests it has
  read (it answers them before it closes, unless it dies running one); one it reads later is answered as
  a lease expiry. The client sends nothing more there and takes a new lease for the next request. A
  request the retiring worker closed on without answering goes to the front door if the GOAWAY did not
  list it (never read), and fails WORKER_CRASHED if it did (it may be what killed the worker). One for a
  worker that cannot be connected to (gone since the lease was issued) goes to the front door too;
- the worker dies: its connection closes; each request in flight on it fails with WORKER_CRASHED
  (DEADLINE_EXCEEDED if its own deadline had passed: the daemon kills a worker whose run overstays it),
  never retried (a poison input would kill the next worker too);
- the client gives up on a request (its timeout passed with no reply): nothing more is sent on that
  connection until the reply or the close comes (the worker may be about to be killed for that run);
  requests meanwhile use the lease's other workers, or the front door.
Nothing here blocks: `DirectLink` is a non-blocking socket plus a frame stream; the clients wait.
"""
from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from openinfer.wire.errors import OpenInferError, PermissionDenied, ResourceExhausted, Unavailable
from openinfer.wire.protocol import MAX_FRAMES, MAX_HEADER_BYTES, PROTOCOL_VERSION, pack, unpack
from openinfer.wire.zmtp import Buffer, FrameStream, Limits, Oversized, PeerClosed, ProtocolError

RENEW_BEFORE_NS = 1_000_000_000  # a lease this close to expiry is renewed before the next request
MAX_LEASE_TOKEN_BYTES = 1024  # the daemon's are ~100 bytes (PROTOCOL.md 17.2); the C client takes the same
# The largest reply a worker may send this client: the lease's max_reply_bytes (the daemon's
# server.max_worker_message_bytes, the bound its front door puts on the same reply), else that setting's
# default. The client reads a worker's bytes itself on this path, so what a worker declares is bounded
# here: a frame over it is skipped as it arrives and its request answered RESOURCE_EXHAUSTED.
DEFAULT_MAX_REPLY_BYTES = 1 << 30
_REPLY_FRAMES = 1 << 16
# An infer reply's header (its outputs' names, shapes, timing, stages) is a few hundred bytes; a decoded
# msgpack header costs up to ~73 times its size in Python objects (a byte per empty map, ~70 bytes each
# decoded), so the bound is also what keeps a hostile worker's header from costing the client gigabytes:
# 15 MiB of empty maps took 1.1 GiB under the 16 MiB this was (attacker round 7).
MAX_INFER_REPLY_HEADER_BYTES = 1 << 20


def reply_limits(max_reply_bytes: int) -> Limits:
    return Limits(frames=_REPLY_FRAMES, first_frame=min(MAX_INFER_REPLY_HEADER_BYTES, max_reply_bytes), message_bytes=max_reply_bytes)


_REPLY_LIMITS = reply_limits(DEFAULT_MAX_REPLY_BYTES)


class NoDirectPath(Exception):
    """This daemon (or this model right now) cannot be reached directly: use the front door."""


@dataclass
class Lease:
    model: str
    version: int
    token: bytes
    expires_ns: int  # CLOCK_MONOTONIC, like the daemon's
    addresses: list[str]
    max_request_bytes: int
    max_header_bytes: int = MAX_HEADER_BYTES
    max_frames: int = MAX_FRAMES
    max_compute_s: float | None = None  # the model's max_compute_ms: a run that long gets its worker killed
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES

    def fresh(self, now_ns: int) -> bool:
        return now_ns < self.expires_ns - RENEW_BEFORE_NS


def parse_lease(result: Any, taken_ns: int) -> Lease:
    """The front door's `lease` result; NoDirectPath when it is not one (the daemon answers it anyway)."""
    try:
        limits = result["limits"]
        token = result["lease"]
        if type(token) is not bytes or not 0 < len(token) <= MAX_LEASE_TOKEN_BYTES:  # (bytes(N) of an int N would make N zero bytes)
            raise TypeError(f"lease token is not bytes of at most {MAX_LEASE_TOKEN_BYTES}")
        return Lease(
            str(result["model"]), int(result["version"]), token, taken_ns + int(result["expires_in_ms"]) * 1_000_000,
            [str(w["address"]) for w in result["workers"]], int(limits["max_request_bytes"]),
            int(limits.get("max_header_bytes", MAX_HEADER_BYTES)), int(limits.get("max_frames", MAX_FRAMES)),
            int(limits["max_compute_ms"]) / 1000 if "max_compute_ms" in limits else None,
            max(1, int(limits.get("max_reply_bytes", DEFAULT_MAX_REPLY_BYTES))),
        )
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise NoDirectPath(f"malformed lease: {exc}") from None


def check_request_size(frames: list[Any], lease: Lease) -> None:
    """Refuse locally what a worker would refuse for its size (PROTOCOL.md 9), naming the limit."""
    if len(frames) <= lease.max_frames and len(frames[0]) <= lease.max_header_bytes and request_bytes(frames) <= lease.max_request_bytes:
        return  # (every request checks this: the usual answer without a second call)
    check_limits(frames, lease.max_request_bytes, lease.max_header_bytes, lease.max_frames, f"the daemon's limit for {lease.model!r}", "server.max_request_bytes, or the model's max_request_bytes")


def check_limits(frames: list[Any], max_request_bytes: int, max_header_bytes: int, max_frames: int, whose: str, setting: str) -> None:
    """RESOURCE_EXHAUSTED for a request over a limit, before a byte of it is sent: the daemon would skip
    it anyway, and over about 1 GiB cut the connection, failing every other request in flight on it."""
    header = len(frames[0])
    if header > max_header_bytes:
        raise ResourceExhausted(f"request header is {header} bytes; the protocol's limit is {max_header_bytes} (too many inputs or names too long)", {"limit": max_header_bytes})
    if len(frames) > max_frames:
        raise ResourceExhausted(f"request has {len(frames)} frames; the protocol's limit is {max_frames} (a header and at most {max_frames - 1} tensors)", {"limit": max_frames})
    tensors = request_bytes(frames)
    if tensors > max_request_bytes:
        raise ResourceExhausted(f"request carries {tensors} bytes of tensors; {whose} is {max_request_bytes} ({setting}): split the request or raise the setting", {"limit": max_request_bytes})


def request_bytes(frames: list[Any]) -> int:
    total = 0
    for frame in frames[1:]:  # (a loop, not sum() over a generator: every request counts these)
        total += frame.nbytes if type(frame) is memoryview else memoryview(frame).nbytes
    return total


@dataclass(eq=False)
class Pending:
    request_id: int
    deadline: float  # time.monotonic()
    overrun_after: float | None = None  # time.monotonic() past which its run was over max_compute_ms
    reply: tuple[dict[str, Any], list[Buffer]] | None = None
    error: Exception | None = None  # an OpenInferError for the caller, or NoDirectPath: send it to the front door


@dataclass(eq=False)
class DirectLink:
    """One connection to one worker's endpoint."""

    address: str
    stream: FrameStream
    pending: dict[int, Pending] = field(default_factory=dict)
    attached_ns: int = 0  # expiry of the lease attached (0: none yet)
    draining: bool = False  # send nothing more here: the worker said GOAWAY, or broke a limit
    said_goaway: bool = False  # it said GOAWAY: a close then ends its drain (core.link_lost)
    read_by_worker: set[int] = field(default_factory=set)  # pending requests its GOAWAY said it read
    closed: bool = False
    # Requests this client gave up on (its timeout passed) whose reply has not come: the worker may still
    # be running one past its deadline, to be killed for it, so nothing new is sent here until the reply
    # (or the close) comes - a new request would die with the worker (WORKER_CRASHED).
    owed: set[int] = field(default_factory=set)
    # Why this client cut the link: its worker broke the protocol (ZMTP, or a reply header that does not
    # decode). What waits on it then fails INTERNAL saying so, not WORKER_CRASHED: the worker may be alive.
    broken: str | None = None

    @property
    def fd(self) -> int:
        return self.stream.sock.fileno()

    def usable(self) -> bool:
        return not self.draining and not self.closed and not self.owed and self.broken is None


def start_connect(address: str) -> DirectLink:
    """Connect to a worker's endpoint and send our greeting; the handshake goes on in handshake_step as
    the worker answers. A Unix socket connects at once or not at all (a full backlog is EAGAIN), so this
    never waits: Unavailable when the worker cannot be reached."""
    if not address.startswith("ipc://"):
        raise NoDirectPath(f"unexpected worker address {address!r}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.connect(address[len("ipc://") :])
    except OSError as exc:
        sock.close()
        raise Unavailable(f"cannot reach the worker at {address}: {exc.strerror}") from None
    return DirectLink(address, FrameStream(sock, _REPLY_LIMITS, handshake=True, socket_type=b"DEALER", accept_types=frozenset({b"ROUTER"})))


def handshake_step(link: DirectLink) -> bool:
    """Write and read what the handshake has now: True once it is over. Unavailable (the stream closed)
    when the worker closed the connection or broke ZMTP."""
    stream = link.stream
    try:
        stream.flush()
        stream.read()
    except (PeerClosed, ProtocolError):
        stream.close()
        raise Unavailable(f"the worker at {link.address} closed the connection") from None
    return stream.open


def connect(address: str, timeout: float) -> DirectLink:
    """Connect and complete the ZMTP handshake (blocking, bounded by `timeout`)."""
    link = start_connect(address)
    sock = link.stream.sock
    deadline = time.monotonic() + timeout
    try:
        while not handshake_step(link):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"no handshake from the worker at {address}")
            select.select([sock], [sock] if link.stream.out_bytes else [], [], remaining)
    except BaseException:  # no handshake in time (a budget of a millisecond), or interrupted: nothing to keep
        link.stream.close()
        raise
    return link


def attach_frames(request_id: int, lease: Lease) -> list[bytes]:
    return [pack({"v": PROTOCOL_VERSION, "id": request_id, "op": "attach", "lease": lease.token})]


def read_replies(link: DirectLink) -> list[tuple[dict[str, Any], list[Buffer]]]:
    """Complete replies available now; GOAWAY is noted on the link. Raises PeerClosed when the worker
    is gone (the caller fails what was pending there)."""
    if link.broken is not None:
        raise PeerClosed()
    replies = []
    try:
        events = link.stream.read()
    except ProtocolError as exc:
        link.broken = f"the worker at {link.address} broke the protocol ({exc})"
        raise PeerClosed() from None
    for event in events:
        if isinstance(event, Oversized):
            refused = _refused_reply(event, link)
            if refused is not None:
                replies.append(refused)
            continue
        frames = event[1:] if len(event) > 1 and not len(event[0]) else event
        try:
            header = unpack(frames[0])
        except Exception as exc:
            header = f"{type(exc).__name__}: {str(exc)[:200]}"
        if not isinstance(header, dict):  # no request can be told from it: the link is cut, and what waits on it fails (link_lost)
            link.broken = f"the worker at {link.address} sent a reply header that is not a protocol map ({header if isinstance(header, str) else type(header).__name__})"
            break
        if header.get("goaway") is True and header.get("id") is None:  # (exactly as PROTOCOL.md 17.5 words it, as the C client reads it)
            link.draining = link.said_goaway = True
            read = header.get("read")
            if type(read) is list:  # only ids pending here count (the list is the worker's word, bounded by the reply limit)
                link.read_by_worker.update(i for i in read if type(i) is int and i in link.pending)
            continue
        if type(header.get("id")) is not int:  # names no request of ours (an id is an int): dropped, never looked up
            continue
        if link.owed:
            link.owed.discard(header["id"])
        replies.append((header, frames))
    if link.broken is not None and not replies:
        raise PeerClosed()
    return replies


def answer_pending(link: DirectLink, header: dict[str, Any], frames: list[Buffer]) -> bool:
    """Give a reply (from read_replies: its id is an int) to the request waiting for it on this link; True
    when one took it. The first reply for an id is its answer: a second one, a worker's lie, is dropped
    (it once overwrote the first when both came in one read)."""
    pending = link.pending.get(header["id"])
    if pending is None or pending.reply is not None:
        return False
    pending.reply = (header, frames)
    return True


def _refused_reply(event: Oversized, link: DirectLink) -> tuple[dict[str, Any], list[Buffer]] | None:
    """A reply over this client's limits (its rest is skipped as it arrives, never stored): the error
    its request gets, when the header that came first names one waiting here. Without such a header
    nothing can be told, and the request ends at its timeout. The link takes no new request: a worker
    that announces an endless frame would swallow their replies."""
    try:
        header = unpack(event.frames[0]) if event.frames else None
    except Exception:
        return None
    request_id = header.get("id") if isinstance(header, dict) else None
    link.draining = True  # what no worker of ours sends: nothing more goes there, and it closes once idle
    if type(request_id) is not int or request_id not in link.pending:  # names no request: dropped, as read_replies drops one (a map or list id is not even hashable: round 21, a raw TypeError)
        return None
    limit = link.stream.limits.message_bytes
    error = ResourceExhausted(f"the reply from the worker at {link.address} is over this client's limit: {event.reason} (the lease's max_reply_bytes, the daemon's server.max_worker_message_bytes, or the client's own max_reply_bytes if smaller)", {"limit": limit})
    return {"v": PROTOCOL_VERSION, "id": request_id, "error": error.to_wire()}, [event.frames[0]]


def lease_expired(header: dict[str, Any]) -> bool:
    error = header.get("error")
    if not isinstance(error, dict) or error.get("code") != PermissionDenied.code:
        return False
    details = error.get("details")
    return isinstance(details, dict) and details.get("lease") == "expired"
