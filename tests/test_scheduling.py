"""Scheduling in the supervisor: priorities with aging, fair turns between clients, per-client limits,
cancellation. These daemons run without the direct path (pool.direct = false): the tests watch the
supervisor's queue through `status`. A worker's own queue follows the same rules (one TaskQueue):
tests/test_direct_scheduling.py."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

import onnx_builders
from daemon_harness import log_records, wait_for
from openinfer.client import AsyncClient, Client, DeadlineExceeded, OpenInferError, ResourceExhausted
from other_uid import NOBODY, run_as, start_as
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

X = np.zeros(1, np.float32)
SLOW = {"x": X, "n": np.array(400_000, np.int64)}  # ~0.3 s of Loop iterations: long enough to queue behind
BLOCK = {"x": X, "n": np.array(4_000_000, np.int64)}  # ~3 s: others queue behind it even on a busy machine
FAST = {"x": X, "n": np.array(1, np.int64)}
FRONT_DOOR = {"OPENINFER_POOL_DIRECT": "0"}


@pytest.fixture
def repo() -> Iterator[Path]:
    repo = ModelRepo("oi-sched-")
    repo.model("busy", onnx_builders.busy_loop_model, config="workers = 1\n")
    yield repo.ready()
    repo.remove()


def wait_queued(client: Client, n: int) -> None:
    wait_for(lambda: client.status()["queued"] >= n, 20, f"{n} requests queued")


def wait_running(client: Client) -> None:
    wait_for(lambda: client.status()["in_flight"] >= 1, 20, "a request running")


def test_higher_priority_runs_first_and_low_priority_still_completes(daemon_factory: Any, repo: Path) -> None:
    # The order is the daemon's: its access log, written as each task is answered. The order in which the
    # client threads wake on a loaded machine is not (three quick replies arrive together after the blocker).
    daemon = daemon_factory(repo, env={**FRONT_DOOR, "OPENINFER_SERVER_STARVATION_MS": "60000", "OPENINFER_LOG_ACCESS_LOG_SAMPLE": "1"})  # no aging behind the 3 s blocker
    admin = daemon.client()
    answered: list[str] = []

    def call(label: str, priority: int, feed: dict[str, np.ndarray]) -> None:
        with Client(daemon.address, timeout=60, client_name=label) as client:
            client.infer("busy", feed, priority=priority)
            answered.append(label)

    blocker = threading.Thread(target=call, args=("blocker", 0, BLOCK))
    blocker.start()
    wait_running(admin)
    threads = []
    for i, (label, priority) in enumerate([("low-1", 0), ("low-2", 0), ("high", 9)]):
        t = threading.Thread(target=call, args=(label, priority, FAST))
        t.start()
        threads.append(t)
        wait_queued(admin, i + 1)
    for t in [blocker, *threads]:
        t.join(60)
    assert sorted(answered) == ["blocker", "high", "low-1", "low-2"]  # every one answered
    def logged() -> list[str] | None:
        clients = [r["client"].split("@")[0] for r in log_records(daemon) if r.get("msg") == "task" and r.get("model") == "busy"]
        return clients if len(clients) >= 4 else None

    order = wait_for(logged, 10, "the four in the access log")
    assert order[0] == "blocker", order
    assert order[1] == "high", order
    assert set(order[2:]) == {"low-1", "low-2"}


def test_aging_serves_a_low_priority_request_under_a_high_priority_flood(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={**FRONT_DOOR, "OPENINFER_SERVER_STARVATION_MS": "300"})
    stop = threading.Event()

    def flood() -> None:
        with Client(daemon.address, timeout=60) as client:
            while not stop.is_set():
                client.infer("busy", SLOW, priority=9)

    flooders = [threading.Thread(target=flood) for _ in range(3)]
    for t in flooders:
        t.start()
    wait_queued(daemon.client(), 2)  # one flood request runs, the others wait: high priority all along
    try:
        # Served while the flood goes on (it stops only after this returns): aging, within a 20 s budget.
        low = daemon.client(timeout=20).infer("busy", FAST, priority=0)
    finally:
        stop.set()
        for t in flooders:
            t.join(60)
    assert float(low.outputs["y"][0]) == 1.0


def test_clients_take_turns_so_a_flood_does_not_starve_another_client(daemon_factory: Any, repo: Path) -> None:
    """Turns key on the kernel-proven identity: the flood comes from root, the other client is another
    uid (a name a client gives itself is only an accounting label and buys no turns)."""
    daemon = daemon_factory(repo, env={**FRONT_DOOR, "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    admin = daemon.client()
    flood_done = threading.Event()

    async def flood() -> None:
        async with AsyncClient(daemon.address, client_name="flood", timeout=120) as client:
            await asyncio.gather(*(client.infer("busy", SLOW) for _ in range(12)))
        flood_done.set()

    # The other uid's process is up and connected before the count starts: its start-up (0.3-0.5 s, as
    # long as a flood request) once counted toward the flood requests served meanwhile.
    other = start_as(NOBODY, """
        with Client(sys.argv[1], timeout=60) as client:
            client.health()
            print("connected", flush=True)
            sys.stdin.readline()
            print(float(client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(400_000, np.int64)}).outputs["y"][0]), flush=True)
    """, daemon.address)
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "connected"
        flood_thread = threading.Thread(target=lambda: asyncio.run(flood()))
        flood_thread.start()
        wait_queued(admin, 8)
        before = admin.stats()["models"]["busy"]["success"]
        other.stdin.write("go\n")
        other.stdin.flush()
        answer = other.stdout.readline().strip()
        served_meanwhile = admin.stats()["models"]["busy"]["success"] - before
        flood_thread.join(120)
        out, err = other.communicate(timeout=30)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert answer == "400000.0", err  # the loop counts to n
    assert flood_done.is_set()
    # took its turn after at most a few flood requests (the other uid's own one counts too), not after all 12
    assert served_meanwhile <= 4, served_meanwhile


def test_per_client_limit_from_policy_file(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "clients.toml"
    policy.write_text('[default]\nmax_in_flight = 64\n\n[uids."0"]\nmax_in_flight = 2\n')  # root is the greedy one
    daemon = daemon_factory(repo, env={**FRONT_DOOR, "OPENINFER_SERVER_CLIENT_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
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
    wait_for(lambda: outcomes.count("RESOURCE_EXHAUSTED") >= 4, 20, "greedy at its limit")
    polite = run_as(NOBODY, """
        with Client(sys.argv[1], timeout=30) as client:
            print(float(client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(1, np.int64)}).outputs["y"][0]))
    """, daemon.address)
    assert polite.stdout.strip() == "1.0", polite.stderr  # another uid keeps its own budget
    thread.join(60)
    assert outcomes.count("OK") >= 2 and outcomes.count("RESOURCE_EXHAUSTED") >= 4, outcomes
    assert daemon.client().stats()["admission"]["rejected"]["max_in_flight"] == outcomes.count("RESOURCE_EXHAUSTED")


def test_rate_limit_names_the_limit(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "clients.toml"
    policy.write_text('[default]\nmax_in_flight = 64\nrate_per_s = 1\nburst = 3\n')
    daemon = daemon_factory(repo, env={**FRONT_DOOR, "OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
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


class StretchingRelay:
    """Sits between one client and the daemon and forwards everything both ways, but gives every infer
    request it forwards a `timeout_ms` of 10 minutes: the daemon's own deadline can then never be what
    removes a queued request, only a `cancel`. Records the cancels and the daemon's answers to them."""

    def __init__(self, daemon_address: str, path: Path) -> None:
        self.address = f"ipc://{path}"
        self.cancels: dict[int, Any] = {}  # cancel id -> the daemon's result (None until answered)
        self._context = zmq.Context()
        self._front = self._context.socket(zmq.ROUTER)
        self._front.bind(self.address)
        self._back = self._context.socket(zmq.DEALER)
        self._back.connect(daemon_address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stretching-relay", daemon=True)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        peer = b""
        while not self._stop.is_set():
            for sock, _ in poller.poll(20):
                if sock is self._front:
                    peer, *frames = self._front.recv_multipart()
                    header = msgpack.unpackb(frames[0])
                    if header.get("op") == "infer":
                        header["timeout_ms"] = 600_000
                    elif header.get("op") == "cancel":
                        self.cancels[header["id"]] = None
                    self._back.send_multipart([msgpack.packb(header), *frames[1:]])
                else:
                    frames = self._back.recv_multipart()
                    reply = msgpack.unpackb(frames[0])
                    if reply.get("id") in self.cancels:
                        self.cancels[reply["id"]] = reply.get("result")
                    self._front.send_multipart([peer, *frames])

    def __enter__(self) -> "StretchingRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._front.close(linger=0)
        self._back.close(linger=0)
        self._context.term()


def test_a_client_that_gives_up_cancels_its_queued_task(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    """The client's own timeout fires while its request is queued behind a long one: it sends a
    cancel, and the daemon drops the request unrun. The relay makes the daemon's deadline for it 10
    minutes, so nothing but the cancel can explain the request not running."""
    daemon = daemon_factory(repo, env=FRONT_DOOR)
    admin = daemon.client()
    blocking_client = daemon.client(timeout=120)
    blocker = threading.Thread(target=lambda: blocking_client.infer("busy", BLOCK))
    blocker.start()
    try:
        wait_running(admin)
        with StretchingRelay(daemon.address, tmp_path / "relay.sock") as relay, Client(relay.address, timeout=0.3) as quitter:
            with pytest.raises(DeadlineExceeded):
                quitter.infer("busy", SLOW)  # queued behind the blocker; the client gives up after 0.3 s
            wait_for(lambda: relay.cancels and None not in relay.cancels.values(), 20, "the client's cancel, answered by the daemon")
            assert list(relay.cancels.values()) == [{"cancelled": True}], relay.cancels
    finally:
        blocker.join(120)
    wait_for(lambda: admin.status()["queued"] == 0 and admin.status()["in_flight"] == 0, 30, "the daemon to be idle")
    served = sum(w["tasks_served"] for w in admin.status()["workers"] if w["model"] == "busy")
    assert served == 1  # only the blocker reached the worker
    failures = admin.stats()["models"]["busy"]["failures"]
    assert failures == {"DEADLINE_EXCEEDED": 1}  # "cancelled by the client before it ran"


def test_bad_priority_is_invalid_argument(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=FRONT_DOOR)
    with pytest.raises(OpenInferError) as info:
        daemon.client().infer("busy", FAST, priority=42)
    assert info.value.code == "INVALID_ARGUMENT"


def test_a_closed_connection_takes_only_its_own_queued_requests_with_it(daemon_factory: Any, repo: Path) -> None:
    """A connection that closes leaves its queued requests behind it; they leave the queue at once (its
    running ones finish, their replies dropped) and no other connection's go with them. The close looks
    up its own requests only: it walked every queued request of every client, which a client opening and
    closing connections made the supervisor pay for (bench/connection_churn.py: x2.1 with 4,000 queued)."""
    daemon = daemon_factory(repo, env=FRONT_DOOR)
    admin = daemon.client()

    async def scenario() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=60, client_name="blocker") as blocker, AsyncClient(daemon.address, timeout=60, client_name="stays") as stays:
            held = asyncio.ensure_future(blocker.infer("busy", BLOCK))
            await asyncio.to_thread(wait_running, admin)
            leaving = AsyncClient(daemon.address, timeout=60, client_name="leaves")
            gone = [asyncio.ensure_future(leaving.infer("busy", FAST)) for _ in range(5)]
            kept = [asyncio.ensure_future(stays.infer("busy", FAST)) for _ in range(3)]
            await asyncio.to_thread(wait_queued, admin, 8)
            await leaving.close()
            await asyncio.gather(*gone, return_exceptions=True)
            await asyncio.to_thread(wait_for, lambda: admin.status()["queued"] == 3, 20, "the closed connection's five gone from the queue")
            return [await held, *await asyncio.gather(*kept)]

    answered = asyncio.run(scenario())
    assert [float(result.outputs["y"][0]) for result in answered[1:]] == [1.0, 1.0, 1.0]
    assert admin.status()["queued"] == 0
