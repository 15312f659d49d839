"""Binding the public socket safely and accepting connections within the caps.

ipc://: the socket's directory is created private or checked (no one else may swap the socket file), an
exclusive flock on PATH.lock stops a second daemon from taking the path over, the socket file is created
under a strict umask and then given `server.socket_mode`/`socket_group`. tcp://: a plain listening socket
(CURVE or, with --insecure-tcp, NULL is spoken on its connections). Connections are accepted only while
the daemon is below its caps: the rest wait in the kernel's backlog, where they cost the daemon nothing.
"""
from __future__ import annotations

import fcntl
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from openinfer.daemon.modelstore.modelconfig import ConfigError

if TYPE_CHECKING:
    from .curve import ServerKeys

log = logging.getLogger("openinfer.supervisor")

BACKLOG = 128  # ipc://: local peers, each held by its uid's caps once accepted
MAX_TCP_BACKLOG = 4096


def tcp_backlog() -> int:
    """A tcp:// listen backlog as deep as the kernel allows (net.core.somaxconn, at most 4,096): with 128,
    one host's flood of connects (no key, no bytes) filled it between two passes of the loop and other
    hosts' SYNs were dropped - their clients waited for the retransmit, 1 s, then 3 (round 67)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as limit:
            return max(BACKLOG, min(MAX_TCP_BACKLOG, int(limit.read())))
    except (OSError, ValueError):
        return BACKLOG


class EndpointBusy(RuntimeError):
    """Another daemon holds the lock beside this socket."""


@dataclass
class BoundListener:
    address: str  # as clients should use it (a tcp port 0 resolved)
    sock: socket.socket
    socket_path: Path | None  # ipc:// only
    lock_fd: int | None
    curve: ServerKeys | None = None  # tcp:// with CURVE: the server's key pair; every connection speaks it

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None

    def clients_gid(self, socket_mode: int) -> int | None:
        """The group the socket lets connect (its file's group, when `socket_mode` gives the group access),
        else None: a secret that group may read is every client's (secret_file.secret_file_problem)."""
        if self.socket_path is None or not socket_mode & 0o060:
            return None
        return os.stat(self.socket_path).st_gid

    def cleanup(self) -> None:
        self.sock.close()
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


def check_private_dir(path: Path, what: str) -> None:
    """A directory whose entries only root or we can replace. Raises ConfigError naming what is wrong:
    anyone else who can create entries there could swap our socket for theirs."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{what} {path} is a symbolic link; refusing to use it (point the setting at the real directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, not by root or this daemon (uid {os.geteuid()}): another user could replace the socket in it; remove it or choose another path")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): anyone in it could replace the socket; chmod go-w it")


def not_ours(path: Path, st: os.stat_result, kind: Callable[[int], bool] = stat.S_ISREG) -> str | None:
    """Why an entry the daemon is about to take over beside its socket is not one it may (another user's,
    or not of the `kind` the daemon makes there), else None. In a shared (sticky) socket directory anyone can
    take these names first (attacker round 28: a directory at PATH.d, a lock of another user's held at
    PATH.lock kept the daemon from starting, with "Is a directory" or "another daemon is serving")."""
    if st.st_uid not in (0, os.geteuid()):
        owner = f"uid {st.st_uid}"
    elif not kind(st.st_mode):
        owner = None
    else:
        return None
    found = f"is owned by {owner}, not by root or this daemon (uid {os.geteuid()})" if owner else f"is not what the daemon puts there (mode {st.st_mode:o})"
    return f"{path} {found}: in a directory others may write to (sticky), anyone can take the names the daemon needs (PATH, PATH.lock, PATH.d) before it starts. Remove it, or serve from a directory only root or the daemon can write to (e.g. /run/openinfer)"


def bind_unix(address: str, *, mode: int, group: str) -> BoundListener:
    path = ipc_path(address)
    assert path is not None
    if len(os.fsencode(str(path))) > 107:
        raise ConfigError(f"ipc path {path} is longer than the 107 bytes a Unix socket address holds")
    if not path.parent.exists():
        path.parent.mkdir(mode=0o750, parents=True)
    check_private_dir(path.parent, "socket directory")
    try:  # (a directory or a symlink of another uid's there would fail the open below, unexplained)
        squatted = not_ours(lock_path(path), os.lstat(lock_path(path)))
    except FileNotFoundError:
        squatted = None
    if squatted is not None:
        raise ConfigError(squatted)
    lock_fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    squatted = not_ours(lock_path(path), os.fstat(lock_fd))
    if squatted is not None:  # before its lock means anything: another user's lock is no daemon's
        os.close(lock_fd)
        raise ConfigError(squatted)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise EndpointBusy(f"another openinfer daemon is serving at {address} (lock {lock_path(path)} is held)") from None
    # We hold the lock: a socket of ours at the path was left by a daemon that is gone.
    try:
        st = os.lstat(path)
        squatted = not_ours(path, st, stat.S_ISSOCK)
        if squatted is not None:
            os.close(lock_fd)
            raise ConfigError(squatted)
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the file exists with mode 0600 before it gets its real mode below
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        os.close(lock_fd)
        raise ConfigError(f"cannot bind {address}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            os.close(lock_fd)
            raise ConfigError(f"server.socket_group {group!r} is not a group on this system") from None
        os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, mode)  # a socket we just created ourselves in a checked directory: no symlink race
    sock.listen(BACKLOG)
    return BoundListener(address=address, sock=sock, socket_path=path, lock_fd=lock_fd)


def bind_tcp(address: str, curve: ServerKeys | None = None) -> BoundListener:
    host, _, port_text = address[len("tcp://") :].rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if host == "*":
        host = "0.0.0.0"
    try:
        port = int(port_text)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"bad tcp address {address!r}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {address}: {exc.strerror}") from None
    sock.listen(tcp_backlog())
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return BoundListener(address=f"tcp://{shown}:{bound_port}", sock=sock, socket_path=None, lock_fd=None, curve=curve)
