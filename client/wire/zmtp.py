"""ZMTP 3.x framing (ZeroMQ's wire protocol, rfc.zeromq.org spec 37), spoken by the daemon itself.

libzmq's ROUTER decides routing by identities that peers may choose, aborts the process on some of
their choices and on EMFILE, and hides each connection's credentials and buffers from the application
(DESIGN §6). So the daemon owns its listening sockets and speaks ZMTP on them with this module; clients
keep using libzmq unchanged. The same framing carries the supervisor <-> worker channel (a socketpair,
no greeting).

What is implemented: the 64-byte greeting (major version 3, any minor), the NULL mechanism's READY
exchange with its properties (`Socket-Type`; an `Identity` a peer sends is read and ignored), the ERROR
command, PING -> PONG (3.1 heartbeats), and multipart messages of short and long frames. Limits are
checked as bytes arrive, before anything is buffered: a frame or message over its limit is reported
and its remaining bytes are skipped, never stored.

Security mechanisms that seal every frame (CurveZMQ) are a subclass, openinfer.wire.sealed.SealedFrameStream,
which takes over the greeting's and the handshake's hooks below and the parsing after the handshake;
a NULL stream never runs any of its code.
"""
from __future__ import annotations

import errno
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from contextlib import contextmanager
from typing import Callable, Generic, Iterable, Iterator, TypeVar, Union

import numpy

MORE = 0x01
LONG = 0x02
COMMAND = 0x04
_KNOWN_FLAGS = MORE | LONG | COMMAND

GREETING_SIZE = 64
SIGNATURE_SIZE = 10
_LONG_SIZE = struct.Struct(">Q")
_PROPERTY_VALUE_SIZE = struct.Struct(">I")
MAX_COMMAND_BYTES = 64 * 1024  # READY properties, PING contexts: nothing legitimate is larger
BIG_FRAME = 64 * 1024  # frames at least this large are received straight into their own buffer
_RECV_CHUNK = 256 * 1024
# What one read may take of a large frame (received straight into its buffer, no parsing: ~0.1 ns a byte)
# when its budget is smaller. Unbounded, a sender that kept the socket full was read for as long as its
# 64 MiB frame lasted, in one turn; at the front door's 16 KiB budget a 16 MiB request on a worker's
# endpoint took a third longer (1,024 turns); at this size ~5 % (tiny, 16 MiB: 18.7 vs 17.8 ms).
BIG_READ_BYTES = 1024 * 1024
_IOV_MAX = 512  # buffers handed to one sendmsg (the kernel's IOV_MAX is 1024)
# A PING is answered only while less than this waits for the peer: a peer that pings without reading
# once made a worker queue 80,000 PONGs, and its loop stalled until it was killed as unresponsive.
PONG_BACKLOG_BYTES = 64 * 1024
# What skipping one frame of an oversized message costs against Limits.skip_bytes besides its bytes: a
# chain of empty frames, each flagged MORE, is cut after skip_bytes / SKIPPED_FRAME_COST frames (262,144
# by default) instead of never (one kept a worker at 100 % for as long as it was sent).
SKIPPED_FRAME_COST = 4096
# Commands (PING, and the others we ignore) a peer may send: a burst of this many, then this many a
# second (a libzmq heartbeat every 10 ms is 100 a second). A peer over it is cut: 80,000 PINGs once kept
# a worker's loop parsing and answering for as long as they came, at 97 % CPU. The burst is small because
# every new connection starts with it: 47 connections reconnecting every 2 s with a burst of 4,096 each
# kept a worker and the front door at 100 % CPU.
COMMAND_BURST = 64
COMMANDS_PER_S = 100

Buffer = Union[bytes, bytearray, memoryview]


def frame_buffer(size: int) -> memoryview:
    """Room for a large frame whose size its header declares. Not zero-filled (bytearray(size) is): the
    kernel commits a page only when the frame's bytes land in it, so a peer that declares a frame it never
    sends costs address space, not memory (18 bytes once made a reader commit 2 GiB)."""
    return numpy.empty(size, numpy.uint8).data


class ProtocolError(Exception):
    """The peer broke ZMTP (or a hard limit): the connection must be closed. The message says how."""


class PeerClosed(Exception):
    """The peer closed the connection (EOF or reset)."""


def greeting(mechanism: bytes = b"NULL", as_server: bool = False) -> bytes:
    """Our 64-byte greeting: signature, version 3.1, mechanism, as-server, filler."""
    return b"\xff" + b"\x00" * 7 + b"\x01\x7f" + b"\x03\x01" + mechanism.ljust(20, b"\x00") + (b"\x01" if as_server else b"\x00") + b"\x00" * 31


def parse_greeting(raw: Buffer) -> tuple[int, int, bytes, bool]:
    """(major, minor, mechanism, as_server) of a peer's greeting; ProtocolError if it is not ZMTP 3.x."""
    raw = bytes(raw)
    if len(raw) != GREETING_SIZE or raw[0] != 0xFF or raw[9] != 0x7F:
        raise ProtocolError("not a ZMTP greeting")
    major, minor = raw[10], raw[11]
    if major < 3:
        raise ProtocolError(f"ZMTP {major}.{minor} is not supported (3.0 or newer)")
    mechanism = raw[12:32].rstrip(b"\x00")
    return major, minor, mechanism, raw[32] == 1


def frame_header(size: int, flags: int) -> bytes:
    if size < 256:
        return bytes((flags, size))
    return bytes((flags | LONG,)) + _LONG_SIZE.pack(size)


def command(name: bytes, body: bytes = b"") -> bytes:
    """One command frame, header included."""
    payload = bytes((len(name),)) + name + body
    return frame_header(len(payload), COMMAND) + payload


def encode_properties(properties: dict[bytes, bytes]) -> bytes:
    parts = []
    for name, value in properties.items():
        parts.append(bytes((len(name),)) + name + _PROPERTY_VALUE_SIZE.pack(len(value)) + value)
    return b"".join(parts)


def parse_properties(body: bytes) -> dict[bytes, bytes]:
    """READY metadata: name-length(1) name value-length(4, big-endian) value, repeated; names are
    case-insensitive (returned lower-cased)."""
    properties: dict[bytes, bytes] = {}
    offset = 0
    while offset < len(body):
        name_length = body[offset]
        offset += 1
        name = body[offset : offset + name_length]
        offset += name_length
        if len(name) != name_length or offset + 4 > len(body):
            raise ProtocolError("truncated READY property")
        (value_length,) = _PROPERTY_VALUE_SIZE.unpack_from(body, offset)
        offset += 4
        if offset + value_length > len(body):
            raise ProtocolError("READY property value past the end of the command")
        properties[name.lower()] = body[offset : offset + value_length]
        offset += value_length
    return properties


def split_command(body: bytes) -> tuple[bytes, bytes]:
    """(name, data) of a command frame's body."""
    if not body or body[0] + 1 > len(body):
        raise ProtocolError("malformed command frame")
    return body[1 : 1 + body[0]], body[1 + body[0] :]


def message_buffers(frames: list[Buffer]) -> list[Buffer]:
    """Headers and bodies of a multipart message, ready for sendmsg (bodies are not copied)."""
    return _message_buffers(frames)[0]


def _message_buffers(frames: list[Buffer]) -> tuple[list[Buffer], int]:
    """message_buffers and their total size. On every request's path: a short frame's header (what
    frame_header makes) is built here, without the call."""
    buffers: list[Buffer] = []
    total = 0
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        size = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
        flags = 0 if index == last else MORE
        if size < 256:
            buffers.append(bytes((flags, size)))
            total += 2 + size
        else:
            buffers.append(frame_header(size, flags))
            total += 9 + size
        if size:
            buffers.append(frame)
    return buffers, total


@dataclass(frozen=True)
class Limits:
    """What one message may carry. `first_frame` bounds the first non-empty frame (a request header);
    `message_bytes` the sum of every frame; `frames` their count. A message over any of them is reported
    as Oversized and skipped."""

    frames: int = 257
    first_frame: int = 64 * 1024
    message_bytes: int = 64 * 1024 * 1024 + 64 * 1024
    skip_bytes: int = 1 << 30  # an oversized message skipped past this is a peer streaming without end: cut


@dataclass(frozen=True)
class Oversized:
    """A message that broke a Limit: its first frames (those that fit, so a request id can be read) and
    why. Its remaining bytes are skipped."""

    frames: list[bytes]
    reason: str
    limit: str  # "frames", "first_frame" or "message_bytes"
    size: int  # the frame's size ("first_frame"), the message's bytes so far with it ("message_bytes"), or frames


Event = Union[list[Buffer], Oversized]


class FrameStream:
    """A multipart-message stream over one non-blocking stream socket.

    `read()` takes what the kernel has and returns complete messages (lists of frames: bytes, or a
    memoryview (frame_buffer) for frames of BIG_FRAME bytes and more) and Oversized reports. `send()` writes at once
    what the socket takes and keeps the rest in an outbox that `flush()` continues when the socket is
    writable; `out_bytes` is what waits there. Commands (PING) are answered here; others are given to
    `on_command`. With `handshake` the stream first exchanges greetings and READY (NULL mechanism)."""

    __slots__ = (
        "sock", "limits", "out_bytes", "in_bytes", "_out", "_buf", "_pos", "_frames", "_msg_bytes", "_skip",
        "_big", "_big_filled", "_big_flags", "_skip_left", "_skip_flags", "skipped_bytes", "_state", "socket_type", "peer_socket_type",
        "peer_properties", "_accept_types", "messages_in", "bytes_in", "closed", "_held", "_command_tokens", "_command_at",
        "read_cut", "_parse_cut",
    )

    def __init__(
        self,
        sock: socket.socket,
        limits: Limits,
        *,
        handshake: bool = False,
        socket_type: bytes = b"ROUTER",
        accept_types: frozenset[bytes] = frozenset({b"DEALER", b"REQ"}),
    ) -> None:
        self.sock = sock
        self.limits = limits
        self.socket_type = socket_type
        self._accept_types = accept_types
        self.peer_socket_type = b""
        self.peer_properties: dict[bytes, bytes] = {}
        self._out: deque[memoryview] = deque()
        self.out_bytes = 0  # bytes queued for the peer, not yet taken by the kernel
        self.in_bytes = 0  # bytes held for messages not yet complete
        self._buf: bytes | bytearray = b""  # what arrived and is not parsed yet, from _pos: a chunk as it came, or a bytearray that grows
        self._pos = 0
        self._frames: list[Buffer] = []
        self._msg_bytes = 0
        self._skip = False  # discarding the rest of an oversized message
        self._skip_left = 0  # bytes of the current oversized frame still to drop
        self._skip_flags = 0
        self.skipped_bytes = 0  # of the oversized message being skipped
        self._big: memoryview | None = None  # a large frame being received straight into its buffer
        self._big_filled = 0
        self._big_flags = 0
        self._state = "greeting" if handshake else "open"
        self.messages_in = 0
        self.bytes_in = 0
        self.closed = False
        self.read_cut = False  # the last read stopped at a budget (bytes, messages, frames): more may be waiting
        self._parse_cut = False  # the last parse stopped at its frame budget: bytes that came are left to parse
        self._held: list[list[Buffer]] = []  # messages sent before the handshake ended, in order
        self._command_tokens = float(COMMAND_BURST)
        self._command_at = 0.0
        if handshake:
            self._send_greeting(greeting())

    def _send_greeting(self, data: bytes) -> None:
        """Our greeting, at once. A peer already gone (it connected and closed) is not an error of
        making the stream: the greeting stays queued and the first read or flush reports PeerClosed."""
        try:
            self.send_raw(data)
        except PeerClosed:
            pass

    @property
    def open(self) -> bool:
        """The handshake is over: messages flow."""
        return self._state == "open"

    # -- receiving ----------------------------------------------------------------------------------
    def read(self, max_bytes: int = 4 * 1024 * 1024, max_events: int = 1 << 62, chunk_bytes: int = _RECV_CHUNK, max_frames: int = 1 << 62) -> list[Event]:
        """Complete messages available now (may be empty); reading stops once `max_bytes` were read (of a
        large frame, BIG_READ_BYTES if more) or `max_events` messages are complete (a chunk's messages
        are all kept: a few more). Each recv takes at most `chunk_bytes` (all of a chunk is parsed at
        once: ~0.4 us a frame, so a chunk of empty frames costs ~0.2 us a byte) - unless `max_frames` were
        parsed: then the rest waits for the next read, which parses it before it takes more. `read_cut`
        says whether it stopped at one of these budgets, not where the kernel had no more. Raises
        PeerClosed or ProtocolError."""
        events: list[Event] = []
        got = 0
        recv = self.sock.recv
        self.read_cut = True  # unless a break below says the kernel had no more
        big_bytes = max(max_bytes, BIG_READ_BYTES)  # what this read may take of a large frame
        while got < max_bytes and len(events) < max_events:
            if self._parse_cut:  # what came before is parsed first, a budget of frames at a time
                self._parse(events, max_frames)
                if self._parse_cut:
                    break
                continue
            if self._big is not None:  # its bytes count too: uncounted, one read took 16 messages of 64 MiB
                filled = self._big_filled
                try:
                    complete = self._read_big(big_bytes - got)
                except PeerClosed:
                    if events:
                        break  # the messages before the close first (round 23: lost); the next read reports it
                    raise
                got += self._big_filled - filled
                if not complete:
                    self.read_cut = got >= big_bytes
                    break
                self._big_done(events)
                continue
            try:
                chunk = recv(chunk_bytes)
            except (BlockingIOError, InterruptedError):
                self.read_cut = False
                break
            except ConnectionError:
                if events:
                    break  # what arrived before the reset first; the next read reports the close
                raise PeerClosed() from None
            if not chunk:
                if events:
                    break  # the messages before the close first; the next read sees the end again
                raise PeerClosed()
            got += len(chunk)
            self.bytes_in += len(chunk)
            buf = self._buf
            if self._pos == len(buf):  # nothing held: parse the bytes as they came (a frame is one slice of them)
                self._buf = chunk
                self._pos = 0
            elif type(buf) is bytes:  # the rest of an earlier chunk: from now on in a buffer that grows
                self._buf = bytearray(memoryview(buf)[self._pos :]) + chunk
                self._pos = 0
            else:
                buf += chunk
            self._parse(events, max_frames)
            if self._parse_cut:
                break
            if len(chunk) < chunk_bytes and self._big is None:
                self.read_cut = False
                break  # the kernel had no more
        self.in_bytes = len(self._buf) - self._pos + self._msg_bytes + (len(self._big) if self._big is not None else 0)
        return events

    def _read_big(self, budget: int) -> bool:
        """Continue a large frame, `budget` bytes of it at most (a sender that keeps the socket full
        would otherwise be read for as long as its frame lasts, in one turn); True once complete."""
        big = self._big
        assert big is not None
        view = memoryview(big)  # (a slice of a bytearray would be a copy)
        stop = min(len(big), self._big_filled + max(budget, 1))
        while self._big_filled < stop:
            try:
                n = self.sock.recv_into(view[self._big_filled : stop])
            except (BlockingIOError, InterruptedError):
                return False
            except ConnectionError:
                raise PeerClosed() from None
            if n == 0:
                raise PeerClosed()
            self._big_filled += n
            self.bytes_in += n
        return self._big_filled == len(big)

    def _big_done(self, events: list[Event]) -> None:
        big = self._big
        assert big is not None
        self._big = None
        self._end_frame(self._big_flags, big, events)

    def _parse(self, events: list[Event], max_frames: int = 1 << 62) -> None:
        buf = self._buf
        pos = self._pos
        end = len(buf)
        self._parse_cut = False
        if self._skip_left:
            pos = self._skip_rest(pos, end)
        frames_left = max_frames
        while pos < end:
            if self._state != "open":  # greeting, then handshake commands, as far as they have arrived
                moved = self._handshake_step(buf, pos)
                if moved == pos:
                    break
                pos = moved
                continue
            if end - pos < 2:
                break
            if not frames_left:  # (round 54: 16 KiB of empty frames were 8,000 frames, ~3 ms, in one turn)
                self._parse_cut = True
                break
            frames_left -= 1
            flags = buf[pos]
            if flags & LONG:
                if end - pos < 9:
                    break
                (size,) = _LONG_SIZE.unpack_from(buf, pos + 1)
                start = pos + 9
            else:
                size = buf[pos + 1]
                start = pos + 2
            if flags & ~_KNOWN_FLAGS:
                raise ProtocolError(f"frame flags {flags:#x} have reserved bits set")
            if flags & COMMAND:
                if size > MAX_COMMAND_BYTES:
                    raise ProtocolError(f"command of {size} bytes")
                if end - start < size:
                    break
                self._on_command(bytes(buf[start : start + size]))
                pos = start + size
                continue
            limits = self.limits  # (what follows runs for every frame: the limits are looked at in line)
            if not self._skip and (size > limits.first_frame or len(self._frames) >= limits.frames or self._msg_bytes + size > limits.message_bytes) and self._over_limit(size, events):
                self._skip = True
            if self._skip:  # consume without storing
                take = min(size, end - start)
                pos = start + take
                self._skipped(take + SKIPPED_FRAME_COST)
                if take < size:
                    self._skip_left, self._skip_flags = size - take, flags
                    break
                if not flags & MORE:
                    self._skip = False
                continue
            if end - start >= size:  # a whole frame (_end_frame, in line)
                frames = self._frames
                frames.append(bytes(buf[start : start + size]))
                self._msg_bytes += size
                if not flags & MORE:
                    events.append(frames)
                    self.messages_in += 1
                    self._frames = []
                    self._msg_bytes = 0
                pos = start + size
                continue
            if size >= BIG_FRAME:  # receive the rest straight into its own buffer
                try:
                    big = frame_buffer(size)
                except MemoryError:  # what came before this frame stays parsed; the frame is read again next time
                    self._consumed(buf, pos)
                    raise
                have = end - start
                big[:have] = buf[start:end]
                self._big, self._big_filled, self._big_flags = big, have, flags
                pos = end
            break
        if pos >= end:  # (the usual end: all of it parsed)
            self._buf = b""
            self._pos = 0
        else:
            self._consumed(buf, pos)

    def _consumed(self, buf: bytes | bytearray, pos: int) -> None:
        """Parsing stopped at `pos`: drop what is behind it (at once when all of it, else in large steps)."""
        if pos >= len(buf):
            self._buf = b""
            self._pos = 0
        elif pos > 65536:  # what is held is what in_bytes counts: never a large chunk's parsed part
            if type(buf) is bytearray:
                del buf[:pos]
            else:
                self._buf = buf[pos:]
            self._pos = 0
        else:
            self._pos = pos

    def _skip_rest(self, pos: int, end: int) -> int:
        """Past what arrived of the rest of an oversized frame (dropped as it arrives); the new position."""
        if not self._skip_left:
            return pos
        take = min(self._skip_left, end - pos)
        self._skip_left -= take
        self._skipped(take)
        if not self._skip_left and not self._skip_flags & MORE:
            self._skip = False
        return pos + take

    def _skipped(self, count: int) -> None:
        """Bytes of an oversized message dropped: bounded, so that a peer streaming one endless message
        (every frame flagged MORE) is cut, not read forever."""
        self.skipped_bytes += count
        if self.skipped_bytes > self.limits.skip_bytes:
            raise ProtocolError(f"an oversized message went on past {self.limits.skip_bytes} bytes")

    def _over_limit(self, size: int, events: list[Event]) -> bool:
        """Check the frame about to be received against the limits; report an Oversized if it breaks one."""
        limits = self.limits
        frames = self._frames
        reason = limit = ""
        if len(frames) + 1 > limits.frames:
            reason, limit, seen = f"more than {limits.frames} frames in one message", "frames", len(frames) + 1
        elif size > limits.first_frame and not any(len(f) for f in frames):
            reason, limit, seen = f"first frame of {size} bytes; the limit is {limits.first_frame}", "first_frame", size
        elif self._msg_bytes + size > limits.message_bytes:
            seen = self._msg_bytes + size
            reason, limit = f"message of more than {limits.message_bytes} bytes (a frame of {size} bytes after {self._msg_bytes})", "message_bytes"
        if not reason:
            return False
        events.append(Oversized([bytes(f) for f in frames], reason, limit, seen))
        self.skipped_bytes = self._msg_bytes
        self._frames = []
        self._msg_bytes = 0
        return True

    def _end_frame(self, flags: int, body: Buffer, events: list[Event]) -> None:
        self._frames.append(body)
        self._msg_bytes += len(body)
        if not flags & MORE:
            events.append(self._frames)
            self.messages_in += 1
            self._frames = []
            self._msg_bytes = 0

    # -- handshake and commands ------------------------------------------------------------------------
    def _handshake_step(self, buf: bytes | bytearray, pos: int) -> int:
        end = len(buf)
        if self._state == "greeting":
            if end - pos >= 1 and buf[pos] != 0xFF:
                raise ProtocolError("not a ZMTP peer")
            if end - pos >= 11 and buf[pos + 10] < 3:
                raise ProtocolError(f"ZMTP major version {buf[pos + 10]} is not supported")
            if end - pos < GREETING_SIZE:
                return pos
            _, _, mechanism, as_server = parse_greeting(buf[pos : pos + GREETING_SIZE])
            self._greeted(mechanism, as_server)
            self._state = "handshake"
            return pos + GREETING_SIZE
        # "handshake": one of the peer's handshake commands
        if end - pos < 2:
            return pos
        flags = buf[pos]
        if not flags & COMMAND:
            raise ProtocolError("expected a handshake command")
        if flags & LONG:
            if end - pos < 9:
                return pos
            (size,) = _LONG_SIZE.unpack_from(buf, pos + 1)
            start = pos + 9
        else:
            size, start = buf[pos + 1], pos + 2
        if size > MAX_COMMAND_BYTES:
            raise ProtocolError(f"handshake command of {size} bytes")
        if end - start < size:
            return pos
        self._handshake_command(bytes(buf[start : start + size]))
        return start + size

    def _greeted(self, mechanism: bytes, as_server: bool) -> None:
        """The peer's greeting is in: NULL answers with its READY at once."""
        if mechanism != b"NULL":
            self.send_raw(command(b"ERROR", error_reason("only the NULL mechanism")))
            raise ProtocolError(f"mechanism {mechanism!r} is not supported here")
        self.send_raw(command(b"READY", encode_properties({b"Socket-Type": self.socket_type})))

    def _handshake_command(self, body: bytes) -> None:
        """NULL: the peer's READY ends the handshake."""
        name, data = split_command(body)
        if name != b"READY":
            raise ProtocolError(f"expected READY, got {name!r}")
        self._accept_peer(parse_properties(data))
        self._opened()

    def _opened(self) -> None:
        """The handshake is over: messages sent before it go out now, in order (a peer must not see a
        message before the handshake's commands, and libzmq queues them the same way)."""
        self._state = "open"
        held, self._held = self._held, []
        for frames in held:
            self.send(frames)

    def _accept_peer(self, properties: dict[bytes, bytes]) -> None:
        """The peer's handshake properties; an Identity in them is ignored: ids are ours."""
        self.peer_properties = properties
        peer_type = properties.get(b"socket-type", b"")
        if peer_type not in self._accept_types:
            self.send_raw(command(b"ERROR", error_reason(f"socket type {peer_type.decode(errors='replace')} cannot talk to {self.socket_type.decode()}")))
            raise ProtocolError(f"peer socket type {peer_type!r} not accepted")
        self.peer_socket_type = peer_type

    def _on_command(self, body: bytes) -> None:
        now = time.monotonic()
        self._command_tokens = min(float(COMMAND_BURST), self._command_tokens + (now - self._command_at) * COMMANDS_PER_S) - 1
        self._command_at = now
        if self._command_tokens < 0:
            raise ProtocolError(f"more than {COMMAND_BURST} commands at once, or {COMMANDS_PER_S} a second")
        name, data = split_command(body)
        if name == b"PING" and len(data) >= 2 and self.out_bytes < PONG_BACKLOG_BYTES:  # TTL (2 bytes), then a context echoed in PONG
            self._send_command(b"PONG", data[2:18])
        elif name == b"ERROR":
            raise PeerClosed()
        # PONG and anything else (SUBSCRIBE, CANCEL ...) carry nothing for us

    def _send_command(self, name: bytes, data: bytes) -> None:
        self.send_raw(command(name, data))

    def unfinished_header(self) -> Buffer | None:
        """The first frame of the message still arriving, when it is in (a request's header)."""
        return self._frames[0] if self._frames else None

    # -- sending --------------------------------------------------------------------------------------
    def send(self, frames: list[Buffer]) -> None:
        """Write one multipart message now, as far as the socket takes it; the rest waits in the outbox
        for flush(). The usual case (nothing waiting, the socket takes it all) is one sendmsg."""
        if self._state != "open":
            self._held.append(list(frames))
            return
        buffers, total = _message_buffers(frames)
        if self._out or self.closed or len(buffers) > _IOV_MAX:
            self._queue(buffers)
            return
        try:
            sent = self.sock.sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise PeerClosed() from None
            raise
        if sent == total:
            return
        rest: list[Buffer] = []
        for buffer in buffers:  # keep what the kernel did not take, in order
            view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            if sent >= view.nbytes:
                sent -= view.nbytes
                continue
            rest.append(view[sent:])
            sent = 0
        self._queue(rest)

    def hold(self, frames: list[Buffer]) -> None:
        """Queue one multipart message without writing it: a sender with several messages for this
        peer holds them all, then one flush() writes them with one sendmsg instead of one each."""
        if self._state != "open":
            self._held.append(list(frames))
            return
        self._queue(message_buffers(frames), write=False)

    def send_raw(self, data: bytes) -> None:
        self._queue([data])

    def _queue(self, buffers: Iterable[Buffer], write: bool = True) -> None:
        out = self._out
        for buffer in buffers:
            view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            out.append(view)
            self.out_bytes += view.nbytes
        if write:
            self.flush()

    def flush(self) -> bool:
        """Write queued bytes until done or the socket is full; True when nothing is left."""
        out = self._out
        sendmsg = self.sock.sendmsg
        while out:
            batch = list(islice(out, _IOV_MAX)) if len(out) > _IOV_MAX else out  # (not a copy of the whole outbox each time)
            try:
                sent = sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise PeerClosed() from None
                raise
            self.out_bytes -= sent
            while sent:
                head = out[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    out.popleft()
                else:
                    out[0] = head[sent:]
                    sent = 0
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._out.clear()
            self.out_bytes = 0
            self._buf = b""
            self._frames = []
            self._big = None
            self.sock.close()


def error_reason(text: str) -> bytes:
    """An ERROR command's body after its name: the reason, cut to the 255 bytes its length octet allows."""
    raw = text.encode()[:255]
    return bytes((len(raw),)) + raw


Owner = TypeVar("Owner")


class HeldWrites(Generic[Owner]):
    """Messages queued without a write (FrameStream.hold) while a block runs, then written once per
    stream when it ends: many replies to one peer cost one sendmsg. `owners` are what a caller sends
    to (a connection object holding `stream`); `write(owner)` flushes one and handles what follows."""

    def __init__(self, stream_of: Callable[[Owner], FrameStream], write: Callable[[Owner], None]) -> None:
        self._stream_of = stream_of
        self._write = write
        self._held: dict[int, Owner] | None = None

    @contextmanager
    def block(self) -> Iterator[None]:
        if self._held is not None:  # already holding: the outer block writes
            yield
            return
        held: dict[int, Owner] = {}
        self._held = held
        try:
            yield
        finally:
            self._held = None
            for owner in held.values():
                self._write(owner)

    def hold(self, owner: Owner, frames: list[Buffer]) -> bool:
        """Queue `frames` for `owner` if a block is running (True); False: the caller sends now."""
        held = self._held
        if held is None:
            return False
        self._stream_of(owner).hold(frames)
        held[id(owner)] = owner
        return True
