"""Thin ctypes bindings for the few libc calls Python 3.11 does not expose (prctl, unshare, raw syscalls)."""
from __future__ import annotations

import ctypes
import functools
import os

import pyseccomp


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library already loaded into this process (CDLL(None) needs no find_library, which would fork)."""
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); raises OSError on failure, returns the (non-negative) result."""
    function = libc().prctl
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    function.restype = ctypes.c_int
    result = function(option, arg2, arg3, arg4, arg5)
    if result < 0:
        raise _oserror()
    return int(result)


def getsockopt(fd: int, level: int, option: int, size: int) -> bytes:
    """getsockopt(2) into a buffer of `size` bytes (Python's own refuses more than 1024); the bytes the
    kernel wrote. Raises OSError (ERANGE: `size` too small)."""
    function = libc().getsockopt
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    function.restype = ctypes.c_int
    buffer = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if function(fd, level, option, buffer, ctypes.byref(length)) != 0:
        raise _oserror()
    return buffer.raw[: length.value]


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare arrived in Python 3.12)."""
    function = libc().unshare
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    if function(flags) != 0:
        raise _oserror()


def syscall_number(name: str) -> int:
    """This architecture's number for a syscall, from libseccomp's tables; ValueError if it has none."""
    number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    if number < 0:
        raise ValueError(f"no syscall {name!r} on this architecture")
    return number


def raw_syscall(name: str, *args: object) -> int:
    """syscall(2) by name; ints become C longs, ctypes objects (byref, pointers, None) pass as they are. OSError on -1."""
    function = libc().syscall
    function.restype = ctypes.c_long
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = function(ctypes.c_long(syscall_number(name)), *converted)
    if result == -1:
        raise _oserror()
    return int(result)


def _oserror() -> OSError:
    number = ctypes.get_errno()
    return OSError(number, os.strerror(number))
