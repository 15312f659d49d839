"""Hostile models and the live sandbox, from the attacker's side: each fails alone, the rest keeps serving."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, world_readable_dir
from openinfer.client import Client, OpenInferError

X = np.ones((1, 64), np.float32)


@pytest.fixture(scope="module")
def hostile_daemon() -> Iterator[RunningDaemon]:
    from daemon_harness import cleanup_workdir, start_daemon

    root = world_readable_dir("oi-hostile-")
    onnx_builders.matmul_model(root / "good" / "1" / "model.onnx")
    onnx_builders.memory_bomb_model(root / "bomb" / "1" / "model.onnx")
    (root / "bomb" / "config.toml").write_text("memory_limit_mb = 1024\n")
    onnx_builders.endless_loop_model(root / "spin" / "1" / "model.onnx")
    (root / "spin" / "config.toml").write_text("max_compute_ms = 1500\n")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    running = start_daemon(root)
    yield running
    running.stop()
    cleanup_workdir(running)
    shutil.rmtree(root, ignore_errors=True)


class GoodTraffic:
    """A background client hammering the good model; every answer must be a correct success."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stop = threading.Event()
        self.outcomes: list[str] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with Client(self.address, timeout=30) as client:
            expected = client.infer("good", {"x": X}).outputs["y"].copy()
            while not self.stop.is_set():
                try:
                    y = client.infer("good", {"x": X}).outputs["y"]
                    self.outcomes.append("OK" if np.array_equal(y, expected) else "WRONG")
                except OpenInferError as exc:
                    self.outcomes.append(exc.code)

    def __enter__(self) -> "GoodTraffic":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


_ADMINS: dict[str, Client] = {}


def pids_of(daemon: RunningDaemon, model: str) -> list[int]:
    admin = _ADMINS.get(daemon.address)
    if admin is None:
        admin = _ADMINS[daemon.address] = daemon.client()  # closed by the daemon's stop()
    return [w["pid"] for w in admin.status()["workers"] if w["model"] == model and w["state"] in ("ready", "busy")]


def test_memory_bomb_fails_alone_within_its_limit(hostile_daemon: RunningDaemon) -> None:
    peak = [0]
    stop = threading.Event()
    pid = pids_of(hostile_daemon, "bomb")[0]

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], psutil.Process(pid).memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with GoodTraffic(hostile_daemon.address) as good:
        started = time.monotonic()
        with pytest.raises(OpenInferError) as info:
            hostile_daemon.client(timeout=60).infer("bomb", {"x": np.array([1], np.int64)})
        elapsed = time.monotonic() - started
        time.sleep(0.2)
    stop.set()
    sampler.join()
    assert info.value.code in ("RESOURCE_EXHAUSTED", "WORKER_CRASHED"), info.value
    assert elapsed < 30
    assert peak[0] <= 1024 * 2**20  # RLIMIT_AS held it: nowhere near the 10 GB it asked for
    assert good.outcomes and set(good.outcomes) == {"OK"}, set(good.outcomes)


def test_endless_loop_is_killed_at_its_deadline_and_replaced(hostile_daemon: RunningDaemon) -> None:
    old = set(pids_of(hostile_daemon, "spin"))
    assert old
    with GoodTraffic(hostile_daemon.address) as good:
        started = time.monotonic()
        with pytest.raises(OpenInferError) as info:
            hostile_daemon.client(timeout=60).infer("spin", {"x": np.zeros(1, np.float32)})
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 60
        replaced: list[int] = []
        while time.monotonic() < deadline and not replaced:
            replaced = [p for p in pids_of(hostile_daemon, "spin") if p not in old]
            time.sleep(0.05)
    assert replaced, hostile_daemon.log_text()[-3000:]
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in old)
    assert good.outcomes and set(good.outcomes) == {"OK"}


def test_sigsys_death_is_reported_with_the_policy(hostile_daemon: RunningDaemon) -> None:
    pid = pids_of(hostile_daemon, "good")[0]
    os.kill(pid, signal.SIGSYS)  # what the kernel does when a worker makes a forbidden system call
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (pid in pids_of(hostile_daemon, "good") or not pids_of(hostile_daemon, "good")):
        time.sleep(0.05)
    log = hostile_daemon.log_text()
    assert "killed by seccomp (SIGSYS)" in log and '"policy":"worker"' in log
    assert hostile_daemon.client().infer("good", {"x": X}).outputs["y"].shape == (1, 64)


def test_every_worker_thread_is_filtered_unprivileged_and_offline(hostile_daemon: RunningDaemon) -> None:
    supervisor_net = os.readlink(f"/proc/{hostile_daemon.process.pid}/ns/net")
    workers = [w for w in hostile_daemon.client().status()["workers"] if w["state"] in ("ready", "busy")]
    assert workers
    for worker in workers:
        pid = worker["pid"]
        for tid in os.listdir(f"/proc/{pid}/task"):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status, (pid, tid)
        uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4
        assert os.readlink(f"/proc/{pid}/ns/net") != supervisor_net
        assert psutil.Process(pid).net_connections(kind="inet") == []
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(line.startswith("Max address space") and "bytes" in line and "unlimited" not in line for line in limits.splitlines())
        sandbox = worker["sandbox"]
        assert sandbox["seccomp_mode"] == 2 and sandbox["policy"] == "worker" and sandbox["landlock_abi"] >= 1
        assert sandbox["namespaces_entered"] == ["net", "ipc"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"ORT_DISABLE_TELEMETRY=1" in environ and b"HOME=/nonexistent" in environ
    # Telemetry off: onnxruntime's database under ~/.cache/Microsoft was not touched since the daemon started.
    started = psutil.Process(hostile_daemon.process.pid).create_time()
    for home in (Path("/root"), Path("/nonexistent")):
        cache = home / ".cache" / "Microsoft"
        if cache.exists():
            assert all(p.stat().st_mtime < started for p in cache.rglob("*")), cache


def test_sandbox_check_cli_blocks_every_probe_and_flags_a_permissive_policy(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", "sandbox", "check", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    probes = {row["probe"]: row for row in json.loads(done.stdout)}
    assert len(probes) >= 13 and all(row["blocked"] for row in probes.values())
    permissive = tmp_path / "allow-all.toml"
    permissive.write_text('[policy]\ndescription = "allows everything"\ndefault_action = "allow"\n')
    done = subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", "sandbox", "check", "--policy", str(permissive)], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 1
    assert "ALLOWED" in done.stdout
