"""ZMTP with a security mechanism that seals every frame (CurveZMQ, rfc.zeromq.org spec 26 as ZMTP's CURVE
mechanism): `SealedFrameStream`, a FrameStream (openinfer.wire.zmtp) that hands the handshake's commands to a
`Mechanism` and, after the handshake, has it open each arriving frame and seal each leaving one, while the
stream keeps what it does for plain frames: the framing, the limits, the assembly, the outbox. The one
mechanism is CurveZMQ's server side, openinfer.daemon.frontdoor.curve.CurveServer.
"""
from __future__ import annotations

import socket
import struct
from typing import Protocol

from .zmtp import (
    BIG_FRAME,
    COMMAND,
    LONG,
    MAX_COMMAND_BYTES,
    MORE,
    Buffer,
    Event,
    FrameStream,
    Limits,
    SKIPPED_FRAME_COST,
    ProtocolError,
    command,
    encode_properties,
    error_reason,
    frame_buffer,
    frame_header,
    greeting,
)

_LONG_SIZE = struct.Struct(">Q")


class Refused(ProtocolError):
    """A mechanism refuses the peer during the handshake: `reason` (at most 255 bytes of ASCII) is sent to
    it in an ERROR command, then the connection is closed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused: {reason}")
        self.reason = reason


class Mechanism(Protocol):
    """A ZMTP security mechanism other than NULL, as SealedFrameStream drives it: the stream parses the
    greeting and the handshake's command frames and hands their bodies here; once the handshake is done,
    every frame travels sealed in a command of the mechanism's (`overhead` bytes more than the frame),
    itself carried as a single message frame, that `unseal` opens and `seal` makes. Every method raises
    ProtocolError on anything malformed."""

    name: bytes  # in the greeting; the peer's must be the same
    as_server: bool  # our greeting's as-server bit; the peer's must be the other one
    overhead: int  # bytes a sealed frame's command body adds to the frame

    def handshake(self, body: bytes, metadata: bytes) -> tuple[list[bytes], dict[bytes, bytes] | None]:
        """One handshake command's body (name included) -> the command bodies to send back, and the peer's
        properties once the handshake is complete (None before). `metadata` is ours, encoded, for the
        mechanism to send. Raises Refused to send the peer an ERROR."""
        ...

    def seal(self, frames: list[Buffer]) -> list[Buffer]:
        """A message's frames -> the buffers (frame headers included) that carry it."""
        ...

    def seal_command(self, body: bytes) -> list[Buffer]:
        """A command's body (name included) -> the buffers that carry it sealed."""
        ...

    def unseal(self, body: Buffer) -> tuple[int, Buffer]:
        """A sealed frame's command body -> (flags: MORE and/or COMMAND, the frame)."""
        ...

    def skip(self, head: Buffer) -> int:
        """The first `overhead` bytes of a sealed frame that will be skipped unopened -> its MORE flag
        (0 or MORE), which is all the stream needs to skip to the end of the frame's message."""
        ...


class SealedFrameStream(FrameStream):
    """A FrameStream whose handshake and frames belong to a security `Mechanism` (CurveZMQ): after the
    handshake every frame arrives sealed in a command of the mechanism's (libzmq, and so every client,
    sends it as a single final message frame, and expects ours the same way), whose size tells the
    frame's size before any of it is buffered, so the limits are checked exactly as for plain frames.
    Anything else after the handshake (a frame in clear, a command frame) closes the connection.

    A frame over a limit is reported and skipped unopened, up to the end of its message, as a plain one
    is: whether more frames follow is sealed inside each frame, so the mechanism reads that one flag from
    a skipped frame's first bytes without opening its box (holding the frame to authenticate it is what
    the limit forbids). Skipped frames are never delivered; a tampered flag can only move where the
    skipping ends, which deleting a MESSAGE in transit (CurveZMQ only requires growing nonces) already
    allows."""

    __slots__ = ("mechanism",)

    def __init__(
        self,
        sock: socket.socket,
        limits: Limits,
        mechanism: Mechanism,
        *,
        socket_type: bytes = b"ROUTER",
        accept_types: frozenset[bytes] = frozenset({b"DEALER", b"REQ"}),
    ) -> None:
        super().__init__(sock, limits, socket_type=socket_type, accept_types=accept_types)
        self.mechanism = mechanism
        self._state = "greeting"
        self._send_greeting(greeting(mechanism.name, as_server=mechanism.as_server))

    def _greeted(self, mechanism: bytes, as_server: bool) -> None:
        ours = self.mechanism
        if mechanism != ours.name:
            self.send_raw(command(b"ERROR", error_reason(f"this endpoint requires the {ours.name.decode()} mechanism")))
            raise ProtocolError(f"mechanism {mechanism!r}; this endpoint requires {ours.name!r}")
        if as_server == ours.as_server:
            raise ProtocolError("the peer's greeting claims our role (as-server)")

    def _handshake_command(self, body: bytes) -> None:
        try:
            replies, properties = self.mechanism.handshake(body, encode_properties({b"Socket-Type": self.socket_type}))
        except Refused as exc:
            self.send_raw(command(b"ERROR", error_reason(exc.reason)))
            raise
        if properties is not None:
            self._accept_peer(properties)
        for reply in replies:
            self.send_raw(frame_header(len(reply), COMMAND) + reply)
        if properties is not None:
            self._opened()

    def _send_command(self, name: bytes, data: bytes) -> None:
        self._queue(self.mechanism.seal_command(bytes((len(name),)) + name + data))

    def send(self, frames: list[Buffer]) -> None:
        if self._state != "open":
            self._held.append(list(frames))
            return
        self._queue(self.mechanism.seal(frames))

    def hold(self, frames: list[Buffer]) -> None:
        if self._state != "open":
            self._held.append(list(frames))
            return
        self._queue(self.mechanism.seal(frames), write=False)

    def _parse(self, events: list[Event], max_frames: int = 1 << 62) -> None:
        buf = self._buf
        pos = self._pos
        end = len(buf)
        overhead = self.mechanism.overhead
        self._parse_cut = False
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
            if not frames_left:  # the rest in the next read (FrameStream.read)
                self._parse_cut = True
                break
            frames_left -= 1
            flags = buf[pos]
            if flags & ~LONG:  # sealed frames travel as single, final message frames (as libzmq sends them)
                raise ProtocolError(f"frame flags {flags:#x} after the {self.mechanism.name.decode()} handshake: only sealed frames may follow it")
            if flags & LONG:
                if end - pos < 9:
                    break
                (size,) = _LONG_SIZE.unpack_from(buf, pos + 1)
                start = pos + 9
            else:
                size = buf[pos + 1]
                start = pos + 2
            if size < overhead:
                raise ProtocolError(f"a frame of {size} bytes cannot hold a sealed one")
            if end - start < overhead:
                break  # every decision below needs the sealed frame's head
            if self._skip or self._over_limit(size - overhead, events):  # decided on the size alone
                self._skip = True
                more = self.mechanism.skip(bytes(buf[start : start + overhead]))
                take = min(size, end - start)
                pos = start + take
                self._skipped(take + SKIPPED_FRAME_COST)
                if take < size:
                    self._skip_left, self._skip_flags = size - take, more
                    break
                if not more:
                    self._skip = False
                continue
            if end - start >= size:
                self._unsealed(bytes(buf[start : start + size]), events)
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
                self._big, self._big_filled, self._big_flags = big, have, 0
                pos = end
            break
        self._consumed(buf, pos)

    def _big_done(self, events: list[Event]) -> None:
        big = self._big
        assert big is not None
        self._big = None
        self._unsealed(big, events)

    def _unsealed(self, body: Buffer, events: list[Event]) -> None:
        flags, frame = self.mechanism.unseal(body)
        if flags & COMMAND:
            if len(frame) > MAX_COMMAND_BYTES:
                raise ProtocolError(f"sealed command of {len(frame)} bytes")
            self._on_command(bytes(frame))
        else:
            self._end_frame(flags, frame, events)
