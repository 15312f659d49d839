"""Start and stop a real `openinfer serve` in a subprocess on a temporary ipc:// path."""
from __future__ import annotations

import json

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from openinfer.client import Client, OpenInferError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_MODELS = REPO_ROOT / "examples" / "models"
POLL_INTERVAL_S = 0.02

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, *, daemon: "RunningDaemon | None" = None) -> T:
    """Poll `condition` until it returns something truthy and return that: the one way tests wait for
    something to happen (never a fixed sleep). Fails naming `what` and the last value seen (plus the
    tail of `daemon`'s log) after `timeout` seconds, which only bounds a hang: it is never what a test
    asserts."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            log = f"\n{daemon.log_text()[-3000:]}" if daemon is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {repr(value)[:500]}){log}")
        time.sleep(POLL_INTERVAL_S)


_scratch_root: Path | None = None


def scratch_root() -> Path:
    """The one directory (per test process) that holds every dir world_readable_dir makes: the session
    removes it as a whole when it passes (tests/conftest.py), instead of leaving ~40 daemon directories
    and repositories in /tmp per run."""
    global _scratch_root
    if _scratch_root is None:
        _scratch_root = Path(tempfile.mkdtemp(prefix="oi-tests-"))
        _scratch_root.chmod(0o755)
    return _scratch_root


def made_scratch_root() -> Path | None:
    return _scratch_root


def world_readable_dir(prefix: str) -> Path:
    """A temp dir workers can read after dropping to `nobody` (pytest's tmp_path is 0700 root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))
    path.chmod(0o755)
    return path


@dataclass
class RunningDaemon:
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    _clients: list[Client] = field(default_factory=list)

    def client(self, **kwargs: object) -> Client:
        client = Client(self.address, **kwargs)  # type: ignore[arg-type]
        self._clients.append(client)
        return client

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> dict:  # type: ignore[type-arg]
        """Ask `health` through the client until ready; fails at once if the daemon exits or every
        model failed to load."""
        with Client(self.address, timeout=2.0) as client:

            def ready() -> dict | None:  # type: ignore[type-arg]
                if self.process.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
                try:
                    health = client.health()
                except OpenInferError:
                    return None  # not listening yet
                if not health["ready"] and not health["not_ready"] and health["failed"]:
                    raise RuntimeError(f"every model failed to load: {health['failed']}\n{self.log_text()[-4000:]}")
                return health if health["ready"] else None

            return wait_for(ready, timeout, "the daemon to be ready", daemon=self)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL of the process group if it does not exit."""
        clients, self._clients = self._clients, []
        try:
            for client in clients:
                client.close()
        finally:
            self._stop_process(timeout)
        return self.process.returncode

    def _stop_process(self, timeout: float) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


DAEMON_ENTRY = ("-m", "openinfer.daemon.cli")


def log_records(daemon: RunningDaemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines, in the order it wrote them."""
    records = []
    for line in daemon.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def start_daemon(
    models: Path,
    *extra: str,
    env: dict[str, str | None] | None = None,
    wait: bool = True,
    timeout: float = 90.0,
    address: str | None = None,
    entry: Sequence[str] = DAEMON_ENTRY,
    cwd: Path | None = None,
    launcher: Sequence[str] = (),
) -> RunningDaemon:
    """`entry`: what the interpreter runs before `serve ...` (a test may wrap the real CLI, e.g. to make the
    processes the daemon spawns misbehave); `env` entries set to None are removed from the environment;
    `cwd`: the daemon's working directory (default: the test's); `launcher`: a command in front of the
    interpreter (e.g. `prlimit --nofile=256:256`)."""
    workdir = world_readable_dir("oi-d-")  # clients of other uids must reach the socket inside
    address = address or f"ipc://{workdir}/openinfer.sock"
    log_path = workdir / "daemon.log"
    full_env = dict(os.environ)
    full_env.pop("OPENINFER_SOCKET", None)
    full_env["OPENINFER_SERVER_RUNTIME_DIR"] = str(workdir / "run")
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*launcher, sys.executable, *entry, "serve", "--models", str(models), "--socket", address, *extra],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            cwd=cwd,
        )
    daemon = RunningDaemon(address=address, process=process, log_path=log_path, workdir=workdir)
    if wait:
        try:
            daemon.wait_ready(timeout)
        except Exception:
            daemon.stop()
            raise
    return daemon


def cleanup_workdir(daemon: RunningDaemon) -> None:
    shutil.rmtree(daemon.workdir, ignore_errors=True)
