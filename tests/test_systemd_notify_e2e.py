"""The notify protocol end to end: this test plays systemd on a datagram socket."""
from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from daemon_harness import start_daemon, wait_for, world_readable_dir
import onnx_builders
from repo_builder import make_world_readable

pytestmark = pytest.mark.live


def receive(sock: socket.socket, timeout: float) -> list[tuple[float, str]]:
    """All datagrams that arrive within `timeout` seconds, with their arrival times."""
    out: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except socket.timeout:
            break
    return out


def test_ready_watchdog_status_reload_and_stopping(tmp_path: Path) -> None:
    repo = world_readable_dir("oi-notify-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    daemon = start_daemon(repo, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}, wait=False)
    try:
        messages: list[tuple[float, str]] = []
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for _, m in messages) and time.monotonic() < deadline:
            messages += receive(systemd, 0.5)
        ready = [m for _, m in messages if "READY=1" in m]
        assert ready, messages
        assert "STATUS=serving 1 model versions" in ready[0]
        # READY only after workers were ready: the daemon answers at once.
        assert daemon.client().health()["ready"] is True
        # WATCHDOG=1 from the loop at about half of WatchdogSec (0.2 s).
        pings = [t for t, m in receive(systemd, 2.0) if m == "WATCHDOG=1"]
        assert 6 <= len(pings) <= 14, len(pings)
        # A wedged loop (stopped process) sends nothing; it resumes afterwards.
        daemon.process.send_signal(signal.SIGSTOP)
        wait_for(lambda: psutil.Process(daemon.process.pid).status() == psutil.STATUS_STOPPED, 10, "the daemon stopped")
        receive(systemd, 0.1)  # what it sent before it stopped
        assert not [m for _, m in receive(systemd, 1.0) if m == "WATCHDOG=1"]
        daemon.process.send_signal(signal.SIGCONT)
        assert [m for _, m in receive(systemd, 1.0) if m == "WATCHDOG=1"]
        # Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
        daemon.process.send_signal(signal.SIGHUP)
        after = [m for _, m in receive(systemd, 2.0) if m != "WATCHDOG=1"]
        assert any(m.startswith("RELOADING=1") and "MONOTONIC_USEC=" in m for m in after), after
        assert any("READY=1" in m for m in after), after
        assert daemon.client().infer("tiny", {"x": np.ones((1, 64), np.float32)}).version == 1
        daemon.process.send_signal(signal.SIGTERM)
        final = [m for _, m in receive(systemd, 3.0)]
        assert any(m.startswith("STOPPING=1") for m in final), final
        assert daemon.process.wait(30) == 0
    finally:
        daemon.stop()
        systemd.close()


def test_unusable_notify_socket_fails_loudly(tmp_path: Path) -> None:
    repo: Any = world_readable_dir("oi-notify-bad-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    daemon = start_daemon(repo, env={"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}, wait=False)
    assert daemon.process.wait(30) == 1
    assert "NOTIFY_SOCKET" in daemon.log_text() and "unusable" in daemon.log_text()


def until_ready(systemd: socket.socket, daemon: Any, timeout: float = 90) -> list[str]:
    """What the daemon tells systemd up to READY=1 (an assertion error if it never comes)."""
    said: list[str] = []
    deadline = time.monotonic() + timeout
    while not any("READY=1" in m for m in said):
        assert time.monotonic() < deadline and daemon.process.poll() is None, said
        said += [m for _, m in receive(systemd, 0.5)]
    return said


def test_ready_comes_when_the_last_model_to_load_fails(tmp_path: Path) -> None:
    """READY=1 was sent only when a worker became ready: a model whose worker failed to load after the
    others were ready (a steps module that raises, a model onnxruntime refuses) kept a Type=notify service
    from ever starting - systemd kills it at TimeoutStartSec and restarts it, again and again. Here the
    only model fails: no worker ever becomes ready, so it is the last to settle without any ordering. Now
    READY=1 comes with the failure, naming the model that does not serve."""
    repo: Any = world_readable_dir("oi-notify-fail-")
    onnx_builders.matmul_model(repo / "bad" / "1" / "model.onnx")
    (repo / "bad" / "config.toml").write_text('workers = 1\n\n[steps]\nmodule = "steps.py"\n')
    (repo / "bad" / "steps.py").write_text("raise RuntimeError('this model cannot load')\n")  # (its own code runs as the worker boots)
    make_world_readable(repo)
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    daemon = start_daemon(repo, env={"NOTIFY_SOCKET": str(notify_path)}, wait=False)
    try:
        ready = next(m for m in until_ready(systemd, daemon) if "READY=1" in m)
        assert "serving 0 model versions" in ready and "not serving: bad:1" in ready, ready
        assert daemon.client().health()["ready"] is False
    finally:
        daemon.stop()
        systemd.close()
