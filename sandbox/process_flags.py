"""Per-process kernel flags set with prctl: no_new_privs, not-dumpable, parent-death signal."""
from __future__ import annotations

import signal

from .errors import SandboxError
from .libc import prctl

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can never grant privileges again (setuid bits, file caps). Required for seccomp
    and Landlock without CAP_SYS_ADMIN; irreversible and inherited by children."""
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        enabled = prctl(PR_GET_NO_NEW_PRIVS)
    except OSError as exc:
        raise SandboxError(f"PR_SET_NO_NEW_PRIVS failed: {exc}") from exc
    if enabled != 1:
        raise SandboxError("PR_SET_NO_NEW_PRIVS did not stick")


def set_not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: no core dumps, and processes of the same uid cannot ptrace us or read /proc/PID/mem,
    environ, maps or fd. Note a uid change resets it to the fs.suid_dumpable sysctl (0 by default)."""
    try:
        prctl(PR_SET_DUMPABLE, 0)
        dumpable = prctl(PR_GET_DUMPABLE)
    except OSError as exc:
        raise SandboxError(f"PR_SET_DUMPABLE failed: {exc}") from exc
    if dumpable != 0:
        raise SandboxError("process is still dumpable")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` when our parent dies, so a worker never outlives its supervisor.

    It fires when the *thread* that forked/spawned us exits, not only the whole parent process, so the
    supervisor must spawn workers from a long-lived thread. If the parent already died before this call,
    nothing fires: callers must compare os.getppid() with the expected pid afterwards.
    """
    try:
        prctl(PR_SET_PDEATHSIG, int(sig))
    except OSError as exc:
        raise SandboxError(f"PR_SET_PDEATHSIG failed: {exc}") from exc
