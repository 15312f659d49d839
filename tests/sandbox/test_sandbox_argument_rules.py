"""Every argument-filtered rule, from both sides: allowed arguments survive, altered ones die or get the errno.

Each case runs in a forked child under the real filter; SIGSYS death is the kernel's kill_process.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openinfer.sandbox.libc import libc, prctl, raw_syscall
from sandbox_child import ChildOutcome, errno_name, run_in_child

pytestmark = pytest.mark.live

PR_SET_NAME, PR_SET_DUMPABLE = 15, 4
F_SETOWN = 8
TIOCSTI = 0x5412


def returns(outcome: ChildOutcome, value: Any) -> None:
    assert outcome.signal is None, f"child died of signal {outcome.signal} ({outcome.error})"
    assert outcome.error is None, outcome.error
    assert outcome.value == value


def dies(outcome: ChildOutcome) -> None:
    assert outcome.killed_by_sigsys, f"expected SIGSYS, got {outcome}"


# ---------------------------------------------------------------- memory: W^X


def _map(prot: int) -> Callable[[], str]:
    return lambda: errno_name(lambda: mmap.mmap(-1, mmap.PAGESIZE, prot=prot).close())


def _mprotect(prot: int) -> Callable[[], str]:
    def attempt() -> str:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        function = libc().mprotect
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return "ok" if function(address, mmap.PAGESIZE, prot) == 0 else errno.errorcode[ctypes.get_errno()]

    return attempt


def test_mmap_without_exec_survives_with_exec_dies() -> None:
    returns(run_in_child(_map(mmap.PROT_READ | mmap.PROT_WRITE), policy="worker"), "ok")
    returns(run_in_child(_map(mmap.PROT_READ), policy="worker"), "ok")
    dies(run_in_child(_map(mmap.PROT_READ | mmap.PROT_EXEC), policy="worker"))
    dies(run_in_child(_map(mmap.PROT_EXEC), policy="worker"))


def test_mprotect_without_exec_survives_with_exec_dies() -> None:
    returns(run_in_child(_mprotect(mmap.PROT_READ), policy="worker"), "ok")
    dies(run_in_child(_mprotect(mmap.PROT_READ | mmap.PROT_EXEC), policy="worker"))


def test_boot_policy_lets_libraries_map_code() -> None:
    returns(run_in_child(_map(mmap.PROT_READ | mmap.PROT_EXEC), policy="boot"), "ok")


def test_read_implies_exec_personality_dies() -> None:
    function = libc().personality
    function.argtypes = [ctypes.c_ulong]
    dies(run_in_child(lambda: function(0x0400000), policy="worker"))


# ---------------------------------------------------------------- clone: threads yes, processes no


def _thread_runs() -> str:
    box: list[str] = []
    thread = threading.Thread(target=lambda: box.append("ran"))
    thread.start()
    thread.join()
    return box[0]


def test_threads_survive_fork_dies() -> None:
    returns(run_in_child(_thread_runs, policy="worker"), "ran")
    dies(run_in_child(lambda: os.fork() == 0 and os._exit(0), policy="worker"))


def test_a_thread_in_new_namespaces_dies() -> None:
    clone_vm, clone_sighand, clone_thread, clone_newnet = 0x100, 0x800, 0x10000, 0x40000000
    flags = clone_vm | clone_sighand | clone_thread | clone_newnet
    dies(run_in_child(lambda: raw_syscall("clone", flags, 0, 0, 0, 0), policy="worker"))


def test_clone3_gets_enosys_so_glibc_falls_back() -> None:
    returns(run_in_child(lambda: errno_name(lambda: raw_syscall("clone3", None, 0)), policy="worker"), "ENOSYS")


# ---------------------------------------------------------------- signals: ourselves only


def test_signals_to_self_survive_to_others_die() -> None:
    parent = os.getpid()
    returns(run_in_child(lambda: os.kill(os.getpid(), 0), policy="worker"), None)
    returns(run_in_child(lambda: raw_syscall("tgkill", os.getpid(), threading.get_native_id(), 0), policy="worker"), 0)
    dies(run_in_child(lambda: os.kill(parent, 0), policy="worker"))
    dies(run_in_child(lambda: raw_syscall("tgkill", parent, parent, 0), policy="worker"))
    dies(run_in_child(lambda: os.kill(0, 0), policy="worker"))  # our whole process group
    dies(run_in_child(lambda: raw_syscall("tkill", parent, 0), policy="worker"))


# ---------------------------------------------------------------- prctl, fcntl, scheduling, limits, ioctl


def test_prctl_thread_name_is_refused_softly_everything_else_dies() -> None:
    returns(run_in_child(lambda: errno_name(lambda: prctl(PR_SET_NAME, 0)), policy="worker"), "EPERM")
    dies(run_in_child(lambda: prctl(PR_SET_DUMPABLE, 1), policy="worker"))


def test_fcntl_flags_survive_setown_dies() -> None:
    read_end, write_end = os.pipe()  # made before the policy: pipe2 is not part of serving

    def set_nonblocking() -> bool:  # with fcntl as libzmq does (Python's os.set_blocking uses ioctl FIONBIO)
        flags = fcntl.fcntl(read_end, fcntl.F_GETFL)
        fcntl.fcntl(read_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        return bool(fcntl.fcntl(read_end, fcntl.F_GETFL) & os.O_NONBLOCK)

    try:
        returns(run_in_child(set_nonblocking, policy="worker"), True)
        dies(run_in_child(lambda: fcntl.fcntl(read_end, F_SETOWN, os.getppid()), policy="worker"))
    finally:
        os.close(read_end)
        os.close(write_end)


def test_default_scheduling_survives_other_classes_die() -> None:
    returns(run_in_child(lambda: os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0)), policy="worker"), None)
    dies(run_in_child(lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)), policy="worker"))


def test_reading_limits_survives_setting_them_dies() -> None:
    returns(run_in_child(lambda: list(resource.getrlimit(resource.RLIMIT_AS)), policy="worker"), list(resource.getrlimit(resource.RLIMIT_AS)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    dies(run_in_child(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard)), policy="worker"))


def test_ioctl_answers_not_a_terminal_under_worker_and_refuses_tiocsti_under_boot() -> None:
    def inject() -> str:
        function = libc().ioctl
        function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]
        return "ok" if function(0, TIOCSTI, b"x") == 0 else errno.errorcode[ctypes.get_errno()]

    returns(run_in_child(inject, policy="worker"), "ENOTTY")
    returns(run_in_child(inject, policy="boot"), "EPERM")
    returns(run_in_child(lambda: os.isatty(2), policy="worker"), False)


# ---------------------------------------------------------------- files: lookups refused softly


def test_file_lookups_get_eperm_under_worker(tmp_path: Path) -> None:
    target = tmp_path / "exists.txt"
    target.write_text("model secrets")
    returns(run_in_child(lambda: errno_name(lambda: open(target).read()), policy="worker"), "EPERM")
    returns(run_in_child(lambda: errno_name(lambda: os.stat(target)), policy="worker"), "EPERM")
    returns(run_in_child(lambda: errno_name(lambda: os.listdir(tmp_path)), policy="worker"), "EPERM")


@pytest.fixture()
def existing_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"original")
    yield path
    assert path.read_bytes() == b"original", "a sandboxed child modified the file"


@pytest.mark.parametrize("flags", ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_WRONLY|O_APPEND", "O_RDWR|O_CLOEXEC"])
def test_boot_opens_read_only_and_refuses_writable_opens(existing_file: Path, flags: str) -> None:
    value = 0
    for name in flags.split("|"):
        value |= getattr(os, name)
    returns(run_in_child(lambda: errno_name(lambda: os.close(os.open(existing_file, os.O_RDONLY))), policy="boot"), "ok")
    returns(run_in_child(lambda: errno_name(lambda: os.close(os.open(existing_file, value, 0o644))), policy="boot"), "EPERM")
    # the legacy open(2) syscall number, which glibc no longer uses but an attacker can
    path = str(existing_file).encode()
    returns(run_in_child(lambda: errno_name(lambda: os.close(raw_syscall("open", path, os.O_RDONLY, 0))), policy="boot"), "ok")
    returns(run_in_child(lambda: errno_name(lambda: raw_syscall("open", path, value, 0o644)), policy="boot"), "EPERM")


def test_boot_refuses_new_files(tmp_path: Path) -> None:
    returns(run_in_child(lambda: errno_name(lambda: open(tmp_path / "new", "x")), policy="boot"), "EPERM")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- sockets: Unix only during boot, none when serving


@pytest.fixture()
def unix_listener(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "listener.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)
        yield path


def test_boot_makes_no_socket_of_any_family_and_connects_nowhere(unix_listener: str) -> None:
    """The channel is inherited at spawn: a booting worker (whose model may be hostile) gets no new socket,
    Unix ones included (under systemd the workers share the supervisor's uid and could reach its sockets)."""
    for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET):
        dies(run_in_child(lambda: socket.socket(family, socket.SOCK_STREAM if family == socket.AF_UNIX else socket.SOCK_DGRAM), policy="boot"))
    dies(run_in_child(lambda: socket.socketpair(), policy="boot"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # a socket that exists before the policy cannot connect anywhere either
        dies(run_in_child(lambda: sock.connect(unix_listener), policy="boot"))
    finally:
        sock.close()


def test_upper_register_bits_cannot_smuggle_a_socket_family() -> None:
    """The kernel reads the family as a 32-bit int; an attacker may set the upper 32 bits. Rules compare all 64."""
    dies(run_in_child(lambda: raw_syscall("socket", socket.AF_UNIX, socket.SOCK_STREAM, 0), policy="boot"))
    dies(run_in_child(lambda: raw_syscall("socket", (1 << 32) | socket.AF_UNIX, socket.SOCK_STREAM, 0), policy="boot"))


def test_worker_refuses_every_new_socket(unix_listener: str) -> None:
    dies(run_in_child(lambda: errno_name(lambda: socket.socket(socket.AF_UNIX)), policy="worker"))
    dies(run_in_child(lambda: errno_name(lambda: socket.socketpair()), policy="worker"))

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # a socket that exists before the policy still cannot connect anywhere
        dies(run_in_child(lambda: sock.connect(unix_listener), policy="worker"))
    finally:
        sock.close()


def test_audit_logs_and_allows_what_the_worker_does_not_mention() -> None:
    dies(run_in_child(lambda: os.uname().sysname, policy="worker"))
    returns(run_in_child(lambda: os.uname().sysname, policy="audit"), "Linux")
