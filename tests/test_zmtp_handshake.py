"""The daemon's own ZMTP engine (openinfer.wire.zmtp), NULL handshake, over a socketpair."""
from __future__ import annotations

import socket
from typing import Iterator

import pytest

from openinfer.wire.zmtp import COMMAND, FrameStream, Limits, ProtocolError, encode_properties, frame_header, greeting

pytestmark = pytest.mark.unit

READY = b"\x05READY" + encode_properties({b"Socket-Type": b"DEALER"})


@pytest.fixture
def pair() -> Iterator[tuple[FrameStream, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    stream = FrameStream(ours, Limits(), handshake=True)
    yield stream, theirs
    stream.close()
    theirs.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed"
        data += chunk
    return data


def test_a_ready_in_the_greetings_segment_completes_the_handshake(pair: tuple[FrameStream, socket.socket]) -> None:
    """A peer's greeting and READY in one read: the READY is taken then, not left in the buffer until
    more bytes come (a mechanism whose next command waits for ours, CURVE's WELCOME, would never get it)."""
    stream, peer = pair
    peer.sendall(greeting() + frame_header(len(READY), COMMAND) + READY + frame_header(2, 0) + b"hi")
    assert stream.read() == [[b"hi"]]
    assert stream.open and stream.peer_socket_type == b"DEALER"


def test_another_mechanism_gets_a_well_formed_error(pair: tuple[FrameStream, socket.socket]) -> None:
    stream, peer = pair
    peer.sendall(greeting(b"CURVE"))
    with pytest.raises(ProtocolError, match="CURVE"):
        stream.read()
    assert recv_exactly(peer, 64)[12:16] == b"NULL"
    flags, size = recv_exactly(peer, 2)
    body = recv_exactly(peer, size)
    assert flags == COMMAND and body[:6] == b"\x05ERROR"
    assert body[6] == len(body) - 7 and body[7:] == b"only the NULL mechanism"  # its length octet says what follows
