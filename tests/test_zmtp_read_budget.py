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
def test_one_read_takes_at_most_its_budget_of_a_large_message() -> None:
    """Round 17's suspicion, measured: bytes received straight into a large frame's own buffer did not
    count toward a read's budget - only the 256 KiB chunk each message began in did - so one read of a
    1 MiB budget took three 2 MiB messages, and one of the default 4 MiB budget would take sixteen
    requests of 64 MiB, a GiB held before any was admitted against the worker's memory budgets. Then a
    read ended with the message that crossed its budget: a sender that kept the socket full was read for
    as long as its 64 MiB frame lasted, in one turn of the front door (round 56). Now a read stops at its
    budget, inside a frame too, and says so (`read_cut`); the next one goes on where it stopped."""
    ours, theirs = socket.socketpair()
    try:
        theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)  # the eight queued before the read
        size = 2 << 20
        theirs.sendall((frame_header(size, 0) + bytes(size)) * 8)
        ours.setblocking(False)
        stream = FrameStream(ours, Limits(first_frame=1 << 30, message_bytes=1 << 30))
        messages: list[int] = []
        reads = 0
        while len(messages) < 8:
            before = stream.bytes_in
            taken = stream.read(max_bytes=1 << 20)
            reads += 1
            assert stream.bytes_in - before <= 1 << 20, f"one read of a 1 MiB budget took {stream.bytes_in - before} bytes"
            messages += [len(frames[0]) for frames in taken]
            assert len(taken) <= 1 and stream.read_cut == (len(messages) < 8), (len(taken), stream.read_cut)  # cut until all was read
        assert messages == [size] * 8 and reads >= 16
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


def test_a_read_parses_at_most_its_budget_of_frames_and_the_next_goes_on_where_it_stopped() -> None:
    """Round 54's residual: a read's 16 KiB chunk of empty frames was parsed at once, ~8,000 frames (~3 ms)
    in one turn of the front door, and an upload beside such a flood got one socket buffer a pass. A read
    parses at most `max_frames` now and says it was cut; the next parses the rest before it takes more
    from the kernel, and every message comes out whole, in order."""
    ours, theirs = socket.socketpair()
    try:
        messages = 24
        burst = b"".join(frame_header(8, 1) + i.to_bytes(8, "little") + (frame_header(0, 1) * 255) + frame_header(0, 0) for i in range(messages))
        theirs.sendall(burst)  # 24 requests of 257 frames: 6,168 frames, 13 KiB
        ours.setblocking(False)
        stream = FrameStream(ours, Limits(first_frame=1 << 30, message_bytes=1 << 30))
        seen: list[int] = []
        reads = 0
        while len(seen) < messages:
            taken = stream.read(max_bytes=16 << 10, chunk_bytes=16 << 10, max_frames=1024)
            reads += 1
            assert len(taken) <= 1024 // 257 + 1, f"one read parsed {len(taken)} messages of 257 frames"
            for frames in taken:
                assert len(frames) == 257 and all(len(frame) == 0 for frame in frames[1:])
                seen.append(int.from_bytes(frames[0], "little"))
            assert stream.read_cut == (len(seen) < messages), (reads, len(seen), stream.read_cut)
        assert seen == list(range(messages)) and reads >= 6
        assert stream.bytes_in == len(burst)  # one recv took it all: the rest was parsed from what was held
    finally:
        ours.close()
        theirs.close()
