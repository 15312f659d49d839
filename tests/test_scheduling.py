"""Scheduling: priorities with aging, fair turns between clients, per-client limits, cancellation."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import world_readable_dir
from openinfer.client import AsyncClient, Client, DeadlineExceeded, OpenInferError, ResourceExhausted

X = np.zeros(1, np.float32)
SLOW = {"x": X, "n": np.array(400_000, np.int64)}  # ~0.3 s of Loop iterations: long enough to queue behind
FAST = {"x": X, "n": np.array(1, np.int64)}


@pytest.fixture
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-sched-")
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\n")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def wait_queued(client: Client, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.status()["queued"] >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"never saw {n} queued")


def test_higher_priority_runs_first_and_low_priority_still_completes(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    admin = daemon.client()
    order: list[str] = []
    lock = threading.Lock()

    def call(label: str, priority: int, feed: dict[str, np.ndarray]) -> None:
        with Client(daemon.address, timeout=60) as client:
            client.infer("busy", feed, priority=priority)
            with lock:
                order.append(label)

    blocker = threading.Thread(target=call, args=("blocker", 0, SLOW))
    blocker.start()
    time.sleep(0.05)
    threads = []
    for i, (label, priority) in enumerate([("low-1", 0), ("low-2", 0), ("high", 9)]):
        t = threading.Thread(target=call, args=(label, priority, SLOW))
        t.start()
        threads.append(t)
        wait_queued(admin, i + 1)
    for t in [blocker, *threads]:
        t.join(60)
    assert order[0] == "blocker"
    assert order[1] == "high", order
    assert set(order[2:]) == {"low-1", "low-2"}


def test_aging_serves_a_low_priority_request_under_a_high_priority_flood(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_STARVATION_MS": "300"})
    stop = threading.Event()

    def flood() -> None:
        with Client(daemon.address, timeout=60) as client:
            while not stop.is_set():
                client.infer("busy", SLOW, priority=9)

    flooders = [threading.Thread(target=flood) for _ in range(3)]
    for t in flooders:
        t.start()
    time.sleep(0.3)
    try:
        # Served while the flood goes on (it stops only after this returns): aging, within a 20 s budget.
        low = daemon.client(timeout=20).infer("busy", FAST, priority=0)
    finally:
        stop.set()
        for t in flooders:
            t.join(60)
    assert float(low.outputs["y"][0]) == 1.0


def test_clients_take_turns_so_a_flood_does_not_starve_another_client(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    admin = daemon.client()
    done: list[str] = []
    lock = threading.Lock()

    async def flood() -> None:
        async with AsyncClient(daemon.address, client_name="flood", timeout=120) as client:
            async def one(i: int) -> None:
                await client.infer("busy", SLOW)
                with lock:
                    done.append(f"flood-{i}")

            await asyncio.gather(*(one(i) for i in range(12)))

    flood_thread = threading.Thread(target=lambda: asyncio.run(flood()))
    flood_thread.start()
    wait_queued(admin, 8)
    other = Client(daemon.address, client_name="other", timeout=60)
    other.infer("busy", SLOW)
    with lock:
        done.append("other")
    other.close()
    flood_thread.join(120)
    position = done.index("other")
    assert position <= 3, done  # took its turn after at most a couple of flood requests, not after all 12


def test_per_client_limit_from_policy_file(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "clients.toml"
    policy.write_text('[default]\nmax_in_flight = 64\n\n[clients."greedy"]\nmax_in_flight = 2\n')
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
    outcomes: list[str] = []

    async def greedy() -> None:
        async with AsyncClient(daemon.address, client_name="greedy", timeout=60) as client:
            async def one() -> None:
                try:
                    await client.infer("busy", SLOW)
                    outcomes.append("OK")
                except ResourceExhausted as exc:
                    assert "max_in_flight=2" in exc.message
                    outcomes.append(exc.code)

            await asyncio.gather(*(one() for _ in range(8)))

    thread = threading.Thread(target=lambda: asyncio.run(greedy()))
    thread.start()
    time.sleep(0.2)
    polite = daemon.client(client_name="polite")
    assert float(polite.infer("busy", FAST).outputs["y"][0]) == 1.0
    thread.join(60)
    assert outcomes.count("OK") >= 2 and outcomes.count("RESOURCE_EXHAUSTED") >= 4, outcomes
    assert polite.stats()["admission"]["rejected"]["max_in_flight"] == outcomes.count("RESOURCE_EXHAUSTED")


def test_rate_limit_names_the_limit(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "clients.toml"
    policy.write_text('[default]\nmax_in_flight = 64\nrate_per_s = 1\nburst = 3\n')
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
    client = daemon.client(client_name="chatty")
    codes = []
    for _ in range(6):
        try:
            client.infer("busy", FAST)
            codes.append("OK")
        except ResourceExhausted as exc:
            assert "rate_per_s=1" in exc.message
            codes.append(exc.code)
    assert codes[:3] == ["OK"] * 3 and "RESOURCE_EXHAUSTED" in codes[3:]


def test_a_client_that_gives_up_cancels_its_queued_task(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    admin = daemon.client()
    blocking_client = daemon.client(timeout=60)
    blocker = threading.Thread(target=lambda: blocking_client.infer("busy", {"x": X, "n": np.array(1_000_000, np.int64)}))
    blocker.start()
    time.sleep(0.1)
    quitter = daemon.client()
    with pytest.raises(DeadlineExceeded):
        quitter.infer("busy", SLOW, timeout=0.05)
    blocker.join(60)
    served = sum(w["tasks_served"] for w in admin.status()["workers"] if w["model"] == "busy")
    assert served == 1  # only the blocker reached the worker
    failures = admin.stats()["models"]["busy"]["failures"]
    assert failures.get("DEADLINE_EXCEEDED") == 1


def test_bad_priority_is_invalid_argument(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    with pytest.raises(OpenInferError) as info:
        daemon.client().infer("busy", FAST, priority=42)
    assert info.value.code == "INVALID_ARGUMENT"
