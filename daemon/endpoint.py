"""Binding the public ROUTER safely: the directory, the lock that stops a second daemon from stealing
the socket (libzmq's bind() silently unlinks an existing ipc path), permissions, cleanup."""
from __future__ import annotations

import fcntl
import grp
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq

from .modelconfig import ConfigError

log = logging.getLogger("openinfer.supervisor")


class EndpointBusy(RuntimeError):
    """Another daemon holds the lock beside this socket."""


@dataclass
class BoundEndpoint:
    address: str
    socket_path: Path | None  # for ipc://
    lock_fd: int | None

    def cleanup(self) -> None:
        if self.socket_path is not None:
            for path in (self.socket_path, lock_path(self.socket_path)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def lock_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".lock")


def ipc_path(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None


def bind_ipc(socket: zmq.Socket, address: str, *, mode: int, group: str = "") -> BoundEndpoint:  # type: ignore[type-arg]
    path = ipc_path(address)
    assert path is not None
    if len(str(path)) > 107:
        raise ConfigError(f"ipc path {path} is longer than the 107 bytes a Unix socket address holds")
    if not path.parent.exists():
        path.parent.mkdir(mode=0o750, parents=True)
    lock_fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise EndpointBusy(f"another openinfer daemon is serving at {address} (lock {lock_path(path)} is held)") from None
    # Umask-proof: libzmq creates the socket with the process umask; bind with a strict one, then widen.
    old_umask = os.umask(0o177)
    try:
        socket.bind(address)
    finally:
        os.umask(old_umask)
    # Never through a symlink: in a directory others may write to, the socket could be swapped for one.
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid, follow_symlinks=False)
    os.chmod(path, mode, follow_symlinks=False)
    return BoundEndpoint(address=address, socket_path=path, lock_fd=lock_fd)


def read_key(path: str) -> bytes:
    try:
        key = Path(path).read_text().strip().encode()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if len(key) != 40:
        raise ConfigError(f"{path}: expected a 40-character Z85 CURVE key")
    return key


def bind_public(socket: zmq.Socket, address: str, *, mode: int, group: str, insecure_tcp: bool, curve_secret_key_file: str = "") -> BoundEndpoint:  # type: ignore[type-arg]
    if address.startswith("ipc://"):
        return bind_ipc(socket, address, mode=mode, group=group)
    if address.startswith("tcp://") and curve_secret_key_file:
        # CurveZMQ: encrypted, and every client key is checked by the ZAP handler against the access policy.
        socket.curve_secretkey = read_key(curve_secret_key_file)
        socket.curve_publickey = read_key(curve_secret_key_file + ".pub")
        socket.curve_server = True
        socket.bind(address)
        return BoundEndpoint(address=socket.getsockopt_string(zmq.LAST_ENDPOINT), socket_path=None, lock_fd=None)
    if address.startswith("tcp://"):
        if not insecure_tcp:
            raise ConfigError(
                f"refusing to serve {address} without authentication: tcp:// needs CURVE keys, "
                "or --insecure-tcp to accept anyone who can reach the port"
            )
        log.warning("SERVING PLAIN TCP WITHOUT AUTHENTICATION OR ENCRYPTION", extra={"address": address})
        socket.bind(address)
        return BoundEndpoint(address=socket.getsockopt_string(zmq.LAST_ENDPOINT), socket_path=None, lock_fd=None)
    raise ConfigError(f"unsupported address {address!r}: use ipc://PATH or tcp://HOST:PORT")
