"""Files that hold a secret the daemon proves itself with (the CURVE server key, the metrics token):
read only when no one else can read or change them.

A secret anyone can read is no secret: with the CURVE server's secret key any local user can pose as
the daemon to every tcp:// client, and with the metrics token read the metrics it guards. ssh refuses
a private key that others can read for the same reason. A file is taken when it is a regular file
(a symlink to one is followed: systemd credentials and config management use them), owned by root or
by the daemon's own uid, with no permission for others, none for its group to write, no access ACL
(an ACL grants what the mode bits do not show: `user:65534:r` on a 0640 file), and a group that may
read it only if it is one of the daemon's own (root:openinfer 0640 is how a unit that is not root is
given a key; root:65534 0640 gave uid 65534 the key).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from openinfer.daemon.modelstore.modelconfig import ConfigError

_MAX_SMALL_FILE_BYTES = 4096  # a key or a token; a larger file is not one
_ACCESS_ACL = "system.posix_acl_access"  # present only when the ACL has entries beyond the mode bits


def secret_file_problem(st: os.stat_result, fd: int | None = None, clients_gid: int | None = None) -> str | None:
    """What makes a file unfit to hold a secret, or None. With `fd`, its ACL is looked at too; with
    `clients_gid`, the group the daemon's socket gives its clients may not read it either."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, which could change it (it must be root's or the daemon's, uid {os.geteuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return f"is open to other users (mode {mode:04o}): chmod 600 it (640 to let the daemon's group read it)"
    if mode & 0o020:
        return f"is writable by its group (mode {mode:04o}): chmod 600 it (640 to let the daemon's group read it)"
    if mode & 0o040 and st.st_gid not in (os.getegid(), *os.getgroups()):
        return f"is readable by group {st.st_gid}, which is not the daemon's: chmod 600 it (and chown it to the daemon's user if the daemon is not root)"
    if mode & 0o040 and st.st_gid == os.getegid() != 0:
        # The daemon's own group is the one its socket and runtime directory carry, i.e. its clients' (the
        # shipped unit runs with Group=openinfer-clients): readable by it is readable by every client
        # (attacker round 28, following the hint this message used to give).
        return f"is readable by group {st.st_gid}, the daemon's own group, which its socket and runtime directory give to its clients: chown it to the daemon's user (or root) and chmod 600 it"
    if mode & 0o040 and st.st_gid == clients_gid:
        # (round 29: server.socket_group, a supplementary group of a non-root daemon's, passed the check above)
        return f"is readable by group {st.st_gid}, the group the daemon's socket gives to its clients (server.socket_group): chown it to the daemon's user (or root) and chmod 600 it"
    if fd is not None and _has_access_acl(fd):
        return "has an access ACL, which may grant what its mode does not show (getfacl): setfacl -b it"
    return None


def _has_access_acl(fd: int) -> bool:
    try:
        os.getxattr(fd, _ACCESS_ACL)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


def read_secret_file(path: str | Path, what: str, clients_gid: int | None = None) -> bytes:
    """The bytes of a secret file; ConfigError naming `what` (the setting) and the file when it cannot be
    read or is not private (secret_file_problem)."""
    return read_small_file(path, what, private=True, clients_gid=clients_gid)


def read_small_file(path: str | Path, what: str, private: bool = False, clients_gid: int | None = None) -> bytes:
    """At most a few KiB of a regular file, never blocking (a FIFO or a device is refused before it is
    opened, and checked again on the open descriptor: what is read is what was checked); with `private`,
    only a file secret_file_problem has nothing against. ConfigError naming `what` and the file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # (nothing else is opened: a device may act on open)
            raise ConfigError(f"the {what} {path} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        problem = secret_file_problem(st, fd, clients_gid) if private else (None if stat.S_ISREG(st.st_mode) else "is not a regular file")
        if problem is not None:
            raise ConfigError(f"the {what} {path} {problem}")
        data = os.read(fd, _MAX_SMALL_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_SMALL_FILE_BYTES:
        raise ConfigError(f"the {what} {path} holds more than {_MAX_SMALL_FILE_BYTES} bytes: it is not a key or a token")
    return data
