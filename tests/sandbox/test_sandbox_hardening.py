"""Process-level layers, each checked from the inside of a forked child with the real kernel feature."""
from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openinfer.sandbox import SandboxError, hardening
from openinfer.sandbox.landlock import landlock_abi
from openinfer.sandbox.libc import prctl
from openinfer.sandbox.process_flags import PR_GET_DUMPABLE
from sandbox_child import ChildOutcome, errno_name, run_in_child

pytestmark = pytest.mark.live

MiB = 1024 * 1024


def value_of(outcome: ChildOutcome) -> object:
    assert outcome.signal is None and outcome.error is None, outcome
    return outcome.value


# ---------------------------------------------------------------- rlimits


def vm_size() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def test_memory_limit_turns_overallocation_into_memory_error() -> None:
    def allocate() -> dict[str, object]:
        hardening.set_memory_limit(vm_size() + 256 * MiB)
        small = bytearray(64 * MiB)  # within the limit
        try:
            bytearray(1024 * MiB)
        except MemoryError:
            return {"small": len(small), "big": "MemoryError", "limit": list(resource.getrlimit(resource.RLIMIT_AS))}
        return {"big": "allocated"}

    result = value_of(run_in_child(allocate))
    assert isinstance(result, dict) and result["big"] == "MemoryError" and result["small"] == 64 * MiB
    soft, hard = result["limit"]  # type: ignore[misc]
    assert soft == hard, "the hard limit is lowered too, so the worker cannot raise it back"


def test_memory_limit_below_current_use_is_refused_and_none_lifts_the_soft_limit() -> None:
    def check() -> list[str]:
        seen = []
        try:
            hardening.set_memory_limit(16 * MiB)
        except SandboxError:
            seen.append("refused")
        hardening.set_memory_limit(None)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        seen.append("lifted" if soft == hard else "not lifted")
        return seen

    assert value_of(run_in_child(check)) == ["refused", "lifted"]


def test_boot_rlimits(tmp_path: Path) -> None:
    def check() -> dict[str, object]:
        # Opened first: the forked test process may hold more than 64 descriptors already (pytest-xdist's
        # worker does), and an open past the new limit would fail EMFILE before the write is tried.
        grow = open(tmp_path / "grow.bin", "wb", buffering=0)
        hardening.apply_boot_rlimits(max_open_files=64)
        limits = {name: list(resource.getrlimit(getattr(resource, name))) for name in ("RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE")}
        write = errno_name(lambda: grow.write(b"x"))  # file size limit 0
        fds: list[int] = []
        try:
            while len(fds) < 100:
                fds.append(os.open("/dev/null", os.O_RDONLY))
            opened = "no limit"
        except OSError as exc:
            opened = errno.errorcode[exc.errno or 0]
        return {"limits": limits, "write": write, "open": opened}

    result = value_of(run_in_child(check))
    assert result == {
        "limits": {"RLIMIT_CORE": [0, 0], "RLIMIT_FSIZE": [0, 0], "RLIMIT_NOFILE": [64, 64]},
        "write": "EFBIG",
        "open": "EMFILE",
    }
    with pytest.raises(SandboxError):
        hardening.apply_boot_rlimits(max_open_files=0)


# ---------------------------------------------------------------- process flags


def test_no_new_privs_and_not_dumpable() -> None:
    def check() -> list[object]:
        hardening.set_no_new_privs()
        hardening.set_not_dumpable()
        with open("/proc/self/status") as status:
            nnp = next(line.split()[1] for line in status if line.startswith("NoNewPrivs"))
        return [nnp, prctl(PR_GET_DUMPABLE)]

    assert value_of(run_in_child(check)) == ["1", 0]


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("armed", [True, False])
def test_parent_death_signal_kills_an_orphaned_worker(armed: bool) -> None:
    """A middle process spawns a 'worker' and exits; with the death signal armed the worker dies with it."""
    read_end, write_end = os.pipe()  # worker -> test: its pid
    armed_read, armed_write = os.pipe()  # worker -> middle: death signal armed, you may exit
    middle = os.fork()
    if middle == 0:
        try:
            worker = os.fork()
            if worker == 0:
                try:
                    if armed:
                        hardening.set_parent_death_signal(signal.SIGKILL)
                    os.write(write_end, f"{os.getpid()}\n".encode())
                    os.write(armed_write, b"1")
                    time.sleep(30)
                finally:
                    os._exit(0)
            os.read(armed_read, 1)
        finally:
            os._exit(0)  # the worker's parent exits: the orphaned worker must not survive it
    os.close(armed_read)
    os.close(armed_write)
    os.close(write_end)
    worker_pid = int(os.read(read_end, 64).decode().split()[0])
    os.close(read_end)
    os.waitpid(middle, 0)
    deadline = time.monotonic() + 5
    while not _zombie_or_gone(worker_pid) and time.monotonic() < deadline and armed:
        time.sleep(0.01)
    try:
        assert _zombie_or_gone(worker_pid) == armed
    finally:
        if not armed:
            os.kill(worker_pid, signal.SIGKILL)


# ---------------------------------------------------------------- privileges


def test_drop_privileges_cannot_be_undone() -> None:
    if os.geteuid() != 0:
        with pytest.raises(SandboxError, match="only root"):
            hardening.drop_privileges(os.getuid() + 1, os.getgid() + 1)
        return

    def drop() -> dict[str, object]:
        hardening.drop_privileges(65534, 65534)
        regain = errno_name(lambda: os.setuid(0))
        try:  # Python turns setrlimit's EPERM into ValueError
            resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
            raise_limit = "raised"
        except ValueError:
            raise_limit = "refused"
        return {"uid": list(os.getresuid()), "gid": list(os.getresgid()), "groups": os.getgroups(), "setuid0": regain,
                "raise_limit": raise_limit, "root_home": errno_name(lambda: os.listdir("/root"))}

    assert value_of(run_in_child(drop)) == {
        "uid": [65534] * 3, "gid": [65534] * 3, "groups": [], "setuid0": "EPERM", "raise_limit": "refused", "root_home": "EACCES",
    }
    with pytest.raises(SandboxError, match="uid or gid 0"):
        hardening.drop_privileges(0, 0)


# ---------------------------------------------------------------- namespaces


@pytest.fixture()
def loopback_listener() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def _connect_loopback(port: int) -> str:
    def attempt() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(("127.0.0.1", port))

    return errno_name(attempt)


def test_namespaces_cut_the_worker_off_the_network(loopback_listener: int) -> None:
    assert _connect_loopback(loopback_listener) == "ok"  # the control: reachable from here

    def isolated() -> dict[str, object]:
        entered = hardening.enter_namespaces()
        return {"entered": entered, "connect": _connect_loopback(loopback_listener),
                "own_net": os.readlink("/proc/self/ns/net")}

    result = value_of(run_in_child(isolated))
    assert isinstance(result, dict)
    assert {"net", "ipc"} <= set(result["entered"])  # type: ignore[arg-type]
    assert result["connect"] == "ENETUNREACH"
    assert result["own_net"] != os.readlink("/proc/self/ns/net")


# ---------------------------------------------------------------- Landlock


@pytest.fixture()
def landlock_version() -> int:
    abi = landlock_abi()
    if abi == 0:
        from openinfer.sandbox.libc import raw_syscall

        try:
            raw_syscall("landlock_create_ruleset", None, 0, 1)
        except OSError as exc:  # assert the feature is really absent before skipping
            assert exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP)
            pytest.skip(f"kernel has no Landlock ({errno.errorcode[exc.errno]})")
    return abi


def test_landlock_limits_reads_and_forbids_writes_and_exec(tmp_path: Path, landlock_version: int, loopback_listener: int) -> None:
    readable = tmp_path / "model"
    readable.mkdir()
    (readable / "model.onnx").write_bytes(b"weights")
    writable = tmp_path / "scratch"
    writable.mkdir()
    parent = os.getpid()

    def confined() -> dict[str, object]:
        abi = hardening.apply_landlock([str(readable)], [str(writable)])
        return {
            "abi": abi,
            "read_inside": errno_name(lambda: (readable / "model.onnx").read_bytes()),
            "read_outside": errno_name(lambda: open("/etc/passwd").read()),
            "write_read_only": errno_name(lambda: (readable / "model.onnx").write_bytes(b"evil")),
            "create_read_only": errno_name(lambda: (readable / "new").write_bytes(b"evil")),
            "write_elsewhere": errno_name(lambda: (tmp_path / "escape").write_bytes(b"evil")),
            "write_scratch": errno_name(lambda: (writable / "ok").write_bytes(b"fine")),
            "exec": errno_name(lambda: os.posix_spawn("/bin/true", ["true"], {})),
            "tcp_connect": _connect_loopback(loopback_listener),
            "signal_parent": errno_name(lambda: os.kill(parent, 0)),
        }

    result = value_of(run_in_child(confined))
    assert isinstance(result, dict)
    assert result["abi"] == landlock_version
    assert result["read_inside"] == "ok" and result["write_scratch"] == "ok"
    for denied in ("read_outside", "write_read_only", "create_read_only", "write_elsewhere", "exec"):
        assert result[denied] == "EACCES", (denied, result)
    if landlock_version >= 4:
        assert result["tcp_connect"] == "EACCES"
    if landlock_version >= 6:
        assert result["signal_parent"] == "EPERM"
    assert (readable / "model.onnx").read_bytes() == b"weights" and not (tmp_path / "escape").exists()


def test_landlock_refuses_to_run_after_threads_start(tmp_path: Path, landlock_version: int) -> None:
    def with_thread() -> str:
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        try:
            hardening.apply_landlock([str(tmp_path)])
        except SandboxError as exc:
            return str(exc)
        finally:
            stop.set()
        return "applied"

    assert "before any thread starts" in str(value_of(run_in_child(with_thread)))
    outcome = run_in_child(lambda: hardening.apply_landlock([str(tmp_path / "missing")]))
    assert outcome.error is not None and "SandboxError" in outcome.error


# ---------------------------------------------------------------- introspection


def test_describe_sandbox_outside_and_inside() -> None:
    outside = hardening.describe_sandbox()
    assert outside["proc_readable"] and outside["seccomp_mode"] == 0 and not outside["all_threads_filtered"]
    assert set(outside["rlimits"]) == {"as", "nofile", "fsize", "core"}

    def under_boot() -> dict[str, object]:
        threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()
        return hardening.describe_sandbox()

    inside = value_of(run_in_child(under_boot, policy="boot"))
    assert isinstance(inside, dict)
    assert inside["seccomp_mode"] == 2 and inside["no_new_privs"] and inside["all_threads_filtered"]
    assert len(inside["threads"]) == 2  # type: ignore[arg-type]

    # under the serve policy /proc cannot be opened: describe says so instead of dying
    serving = value_of(run_in_child(hardening.describe_sandbox, policy="worker"))
    assert isinstance(serving, dict) and serving["proc_readable"] is False and set(serving) == {"pid", "proc_readable"}


def test_malloc_trim_reports_a_bool() -> None:
    assert isinstance(hardening.malloc_trim(), bool)
