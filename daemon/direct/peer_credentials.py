"""Who is on the other end of a Unix socket, as the kernel recorded it when the peer connected: pid, uid
and gid (SO_PEERCRED) and the supplementary groups (SO_PEERGROUPS). Read by the front door at accept (the
access policy's selectors) and by a worker when a lease bound to groups is attached (lease.py)."""
from __future__ import annotations

import errno
import socket
import struct

from openinfer.sandbox.libc import getsockopt

_PEERCRED = struct.Struct("3i")
SO_PEERGROUPS = 59  # <asm-generic/socket.h>, Linux 4.13; Python 3.11 does not name it
NGROUPS_MAX = 65536


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) the kernel recorded for the peer of a Unix socket when it connected."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The supplementary groups the kernel recorded for the peer of a Unix socket when it connected, sorted."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # 256 groups: Python's own bound
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            raise
        raw = getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, 4 * NGROUPS_MAX)
    return tuple(sorted(set(struct.unpack(f"={len(raw) // 4}I", raw))))


def peer_gids(sock: socket.socket) -> frozenset[int]:
    """Every group the peer held when it connected: its primary one and its supplementary ones."""
    return frozenset(peer_groups(sock)) | {peer_credentials(sock)[2]}
