"""Socket options every client sets, in one place so the sync and async clients cannot drift."""
from __future__ import annotations

import zmq


def configure_client_socket(
    socket: zmq.Socket,  # type: ignore[type-arg]
    *,
    max_reply_bytes: int,
    curve_server_key: bytes | None = None,
    curve_keypair: tuple[bytes, bytes] | None = None,
) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.setsockopt(zmq.SNDHWM, 1000)
    socket.setsockopt(zmq.RCVHWM, 1000)
    # libzmq reads a frame's length before its bytes: over this, it closes the connection instead of
    # taking the frame into memory. Without it a fake daemon's reply of 1 GiB took the CLI to 4.1 GiB.
    socket.setsockopt(zmq.MAXMSGSIZE, max_reply_bytes)
    if curve_server_key is not None:
        if curve_keypair is None:
            public, secret = zmq.curve_keypair()
        else:
            public, secret = curve_keypair
        socket.curve_serverkey = curve_server_key
        socket.curve_publickey = public
        socket.curve_secretkey = secret
