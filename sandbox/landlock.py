"""Landlock: an unprivileged, kernel-enforced file-access allowlist (and, on newer ABIs, TCP and signal scoping).

Best effort: returns the ABI in force, 0 when the kernel has no Landlock. A Landlock domain applies to the
calling thread and its future children and threads only, so call this before any thread starts.
"""
from __future__ import annotations

import ctypes
import logging
import os
import stat
from collections.abc import Sequence

from .errors import SandboxError
from .libc import raw_syscall
from .process_flags import set_no_new_privs

log = logging.getLogger("openinfer.sandbox")

# include/uapi/linux/landlock.h
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_FILE_ONLY_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # valid on non-directories
READ_RIGHTS = FS_READ_FILE | FS_READ_DIR  # no FS_EXECUTE: workers never execve, even where seccomp would let them


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the UAPI header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers, 0 when unavailable (not built in, disabled, or filtered)."""
    try:
        return raw_syscall("landlock_create_ruleset", None, 0, _CREATE_RULESET_VERSION)
    except (OSError, ValueError):
        return 0


def handled_fs_rights(abi: int) -> int:
    return _FS_BY_ABI.get(abi, _FS_BY_ABI[5])


def apply_landlock(read_only_paths: Sequence[str | int], read_write_paths: Sequence[str] = ()) -> int:
    """Restrict this process to reading `read_only_paths` and reading/writing `read_write_paths` (recursively).
    An int among the read-only paths is an open descriptor (O_PATH is enough): exactly the file or directory
    it refers to, however it was resolved (the caller keeps and closes it).

    Every other file access is denied, execution of files is denied everywhere, and on ABI >= 4 TCP bind and
    connect are denied, on ABI >= 6 signals to processes outside the sandbox and abstract Unix sockets too.
    Needs no_new_privs (set here). Returns the ABI in force, or 0 if the kernel lacks Landlock. Paths this
    uid cannot reach are skipped (they would grant nothing). Raises SandboxError if a path does not exist,
    threads already run, or the kernel rejects the ruleset.
    """
    abi = landlock_abi()
    if abi < 1:
        log.warning("Landlock unavailable; file access is limited by seccomp and uid only")
        return 0
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise SandboxError(f"apply_landlock must run before any thread starts ({threads} threads now): other threads would stay unrestricted")
    fs_rights = handled_fs_rights(abi)
    attr = _RulesetAttr(handled_access_fs=fs_rights)
    size = 8
    if abi >= 4:
        attr.handled_access_net, size = NET_BIND_TCP | NET_CONNECT_TCP, 16
    if abi >= 6:
        attr.scoped, size = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL, 24
    try:
        ruleset_fd = raw_syscall("landlock_create_ruleset", ctypes.byref(attr), size, 0)
    except OSError as exc:
        raise SandboxError(f"landlock_create_ruleset failed: {exc}") from exc
    try:
        for path in read_only_paths:
            _allow(ruleset_fd, path, READ_RIGHTS & fs_rights)
        write_rights = fs_rights & ~FS_EXECUTE
        for path in read_write_paths:
            _allow(ruleset_fd, path, write_rights)
        set_no_new_privs()
        try:
            raw_syscall("landlock_restrict_self", ruleset_fd, 0)
        except OSError as exc:
            raise SandboxError(f"landlock_restrict_self failed: {exc}") from exc
    finally:
        os.close(ruleset_fd)
    log.info("Landlock applied", extra={"abi": abi, "read_only": [_describe(p) for p in read_only_paths], "read_write": list(read_write_paths)})
    return abi


def _describe(path: str | int) -> str:
    if isinstance(path, str):
        return path
    try:
        return os.readlink(f"/proc/self/fd/{path}")
    except OSError:
        return f"fd {path}"


def _allow(ruleset_fd: int, path: str | int, rights: int) -> None:
    if isinstance(path, int):
        fd = os.dup(path)
    else:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except PermissionError:
            # Unreachable for this uid (e.g. a venv under /root after the uid drop): a rule would grant nothing.
            log.warning("Landlock path not reachable by this uid; skipped", extra={"path": path})
            return
        except OSError as exc:
            raise SandboxError(f"Landlock path {path!r}: {exc.strerror}") from exc
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_ONLY_RIGHTS  # directory rights on a file make the kernel reject the rule
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        raw_syscall("landlock_add_rule", ruleset_fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    except OSError as exc:
        raise SandboxError(f"landlock_add_rule for {path!r} failed: {exc}") from exc
    finally:
        os.close(fd)
