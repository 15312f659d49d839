"""Named constants a policy may use in argument comparisons, with this platform's values.

Values come from Python's own modules (os, mmap, socket, signal, fcntl, termios) wherever they exist, so
they match the running architecture (O_* flags differ between x86-64 and arm64, for example); the few that
Python does not expose are Linux UAPI numbers that are the same on every architecture we run on.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import signal
import socket
import termios
from collections.abc import Mapping
from types import MappingProxyType

# Runtime constants every policy may use without declaring them: apply_policy fills them in itself.
BUILTIN_RUNTIME_CONSTANTS = frozenset({"SELF_PID"})

U64_MASK = (1 << 64) - 1

# Not exposed by any Python module (linux/sched.h, linux/prctl.h, linux/mman.h, linux/fcntl.h).
_LINUX_UAPI: dict[str, int] = {
    "CLONE_NEWTIME": 0x00000080,
    "CLONE_VM": 0x00000100,
    "CLONE_FS": 0x00000200,
    "CLONE_FILES": 0x00000400,
    "CLONE_SIGHAND": 0x00000800,
    "CLONE_PIDFD": 0x00001000,
    "CLONE_PTRACE": 0x00002000,
    "CLONE_VFORK": 0x00004000,
    "CLONE_PARENT": 0x00008000,
    "CLONE_THREAD": 0x00010000,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_SYSVSEM": 0x00040000,
    "CLONE_SETTLS": 0x00080000,
    "CLONE_PARENT_SETTID": 0x00100000,
    "CLONE_CHILD_CLEARTID": 0x00200000,
    "CLONE_UNTRACED": 0x00800000,
    "CLONE_CHILD_SETTID": 0x01000000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_IO": 0x80000000,
    "PR_SET_PDEATHSIG": 1,
    "PR_GET_PDEATHSIG": 2,
    "PR_GET_DUMPABLE": 3,
    "PR_SET_DUMPABLE": 4,
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21,
    "PR_SET_SECCOMP": 22,
    "PR_CAPBSET_READ": 23,
    "PR_SET_MM": 35,
    "PR_SET_NO_NEW_PRIVS": 38,
    "PR_GET_NO_NEW_PRIVS": 39,
    "PR_SET_THP_DISABLE": 41,
    "PR_GET_THP_DISABLE": 42,
    "PR_SET_VMA": 0x53564D41,
    "PR_SET_PTRACER": 0x59616D61,
    "PROT_NONE": 0,
    "PROT_SEM": 0x8,
    "PROT_GROWSDOWN": 0x01000000,
    "PROT_GROWSUP": 0x02000000,
    "MAP_FIXED": 0x10,
    "MAP_FIXED_NOREPLACE": 0x100000,
    "MAP_NORESERVE": 0x4000,
    "AT_FDCWD": -100,
    "AT_SYMLINK_NOFOLLOW": 0x100,
    "AT_EMPTY_PATH": 0x1000,
    "F_SETOWN_EX": 15,
    "F_GETOWN_EX": 16,
    "PTRACE_TRACEME": 0,
    "PTRACE_ATTACH": 16,
    "PTRACE_SEIZE": 0x4206,
}

_MODULE_PREFIXES: tuple[tuple[object, tuple[str, ...]], ...] = (
    (os, ("O_", "SCHED_")),
    (mmap, ("PROT_", "MAP_", "MADV_")),
    (socket, ("AF_", "SOCK_", "SOL_", "SO_")),
    (fcntl, ("F_",)),
    (termios, ("TIOC", "TCGETS", "TCSETS", "FIO")),
)


def _collect() -> dict[str, int]:
    table: dict[str, int] = {}
    for module, prefixes in _MODULE_PREFIXES:
        for name in dir(module):
            value = getattr(module, name)
            # bool is an int subclass; enums (socket.AF_*) are ints too and convert cleanly.
            if name.startswith(prefixes) and name.isupper() and isinstance(value, int) and not isinstance(value, bool):
                table[name] = int(value)
    for sig in signal.Signals:
        table[sig.name] = int(sig.value)
    table.update(_LINUX_UAPI)
    return table


NAMED_CONSTANTS: Mapping[str, int] = MappingProxyType(_collect())


def to_u64(value: int) -> int:
    """The 64-bit register image of `value` (negative ints such as AT_FDCWD are sign-extended, as the kernel sees them)."""
    if not -(1 << 63) <= value <= U64_MASK:
        raise ValueError(f"{value} does not fit in a 64-bit syscall argument")
    return value & U64_MASK
