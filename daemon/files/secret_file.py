"""Files that hold a secret the daemon proves itself with (the CURVE server key, the metrics token):
read only when no one else can read or change them.

A secret anyone can read is no secret: with the CURVE server's secret key any local user can pose as
the daemon to every tcp:// client, and with the metrics token read the metrics it guards. ssh refuses
a private key that others can read for the same reason. A file is taken when it is a regular file
(a symlink to one is followed: systemd credentials and config management use them), owned by root or
by the daemon's own uid, with no permission for others and none for its group to write; a group may
read it (root:openinfer 0640 is how a unit that is not root is given a key).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from openinfer.daemon.modelstore.modelconfig import ConfigError

_MAX_SECRET_BYTES = 4096  # a key or a token; a larger file is not one


def secret_file_problem(st: os.stat_result) -> str | None:
    """What makes a file unfit to hold a secret, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, which could change it (it must be root's or the daemon's, uid {os.geteuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return f"is open to other users (mode {mode:04o}): chmod 600 it (640 to let the daemon's group read it)"
    if mode & 0o020:
        return f"is writable by its group (mode {mode:04o}): chmod 600 it (640 to let the daemon's group read it)"
    return None


def read_secret_file(path: str | Path, what: str) -> bytes:
    """The bytes of a secret file; ConfigError naming `what` (the setting) and the file when it cannot be
    read or is not private (secret_file_problem). Checked on the open descriptor: what is read is what
    was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)  # (a FIFO must not block the start)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    try:
        problem = secret_file_problem(os.fstat(fd))
        if problem is not None:
            raise ConfigError(f"the {what} {path} {problem}")
        data = os.read(fd, _MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_SECRET_BYTES:
        raise ConfigError(f"the {what} {path} holds more than {_MAX_SECRET_BYTES} bytes: it is not a key or a token")
    return data
