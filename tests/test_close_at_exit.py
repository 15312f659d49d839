"""What the daemon does to its clients' sockets as it exits (daemon/frontdoor/connections.py close_all), on
a real loopback tcp:// connection."""
from __future__ import annotations

import socket

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
        _discard_unread(daemon_side)
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
