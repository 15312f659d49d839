"""What one FrameStream.read() takes: a peer that keeps sending must not hold the loop that reads it (a
worker's, or the front door's) - nor make it hold every message it sent - for as long as it keeps up; and
a peer that closes gives its complete messages first."""
from __future__ import annotations

import os
import socket

import pytest

from openinfer.wire.zmtp import FrameStream, Limits, PeerClosed, frame_header

pytestmark = pytest.mark.unit

SO_SNDBUFFORCE = 32  # (Linux; not in Python's socket module) past net.core.wmem_max, with CAP_NET_ADMIN


@pytest.mark.skipif(os.geteuid() != 0, reason="queues 16 MiB on a socket: SO_SNDBUFFORCE needs root")
def test_one_read_takes_at_most_one_large_message_past_its_budget() -> None:
    """Round 17's suspicion, measured: bytes received straight into a large frame's own buffer did not
    count toward a read's budget - only the 256 KiB chunk each message began in did - so one read of a
    1 MiB budget took three 2 MiB messages, and one of the default 4 MiB budget would take sixteen
    requests of 64 MiB, a GiB held before any was admitted against the worker's memory budgets. Now a
    read ends with the message that crosses its budget."""
    ours, theirs = socket.socketpair()
    try:
        theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)  # the eight queued before the read
        size = 2 << 20
        theirs.sendall((frame_header(size, 0) + bytes(size)) * 8)
        ours.setblocking(False)
        stream = FrameStream(ours, Limits(first_frame=1 << 30, message_bytes=1 << 30))
        first = stream.read(max_bytes=1 << 20)
        assert len(first) == 1, f"one read of a 1 MiB budget took {len(first)} messages of 2 MiB"
        taken = len(first)
        while taken < 8:
            taken += len(stream.read(max_bytes=1 << 20))
        assert all(len(frames[0]) == size for frames in first)
    finally:
        ours.close()
        theirs.close()


def test_messages_complete_before_a_close_inside_a_large_frame_are_read_first() -> None:
    """Round 23's attacker: a complete message, then the first 1,000 bytes of a 1 MiB frame, then the
    close - read() raised PeerClosed and the complete message was lost (a small frame cut off the same
    way gave it first). On a client's link to a worker that was a reply, or a GOAWAY, lost to a close."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(frame_header(5, 0) + b"hello" + frame_header(1 << 20, 0) + bytes(1000))
        theirs.close()
        ours.setblocking(False)
        stream = FrameStream(ours, Limits(first_frame=1 << 30, message_bytes=1 << 30))
        assert [bytes(frames[0]) for frames in stream.read()] == [b"hello"]
        with pytest.raises(PeerClosed):
            stream.read()
    finally:
        ours.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="queues 2 MiB on a socket: SO_SNDBUFFORCE needs root")
def test_a_read_of_many_small_messages_stops_near_its_message_budget() -> None:
    """Round 52: 4 MiB of pipelined 17-byte requests came out of one read as 240,000 messages - ~35 MB of
    Python objects held for one connection, counted by the front door's memory rule as 4 MiB. The front door
    reads at most MAX_EVENTS_PER_READ at a time now (one 256 KiB chunk's messages past it at most)."""
    ours, theirs = socket.socketpair()
    try:
        message = frame_header(17, 0) + bytes(17)
        theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
        burst = message * ((2 << 20) // len(message))
        theirs.sendall(burst)
        sent = len(burst)
        ours.setblocking(False)
        stream = FrameStream(ours, Limits(first_frame=1 << 30, message_bytes=1 << 30))
        first = stream.read(max_events=1024)
        assert 1024 <= len(first) <= 1024 + (256 << 10) // len(message), len(first)
        assert len(first) < sent // len(message), "the budget did not stop the read"
    finally:
        ours.close()
        theirs.close()
