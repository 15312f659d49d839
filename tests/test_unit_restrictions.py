"""The daemon under the restrictions the systemd unit imposes, reproduced without systemd: a private
network namespace (PrivateNetwork=yes: only path-based ipc:// works) and a read-only model repository
and Python installation (ProtectSystem=strict, ReadOnlyPaths=)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import wait_for, world_readable_dir
from other_uid import call_as
from openinfer.client import Client, OpenInferError
from repo_builder import make_world_readable

pytestmark = pytest.mark.live


def wait_serving(daemon: subprocess.Popen[bytes], client: Client, log: Path, what: str) -> None:
    """Until `client` hears the daemon ready; fails at once, with its log, if it exits."""

    def ready() -> bool:
        assert daemon.poll() is None, log.read_text()[-3000:]
        try:
            return bool(client.health()["ready"])
        except OpenInferError:
            return False  # not listening yet

    wait_for(ready, 60, what)


def test_serves_in_a_private_network_namespace_with_read_only_files(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "reproducing the unit's namespaces needs root (CI runs as root)"
    repo = world_readable_dir("oi-unit-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    run = world_readable_dir("oi-unit-run-")
    address = f"ipc://{run}/openinfer.sock"
    prefix = Path(sys.prefix)
    script = (
        f"mount --bind -o ro {repo} {repo} && mount -o remount,bind,ro {repo} && "
        f"mount --bind {prefix} {prefix} && mount -o remount,bind,ro {prefix} && "
        f"exec {sys.executable} -m openinfer.daemon.cli serve --models {repo} --socket {address}"
    )
    env = dict(os.environ, OPENINFER_SERVER_RUNTIME_DIR=str(run / "rt"))
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with Client(address, timeout=2) as client:
            wait_serving(daemon, client, tmp_path / "daemon.log", "the daemon in its private namespaces to be ready")
            assert client.infer("tiny", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape == (1, 64)
            # The daemon sees no network but loopback (down): its namespace differs from ours.
            assert os.readlink(f"/proc/{daemon.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0
        log.close()
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)


DAEMON_UID = 40010  # no account: the daemon as the shipped unit runs it, a user of its own, not root


def _make_reachable(paths: list[Path], scratch: Path) -> str:
    """Shell lines for a private mount namespace in which `paths` can be reached by any uid: each ancestor
    others may not enter (here /root, mode 0700, holds the interpreter) is covered by a tmpfs holding only
    the needed child, bound from the original. Nothing outside the namespace changes."""
    lines: list[str] = []
    hidden: dict[Path, set[str]] = {}
    for path in paths:
        for ancestor in [*reversed(path.parents)][1:]:  # from the top, / aside
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, set()).add(path.relative_to(ancestor).parts[0])
                break
    for number, (ancestor, children) in enumerate(sorted(hidden.items())):
        keep = scratch / f"keep-{number}"  # the original, still reachable by root under the tmpfs
        lines += [f"mkdir -p {keep}", f"mount --bind {ancestor} {keep}", f"mount -t tmpfs -o mode=0755 tmpfs {ancestor}"]
        for child in sorted(children):
            lines += [f"mkdir -p {ancestor}/{child}", f"mount --bind {keep}/{child} {ancestor}/{child}"]
    return " && ".join(lines) or "true"


def start_unprivileged(repo: Path, run: Path, scratch: Path, env: dict[str, str] | None = None, config: Path | None = None) -> subprocess.Popen[bytes]:
    """`openinfer serve` as DAEMON_UID on `repo`, its socket in `run` (direct path on, the socket open to
    every uid), its output in scratch/daemon.log."""
    assert os.geteuid() == 0, "starting a daemon as another uid needs root (CI runs as root)"
    os.chown(run, DAEMON_UID, DAEMON_UID)
    checkout = Path(__file__).resolve().parents[1]
    reachable = _make_reachable([Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(os.path.realpath(sys.base_prefix)), checkout], scratch)
    script = (
        f"{reachable} && exec setpriv --reuid={DAEMON_UID} --regid={DAEMON_UID} --clear-groups "
        f"{sys.executable} -m openinfer.daemon.cli serve --models {repo} --socket ipc://{run}/openinfer.sock"
        + (f" --config {config}" if config is not None else "")
    )
    environ = dict(os.environ, OPENINFER_SERVER_RUNTIME_DIR=str(run / "rt"), OPENINFER_POOL_DIRECT="1", OPENINFER_SERVER_SOCKET_MODE="0o666", **(env or {}))
    with open(scratch / "daemon.log", "wb") as log:
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=environ)


@contextmanager
def unprivileged_daemon(repo: Path, scratch: Path, env: dict[str, str] | None = None, config: Path | None = None) -> Iterator[Client]:
    """A daemon running as DAEMON_UID (start_unprivileged), and a root client of it once it is ready;
    stopped on exit."""
    run = world_readable_dir("oi-unit-nonroot-run-")
    daemon = start_unprivileged(repo, run, scratch, env, config)
    try:
        with Client(f"ipc://{run}/openinfer.sock", timeout=10) as client:
            wait_serving(daemon, client, scratch / "daemon.log", "the daemon running as a user of its own to be ready")
            yield client
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(run, ignore_errors=True)


def test_a_daemon_not_run_as_root_serves_other_uids_on_the_direct_path(tmp_path: Path) -> None:
    """Workers of a daemon that is not root entered a user namespace for their network and IPC namespaces,
    and inside it SO_PEERCRED reports every uid they do not map as 65534: each lease was refused ("issued
    to uid=0, not to this connection's uid=65534") - the direct path failed for every client of the shipped
    unit, which runs the daemon as its own user - and a lease issued to uid 65534 held for any uid. A worker
    with a direct endpoint enters no user namespace now."""
    repo = world_readable_dir("oi-unit-nonroot-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    try:
        with unprivileged_daemon(repo, tmp_path) as client:
            for _ in range(3):
                result = client.infer("tiny", {"x": np.ones((1, 64), np.float32)})
                assert "dispatch_us" not in result.timing, result.timing  # answered by the worker: the direct path
            (worker,) = [w for w in client.status()["workers"] if w["model"] == "tiny"]
            assert worker["sandbox"]["uid"][0] == DAEMON_UID and "user" not in worker["sandbox"].get("namespaces_entered", []), worker["sandbox"]
            # Its workers are its own uid: none of them (nor any process of that uid) reads its memory.
            supervisor = client.status()["pid"]

            def read_supervisor() -> str:
                try:
                    with open(f"/proc/{supervisor}/environ", "rb") as environ:
                        return f"read {len(environ.read())} bytes"
                except OSError as exc:
                    return exc.strerror or ""

            assert call_as(DAEMON_UID, read_supervisor) == "Permission denied"
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_a_version_directory_the_daemon_may_no_longer_enter_fails_no_reload(tmp_path: Path) -> None:
    """Round 41: for a daemon not run as root, an old version directory made root's 0700 (a version
    "retired" by chmod) raised PermissionError out of every reload - Path.exists() raises on EACCES - half
    way: a model deleted from disk served on, a chain whose member withdrew its consent served on, a new
    model was never added, reload after reload."""
    repo = world_readable_dir("oi-unit-nonroot-")
    onnx_builders.matmul_model(repo / "m" / "1" / "model.onnx")
    (repo / "m" / "config.toml").write_text('version_policy = "latest"\n')
    onnx_builders.matmul_model(repo / "gone" / "1" / "model.onnx")
    make_world_readable(repo)
    x = np.ones((1, 64), np.float32)
    try:
        with unprivileged_daemon(repo, tmp_path) as client:
            onnx_builders.matmul_model(repo / "m" / "2" / "model.onnx", seed=3)
            shutil.rmtree(repo / "gone")
            onnx_builders.matmul_model(repo / "fresh" / "1" / "model.onnx")
            make_world_readable(repo)
            (repo / "m" / "1").chmod(0o700)  # root's: the daemon may no longer enter it
            changes = client.reload()
            assert "fresh:1" in changes["added"] and "gone:1" in changes["removed"], changes
            with pytest.raises(OpenInferError) as caught:
                client.infer("gone", {"x": x})
            assert caught.value.code == "NOT_FOUND", str(caught.value)
            wait_for(lambda: any(row["name"] == "fresh" and row["state"] == "ready" for row in client.models()), 60, "the new model to load")
            assert client.infer("fresh", {"x": x}).outputs["y"].shape == (1, 64)
            # The repository itself out of reach: the reload says so and keeps what it serves.
            repo.chmod(0o700)
            failed = client.reload()["failed"]
            assert any("Permission denied" in reason for reason in failed), failed
            assert client.infer("fresh", {"x": x}).outputs["y"].shape == (1, 64)
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_a_daemon_not_run_as_root_will_not_give_its_uid_to_workers_without_landlock(tmp_path: Path) -> None:
    """Round 42: not root, the daemon gives its workers its own uid, and with Landlock off a hostile steps
    module read the daemon's CURVE secret key and metrics token (and, the supervisor then dumpable, its
    memory: the master lease key, a lease for a model the access policy denied). It refuses to start so,
    saying why and what to do - unless told to, knowingly."""
    repo = world_readable_dir("oi-unit-nonroot-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    run = world_readable_dir("oi-unit-nonroot-run-")
    daemon = start_unprivileged(repo, run, tmp_path, {"OPENINFER_SANDBOX_LANDLOCK": "false"})
    try:
        wait_for(lambda: daemon.poll() is not None, 60, "the daemon to refuse to start")
        assert daemon.returncode == 1
        said = (tmp_path / "daemon.log").read_text()
        assert "without Landlock (sandbox.landlock = false)" in said and "sandbox.shared_uid_without_landlock" in said, said[-2000:]
        with unprivileged_daemon(repo, tmp_path, {"OPENINFER_SANDBOX_LANDLOCK": "false", "OPENINFER_SANDBOX_SHARED_UID_WITHOUT_LANDLOCK": "true"}) as client:
            assert client.infer("tiny", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape == (1, 64)
        assert "workers run as the daemon's uid without Landlock" in (tmp_path / "daemon.log").read_text()
        # Nor at a reload: sandbox.landlock applies to new workers, and a reload turning it off is refused.
        config = run / "openinfer.toml"
        config.write_text("[sandbox]\nlandlock = true\n")
        config.chmod(0o644)
        with unprivileged_daemon(repo, tmp_path, config=config) as client:
            # Alone, and beside restart-only values the reload keeps at their running ones (round 45: the
            # check read the file's `enabled = false` / `shared_uid_without_landlock = true`, both then
            # reverted, and let `landlock = false` through).
            for beside in ("", "enabled = false\n", "shared_uid_without_landlock = true\n"):
                config.write_text(f"[sandbox]\nlandlock = false\n{beside}")
                with pytest.raises(OpenInferError) as caught:
                    client.reload()
                assert "without Landlock (sandbox.landlock = false)" in str(caught.value), (beside, str(caught.value))
    finally:
        if daemon.poll() is None:  # (it started: the code before the fix)
            daemon.terminate()
            daemon.wait(30)
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
