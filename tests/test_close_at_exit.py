"""What the daemon does to its clients' sockets as it exits (daemon/frontdoor/connections.py close_all), on
a real loopback tcp:// connection."""
from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time

import pytest

from openinfer.daemon.frontdoor.connections import _discard_unread

pytestmark = pytest.mark.unit

REPLIES = 4 << 20


def test_replies_in_the_kernel_reach_a_client_whose_last_request_was_never_read() -> None:
    """Round 61: over tcp://, a drain's end closed a socket with a request still unread in it (the daemon had
    stopped reading a client whose replies backed up); Linux answers such a close with a reset, and the
    replies still in the kernel's send queue were thrown away (19 of 30 read 3 s into the drain's end).
    Unread input is dropped before the close now: the client gets a FIN after every byte."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    daemon_side, _ = listener.accept()
    listener.close()
    try:
        client.sendall(b"a request never read")
        daemon_side.setblocking(False)
        sent = 0
        try:
            while sent < REPLIES:  # what the kernel takes of the replies; the client reads nothing yet
                sent += daemon_side.send(bytes(min(1 << 16, REPLIES - sent)))
        except BlockingIOError:
            pass
        _discard_unread(daemon_side, time.monotonic_ns() + 10**10)
        daemon_side.close()
        got = 0
        client.settimeout(10)
        while True:
            chunk = client.recv(1 << 20)  # ConnectionResetError before the fix
            if not chunk:
                break
            got += len(chunk)
        assert got == sent > 0
    finally:
        client.close()
        daemon_side.close()


class _PeerKeepsSending(socket.socket):
    """The daemon's side of a connection whose peer sends again whatever is read: its input never runs
    dry, as a peer writing at full speed would keep it. The peer is this same thread, so what has arrived
    when `_discard_unread` starts is known exactly."""

    read = 0
    peer: socket.socket

    def recv(self, size: int, flags: int = 0) -> bytes:
        got = super().recv(size, flags)
        self.read += len(got)
        try:
            self.peer.send(bytes(len(got)))
        except BlockingIOError:
            pass
        return got


def test_a_peer_that_keeps_sending_is_not_read_for_ever_at_exit() -> None:
    """Round 62: at exit each connection's unread input was read until 64 MiB or a pause; 40 connections
    sending at full speed held the daemon's exit 6.8 s (2.7 GiB read after SIGTERM). What has arrived when
    the drop starts is dropped, not what goes on arriving; all connections together get half a second.
    (The peer was another process once, and what it wrote between the test's count and the drop's made
    the bound fail one CI run in many: now the peer writes only when the drop reads.)"""
    ours, theirs = socket.socketpair()
    daemon_side = _PeerKeepsSending(fileno=ours.detach())
    try:
        daemon_side.peer = theirs
        theirs.setblocking(False)
        try:
            while True:
                theirs.send(bytes(1 << 16))
        except BlockingIOError:
            pass
        queued = struct.unpack("i", fcntl.ioctl(daemon_side.fileno(), termios.FIONREAD, bytes(4)))[0]  # bytes that have arrived
        daemon_side.setblocking(False)
        _discard_unread(daemon_side, time.monotonic_ns() + 10**10)
        assert daemon_side.read == queued > 0, (daemon_side.read, queued)  # before: 64 MiB
    finally:
        theirs.close()
        daemon_side.close()
