"""The forbidden things `openinfer sandbox check` tries from inside a sandbox, one function per attempt.

Each probe is split in two: `prepare(targets)` runs before the policy is applied (it may create the socket
a later connect needs, or a private mount namespace so a mount that wrongly succeeds stays contained) and
returns the attempt, which runs after. An attempt returns if the forbidden thing worked and raises OSError
if it was refused; under a killing policy it never returns at all (SIGSYS).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from .libc import libc, unshare

Attempt = Callable[[], object]

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_PTRACE_TRACEME = 0
_READ_IMPLIES_EXEC = 0x0400000


@dataclass(frozen=True)
class ProbeTargets:
    """What the probes aim at. scratch_dir/listener_path/victim_file are None when probing in-process."""

    parent_pid: int
    scratch_dir: str | None = None
    listener_path: str | None = None  # a Unix socket the parent listens on
    victim_file: str | None = None  # a file the probe may try to chmod


@dataclass(frozen=True)
class Probe:
    name: str
    description: str
    prepare: Callable[[ProbeTargets], Attempt]
    needs_scratch: bool = False


def _checked(result: int) -> int:
    if result == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result


def _network_socket(_: ProbeTargets) -> Attempt:
    return lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()


def _unix_socket(_: ProbeTargets) -> Attempt:
    return lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()


def _connect(targets: ProbeTargets) -> Attempt:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # created before the policy: only connect is tested
    return lambda: sock.connect(targets.listener_path or "")


def _exec(_: ProbeTargets) -> Attempt:
    return lambda: os.execv("/bin/true", ["true"])


def _file_write(targets: ProbeTargets) -> Attempt:
    def attempt() -> None:
        with open(os.path.join(targets.scratch_dir or "", "written-by-probe"), "w") as out:
            out.write("sandbox escape\n")

    return attempt


def _file_read(_: ProbeTargets) -> Attempt:
    def attempt() -> None:
        with open("/etc/passwd", "rb") as secret:
            secret.read(1)

    return attempt


def _fork(_: ProbeTargets) -> Attempt:
    def attempt() -> None:
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)

    return attempt


def _ptrace(_: ProbeTargets) -> Attempt:
    # TRACEME rather than ATTACH: if it wrongly succeeds, nobody gets stopped.
    function = libc().ptrace
    function.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    function.restype = ctypes.c_long
    return lambda: _checked(function(_PTRACE_TRACEME, 0, None, None))


def _unshare(_: ProbeTargets) -> Attempt:
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER
    return lambda: unshare(flags)


def _mount(targets: ProbeTargets) -> Attempt:
    function = libc().mount
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    function.restype = ctypes.c_int
    fstype = b"tmpfs"
    try:  # contain a mount that wrongly succeeds inside a private mount namespace of this child
        unshare(_CLONE_NEWNS if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNS)
        _checked(function(None, b"/", None, _MS_REC | _MS_PRIVATE, None))
    except OSError:
        fstype = b"openinfer-probe-no-such-fs"  # not contained: make sure nothing could really be mounted
    target = (targets.scratch_dir or "/").encode()
    return lambda: _checked(function(b"none", target, fstype, 0, None))


def _chmod(targets: ProbeTargets) -> Attempt:
    return lambda: os.chmod(targets.victim_file or "", 0o777)


def _signal(targets: ProbeTargets) -> Attempt:
    return lambda: os.kill(targets.parent_pid, 0)  # signal 0: checks permission, delivers nothing


def _exec_memory(_: ProbeTargets) -> Attempt:
    return lambda: mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()


def _mprotect_exec(_: ProbeTargets) -> Attempt:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = libc().mprotect
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int

    def attempt() -> None:
        _checked(function(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC))
        page.close()  # also keeps the mapping alive until the attempt ran

    return attempt


def _personality(_: ProbeTargets) -> Attempt:
    # READ_IMPLIES_EXEC would make every PROT_READ mapping executable: a way around the PROT_EXEC rules.
    function = libc().personality
    function.argtypes = [ctypes.c_ulong]
    function.restype = ctypes.c_int
    return lambda: _checked(function(_READ_IMPLIES_EXEC))


def probe_catalog() -> tuple[Probe, ...]:
    return (
        Probe("network_socket", "create a TCP/IPv4 socket", _network_socket),
        Probe("unix_socket", "create a Unix socket", _unix_socket),
        Probe("connect", "connect to a Unix socket the parent listens on", _connect, needs_scratch=True),
        Probe("exec", "execute /bin/true", _exec),
        Probe("file_write", "create a file for writing", _file_write, needs_scratch=True),
        Probe("file_read", "read /etc/passwd", _file_read),
        Probe("fork", "create a child process", _fork),
        Probe("ptrace", "ptrace(PTRACE_TRACEME)", _ptrace),
        Probe("unshare", "enter a new namespace", _unshare),
        Probe("mount", "mount a tmpfs", _mount, needs_scratch=True),
        Probe("chmod", "chmod a file to 0777", _chmod, needs_scratch=True),
        Probe("signal", "signal the parent process (signal 0)", _signal),
        Probe("exec_memory", "map anonymous memory writable and executable", _exec_memory),
        Probe("mprotect_exec", "make a writable mapping executable", _mprotect_exec),
        Probe("personality", "set READ_IMPLIES_EXEC", _personality),
    )
