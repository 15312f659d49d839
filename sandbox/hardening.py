"""Process-level isolation for a worker, each step small and separately callable (docs/SANDBOX.md gives the order).

Mandatory steps raise SandboxError when they fail; best-effort ones (namespaces, Landlock) return what they
achieved so the caller can log and report it.
"""
from __future__ import annotations

import logging
import os
import resource
from collections.abc import Sequence

from .errors import SandboxError
from .landlock import apply_landlock as _apply_landlock
from .libc import libc, unshare
from .process_flags import set_no_new_privs, set_not_dumpable, set_parent_death_signal
from .status import describe_sandbox, read_status_fields

log = logging.getLogger("openinfer.sandbox")

__all__ = [
    "apply_boot_rlimits",
    "apply_landlock",
    "describe_sandbox",
    "drop_privileges",
    "enter_namespaces",
    "malloc_trim",
    "set_memory_limit",
    "set_no_new_privs",
    "set_not_dumpable",
    "set_parent_death_signal",
]

CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
LIBZMQ_MIN_OPEN_FILES = 32  # a context, one socket and its reconnect machinery use ~20 descriptors


def apply_boot_rlimits(*, max_open_files: int, max_file_size_bytes: int = 0) -> None:
    """No core dumps, no file growth beyond `max_file_size_bytes`, at most `max_open_files` descriptors.

    Soft and hard limits are both set, so the process cannot raise them back. With the default file size
    of 0 a write that would extend a regular file fails with EFBIG (Python ignores SIGXFSZ); that includes
    a stderr redirected to a regular file, so give workers a pipe or socket for stderr. 64 open files is a
    sane worker default; 16 starves libzmq.
    """
    if max_open_files < 1 or max_file_size_bytes < 0:
        raise SandboxError(f"bad rlimits: max_open_files={max_open_files}, max_file_size_bytes={max_file_size_bytes}")
    if max_open_files < LIBZMQ_MIN_OPEN_FILES:
        log.warning("max_open_files below what libzmq needs", extra={"max_open_files": max_open_files})
    _lower_limit(resource.RLIMIT_CORE, 0)
    _lower_limit(resource.RLIMIT_FSIZE, max_file_size_bytes)
    _lower_limit(resource.RLIMIT_NOFILE, max_open_files)


def set_memory_limit(limit_bytes: int | None) -> None:
    """Cap the address space (RLIMIT_AS, soft and hard): allocations beyond it fail with MemoryError/bad_alloc
    instead of exhausting the host. Set it after loading (onnxruntime needs ~192 MiB of address space to load,
    threads reserve 8 MiB stacks, glibc arenas 64 MiB each). None lifts the soft limit to the hard one.
    Raises SandboxError if the limit is not above the current address-space size.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if limit_bytes is None:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        return
    if limit_bytes <= 0:
        raise SandboxError(f"memory limit must be positive, got {limit_bytes}")
    vm_size = int(read_status_fields("/proc/self/status").get("VmSize", "0 kB").split()[0]) * 1024
    if limit_bytes <= vm_size:
        raise SandboxError(f"memory limit {limit_bytes} bytes is below the current address space ({vm_size} bytes)")
    _lower_limit(resource.RLIMIT_AS, limit_bytes)


def drop_privileges(uid: int, gid: int) -> None:
    """As root: drop supplementary groups, then gid, then uid (real, effective and saved), and verify that root
    cannot be regained. As non-root: succeeds only if we already are uid/gid (there is nothing to drop).

    glibc applies setresuid/setresgid to every thread, so this is safe after threads exist.
    """
    if uid == 0 or gid == 0:
        raise SandboxError("refusing to drop privileges to uid or gid 0")
    if os.geteuid() != 0:
        if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
            return
        raise SandboxError(f"only root can switch to uid {uid}/gid {gid} (running as uid {os.geteuid()})")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise SandboxError(f"dropping privileges to {uid}:{gid} failed: {exc}") from exc
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise SandboxError("privilege drop did not stick")
    for regain in (os.setuid, os.setgid, os.seteuid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise SandboxError(f"{regain.__name__}(0) succeeded after dropping privileges")
    if int(read_status_fields("/proc/self/status").get("CapEff", "0"), 16) != 0:
        raise SandboxError("capabilities remain after dropping privileges")
    log.info("dropped privileges", extra={"uid": uid, "gid": gid})


def enter_namespaces(user_namespace: bool = True) -> list[str]:
    """Best effort: move into fresh network and IPC namespaces (no interfaces, not even up loopback; no shared
    SysV IPC), through a user namespace when not root. Path-based ipc:// sockets keep working.

    `user_namespace=False`: never through a user namespace - for a process that accepts Unix connections
    and must know who connects: in a user namespace SO_PEERCRED reports every uid it does not map (all
    but its own, for an unprivileged process) as the overflow uid 65534. Without root that leaves none.

    Call before any thread starts (a user namespace cannot be entered by a multithreaded process) and, as
    root, before drop_privileges (root needs no user namespace, which would hand the worker namespaced
    capabilities). Returns the namespaces entered, [] if none could be.
    """
    if os.geteuid() == 0:
        attempts = [(CLONE_NEWNET | CLONE_NEWIPC, ["net", "ipc"]), (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC, ["user", "net", "ipc"])]
    else:
        attempts = [(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC, ["user", "net", "ipc"])]
    attempts = [(flags, names) for flags, names in attempts if user_namespace or not flags & CLONE_NEWUSER]
    if not attempts:
        return []  # (not root, and no user namespace: nothing to try; the caller says why)
    for flags, names in attempts:
        try:
            unshare(flags)
        except OSError as exc:
            log.debug("unshare failed", extra={"namespaces": names, "error": exc.strerror})
            continue
        log.info("entered namespaces", extra={"namespaces": names})
        return names
    log.warning("could not enter network/IPC namespaces", extra={"threads": len(os.listdir("/proc/self/task"))})
    return []


def apply_landlock(read_only_paths: Sequence[str | int], read_write_paths: Sequence[str] = ()) -> int:
    """Best effort Landlock: read-only access to `read_only_paths` (paths, or open descriptors), read-write to
    `read_write_paths`, nothing else (no exec anywhere). Returns the ABI in force, 0 when unavailable. Call
    before threads start.
    """
    return _apply_landlock(read_only_paths, read_write_paths)


def malloc_trim() -> bool:
    """Return free heap memory to the kernel (glibc malloc_trim(0)); True if any was released.

    Call after warm-up, before the serve policy and the memory limit (DESIGN: ~14 MiB per worker).
    """
    function = libc().malloc_trim
    function.restype = int
    return bool(function(0))


def _lower_limit(which: int, value: int) -> None:
    """Set soft and hard limit to `value`, or to the current hard limit if that is lower (only root may raise it)."""
    _, hard = resource.getrlimit(which)
    target = value if hard == resource.RLIM_INFINITY else min(value, hard)
    try:
        resource.setrlimit(which, (target, target))
    except (OSError, ValueError) as exc:
        raise SandboxError(f"setrlimit({which}, {target}) failed: {exc}") from exc
