"""Another local user prepares the daemon's runtime directory before it starts (issue #16, finding 11).

The runtime directory holds the worker channel: whoever controls it can swap the instance directory and
receive a replacement worker's HELLO. A user who can create paths where the daemon will look (a shared,
sticky, world-writable temporary directory) creates it first - as uid 65534, through setpriv - or plants a
symlink there; or the directory is simply writable by others. The daemon must refuse to start, say which
path, who owns it and what to do, and put nothing inside it.

Each case is tried where the daemon takes its base from: `server.runtime_dir`, `$RUNTIME_DIRECTORY`
(systemd) and the temporary-directory default (`$TMPDIR/openinfer-<euid>`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon, wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError

pytestmark = [pytest.mark.attack, pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid (setpriv)")]

ATTACKER = 65534
AS_ATTACKER = ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", "--"]


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh directory like /tmp: world-writable and sticky."""
    base = world_readable_dir("oi-attack-tmp-")
    shared = base / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    yield shared
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def models() -> Iterator[Path]:
    root = world_readable_dir("oi-attack-rt-models-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_attacker(*command: str) -> None:
    subprocess.run([*AS_ATTACKER, *command], check=True, timeout=30)


def answers(daemon: RunningDaemon) -> bool:
    """The daemon is up (it made its runtime directory before binding): health answers, ready or not."""
    try:
        with Client(daemon.address, timeout=1.0) as client:
            client.health()
            return True
    except OpenInferError:
        return False


def start_and_judge(models: Path, shared_tmp: Path, env: dict[str, str | None]) -> tuple[RunningDaemon, str]:
    """Start the daemon, wait until it exits or answers; returns it and "exited" or "running"."""
    daemon = start_daemon(models, env=env, wait=False, address=f"ipc://{shared_tmp}/oi.sock")
    try:
        wait_for(lambda: daemon.process.poll() is not None or answers(daemon), 120, "the daemon to exit or answer", daemon=daemon)
    except BaseException:
        daemon.stop()
        cleanup_workdir(daemon)
        raise
    return daemon, "exited" if daemon.process.poll() is not None else "running"


def assert_refused(daemon: RunningDaemon, outcome: str, base: Path, found: str) -> None:
    log = daemon.log_text()
    assert outcome == "exited" and daemon.process.returncode != 0, f"the daemon used {base}:\n{log[-3000:]}"
    assert str(base) in log and found in log, log[-3000:]


def pre_created(base: Path) -> str:
    as_attacker("mkdir", "-m", "0755", str(base))
    return f"owned by uid {ATTACKER}"


def planted_symlink(base: Path) -> str:
    decoy = base.parent.parent / "decoy"  # a private directory of root's: the symlink's owner cannot even enter it
    decoy.mkdir(mode=0o700)
    as_attacker("ln", "-s", str(decoy), str(base))
    return "symlink"


def world_writable(base: Path) -> str:
    base.mkdir()
    base.chmod(0o777)  # ours, but anyone may rename what we put inside
    return "writable by others"


CASES = {"pre-created by another uid": pre_created, "a symlink": planted_symlink, "world-writable": world_writable}


@pytest.mark.parametrize("case", CASES)
def test_configured_runtime_dir_prepared_by_someone_else_is_refused(models: Path, shared_tmp: Path, case: str) -> None:
    base = shared_tmp / "openinfer-run"
    found = CASES[case](base)
    daemon, outcome = start_and_judge(models, shared_tmp, {"OPENINFER_SERVER_RUNTIME_DIR": str(base)})
    try:
        assert_refused(daemon, outcome, base, found)
        assert not os.listdir(base), os.listdir(base)
    finally:
        daemon.stop()
        cleanup_workdir(daemon)


@pytest.mark.parametrize("case", CASES)
def test_default_runtime_dir_in_tmp_prepared_by_someone_else_is_refused(models: Path, shared_tmp: Path, case: str) -> None:
    base = shared_tmp / f"openinfer-{os.geteuid()}"
    found = CASES[case](base)
    env: dict[str, str | None] = {"OPENINFER_SERVER_RUNTIME_DIR": None, "RUNTIME_DIRECTORY": None, "TMPDIR": str(shared_tmp)}
    daemon, outcome = start_and_judge(models, shared_tmp, env)
    try:
        assert_refused(daemon, outcome, base, found)
        assert not os.listdir(base), os.listdir(base)
    finally:
        daemon.stop()
        cleanup_workdir(daemon)


def test_a_runtime_directory_from_the_environment_owned_by_someone_else_is_refused(models: Path, shared_tmp: Path) -> None:
    base = shared_tmp / "systemd-runtime"
    found = pre_created(base)
    env: dict[str, str | None] = {"OPENINFER_SERVER_RUNTIME_DIR": None, "RUNTIME_DIRECTORY": str(base)}
    daemon, outcome = start_and_judge(models, shared_tmp, env)
    try:
        assert_refused(daemon, outcome, base, found)
        assert not os.listdir(base), os.listdir(base)
    finally:
        daemon.stop()
        cleanup_workdir(daemon)


def test_a_private_runtime_dir_of_our_own_is_used(models: Path, shared_tmp: Path) -> None:
    """The control: the same start with a base nobody else prepared serves, and leaves no instance behind."""
    base = shared_tmp / f"openinfer-{os.geteuid()}"
    env: dict[str, str | None] = {"OPENINFER_SERVER_RUNTIME_DIR": None, "RUNTIME_DIRECTORY": None, "TMPDIR": str(shared_tmp)}
    daemon, outcome = start_and_judge(models, shared_tmp, env)
    try:
        assert outcome == "running", daemon.log_text()[-3000:]
        daemon.wait_ready()
        st = os.lstat(base)
        assert st.st_uid == os.geteuid() and not st.st_mode & 0o022, oct(st.st_mode)
        assert [p.name for p in base.iterdir()] == [f"instance-{daemon.process.pid}"]
    finally:
        daemon.stop()
        cleanup_workdir(daemon)
    assert not list(base.iterdir())


@pytest.mark.parametrize("name, kind", [("oi.sock.d", "directory"), ("oi.sock.lock", "file"), ("oi.sock.lock", "directory"), ("oi.sock", "file")])
def test_names_beside_the_socket_taken_by_another_uid_stop_the_start_with_a_reason(models: Path, shared_tmp: Path, name: str, kind: str) -> None:
    """Attacker round 28: in a sticky shared directory another uid takes a name the daemon needs before it
    starts - PATH.d (a directory: the start failed "Is a directory"), PATH.lock (its own file, its flock
    held: "another openinfer daemon is serving"), PATH itself. No directory others can write to can be
    defended against that; the daemon now says which entry, whose, and what to do (PROTOCOL.md 2.3)."""
    taken = shared_tmp / name
    holder = None
    if kind == "directory":  # (round 29: at PATH.lock, the start failed "[Errno 21] Is a directory")
        as_attacker("mkdir", str(taken))
    else:
        as_attacker("touch", str(taken))
        if name.endswith(".lock"):
            holder = subprocess.Popen([*AS_ATTACKER, "flock", str(taken), "sleep", "300"])
            wait_for(lambda: "FLOCK" in Path("/proc/locks").read_text() and _holds_flock(holder.pid), 20, "the attacker to hold the lock")
    try:
        daemon, outcome = start_and_judge(models, shared_tmp, {})
        try:
            assert_refused(daemon, outcome, taken, f"is owned by uid {ATTACKER}, not by root or this daemon")
            assert "before it starts. Remove it, or serve from a directory only root or the daemon can write to" in daemon.log_text()
        finally:
            daemon.stop()
            cleanup_workdir(daemon)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def _holds_flock(pid: int) -> bool:
    """Whether `pid` (setpriv, then flock in its place) or its child holds a flock (/proc/locks names the pid)."""
    pids = {str(pid), *(child for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())}
    return any(line.split()[1] == "FLOCK" and line.split()[4] in pids for line in Path("/proc/locks").read_text().splitlines())
