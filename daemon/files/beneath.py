"""Opening a path beneath a directory without following symlinks: openat2(2) with RESOLVE_BENEATH.

The kernel resolves the whole path, component by component, and refuses (EXDEV) any step that would leave
the starting directory (`..` above it, an absolute path) and (ELOOP) any symlink or /proc magic link on the
way, so no check-then-open race is possible. Python 3.11 has no os.openat2, hence ctypes. Without openat2
(Linux < 5.6, or an architecture whose number we do not know) this fails closed with OpenAt2Unavailable:
there is no safe fallback worth having.

Imported by the supervisor, the prepare helper and the workers: no onnxruntime, no openinfer.sandbox
(whose import runs ldconfig).
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from typing import Any

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

# openat2 arrived after the syscall tables were unified: 437 on every architecture we run on.
_SYSCALL_NUMBERS = {"x86_64": 437, "aarch64": 437}
_RACE_RETRIES = 8  # RESOLVE_BENEATH answers EAGAIN when a rename raced the lookup of `..`


class OpenAt2Unavailable(OSError):
    """The kernel (or this architecture) offers no openat2: model files cannot be opened safely."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _syscall() -> Any:
    function = ctypes.CDLL(None, use_errno=True).syscall
    function.restype = ctypes.c_long
    function.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_OpenHow), ctypes.c_size_t]
    return function


def open_beneath(dir_fd: int, path: str, flags: int, resolve: int = STRICT) -> int:
    """openat2(dir_fd, path, {flags | O_CLOEXEC, resolve}): a new fd, or OSError with the kernel's errno
    (EXDEV: the path leaves dir_fd; ELOOP: a symlink on the way; OpenAt2Unavailable: no openat2)."""
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise OpenAt2Unavailable(errno.ENOSYS, f"openat2 is not known on {platform.machine()}")
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=0, resolve=resolve)
    encoded = os.fsencode(path)
    for _ in range(_RACE_RETRIES):
        fd = _syscall()(number, dir_fd, encoded, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code == errno.EAGAIN:
            continue
        if code == errno.ENOSYS:
            raise OpenAt2Unavailable(code, "this kernel has no openat2() (Linux 5.6 or newer is needed)")
        raise OSError(code, os.strerror(code), path)
    raise OSError(errno.EAGAIN, "the path kept changing while it was resolved", path)
