"""A worker's endpoint (daemon/worker/direct.py) in process, on a socketpair and a clock of the test's own:
what its housekeeping closes, at exactly which moment."""
from __future__ import annotations

import select
import socket
from pathlib import Path
from typing import Iterator

import pytest

from openinfer.daemon.worker.direct import UNREAD_NS, DirectConnection, DirectDoor, DirectLimits
from openinfer.wire.zmtp import FrameStream, Limits

pytestmark = pytest.mark.unit

S = 1_000_000_000


@pytest.fixture
def door(tmp_path: Path) -> Iterator[DirectDoor]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "worker.sock"))
    listener.listen()
    listener.setblocking(False)
    poller = select.epoll()
    yield DirectDoor(listener, poller, DirectLimits(), "tiny", 1, 1, on_request=lambda *a: None, on_cancel=lambda *a: False, on_outcome=lambda *a: None)
    poller.close()
    listener.close()


def test_an_ended_connection_keeps_its_unread_replies_until_they_are_written(door: DirectDoor) -> None:
    """Round 59: a client half-closed its connection with ten answered replies still waiting to be written
    (it read them 0.3 s later) and lost all ten: housekeeping closed an ended connection once its replies
    had not moved for UNREAD_NS. It goes once they are written; one whose peer never reads them is closed
    by the rules every connection is (its lease gone 20 s, the budgets, room for another identity)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        conn = DirectConnection(1, FrameStream(ours, Limits()), 0, "uid=0", accepted_ns=0)
        door.by_fd[ours.fileno()] = conn
        door.per_identity["uid=0"] = 1
        door.poller.register(ours.fileno(), 0)
        conn.stream.send([bytes(4 << 20)])  # a reply larger than the socket takes: most of it waits
        assert conn.stream.out_bytes
        conn.out_moved_ns = 0
        conn.ended = True  # its peer shut its sending side; nothing of its is still open
        door.housekeeping(UNREAD_NS + S)
        assert not conn.closed, "closed with its reply unwritten"
        theirs.setblocking(False)
        while conn.stream.out_bytes:  # the peer reads at last: the reply is written, then the connection goes
            try:
                while theirs.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
            door.on_event(ours.fileno(), 0x004)  # EPOLLOUT
        door.housekeeping(UNREAD_NS + 2 * S)
        assert conn.closed
    finally:
        theirs.close()
        if not conn.closed:
            ours.close()
