"""Directories only this daemon may change: its runtime directory (the worker channel) and its cache of
prepared weights.

Any local user can create a path under /tmp first, or plant a symlink there, and then swap what the daemon
puts inside (issue #16). So such a directory is created with a private mode when missing, then opened
without following symlinks and accepted only if it belongs to our effective uid and nobody else may write
to it. What the daemon then does inside goes through that descriptor (dir_fd, fchown, fchmod), never
through a path a symlink could redirect.
"""
from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from openinfer.daemon.modelstore.modelconfig import ConfigError


class UnsafeDirectory(ConfigError):
    """A directory the daemon must own is a symlink, someone else's, or writable by others."""


def directory_problem(st: os.stat_result, euid: int) -> str | None:
    """Why a directory with this (l)stat must not be trusted by a daemon running as `euid`, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != euid:
        return f"is owned by uid {st.st_uid}{_name(st.st_uid)}, not by the daemon's uid {euid}"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def open_private_dir(path: Path, mode: int, what: str) -> int:
    """Create `path` with `mode` if it does not exist, then return a descriptor of it (O_DIRECTORY,
    O_NOFOLLOW). Raises UnsafeDirectory, naming the path, what was found and what to do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        found = os.lstat(path) if os.path.lexists(path) else None
        if found is None:
            raise UnsafeDirectory(f"cannot open the {what} {path}: {exc.strerror}") from None
        raise UnsafeDirectory(_refusal(path, what, directory_problem(found, os.geteuid()) or str(exc.strerror))) from None
    problem = directory_problem(os.fstat(fd), os.geteuid())
    if problem is not None:
        os.close(fd)
        raise UnsafeDirectory(_refusal(path, what, problem))
    return fd


def _refusal(path: Path, what: str, problem: str) -> str:
    if problem == "is a symlink":
        problem = f"is a symlink (to {os.readlink(path)!r})"
    return (
        f"the {what} {path} {problem}. Someone else may have made it to take over what the daemon keeps there "
        "(the worker channel, prepared weights): find out who and why, remove it, and start again; or give the "
        "daemon a directory of its own user (server.runtime_dir / server.cache_dir, or systemd's "
        "RuntimeDirectory=)"
    )


def _name(uid: int) -> str:
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""
