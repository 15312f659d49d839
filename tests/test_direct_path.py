"""The direct path (docs/PROTOCOL.md section 17) against a real daemon: leases, attach, infer straight to
a worker, and what happens when leases expire, a reload revokes them, a worker retires or dies.
Each rule is checked from the client's side with the Python client and, where the client would hide it,
on the raw protocol."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import onnx
import psutil
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, wait_for, world_readable_dir
from direct_peer import Peer, attach, lease_of, unread_by_peer, worker_pid
from openinfer.client import AsyncClient, Client, OpenInferError, WorkerCrashed
from openinfer.wire import zmtp
from repo_builder import ModelRepo, make_world_readable

pytestmark = pytest.mark.live

DIRECT = {"OPENINFER_POOL_DIRECT": "1"}
X = np.ones((1, 64), np.float32)
SLOW = {"x": np.zeros(1, np.float32), "n": np.array(3_000_000, np.int64)}  # a few seconds of Loop iterations


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-direct-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    (root / "tiny" / "config.toml").write_text("workers = 2\n")
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\n")
    onnx_builders.busy_loop_model(root / "capped" / "1" / "model.onnx")
    (root / "capped" / "config.toml").write_text("workers = 1\nmax_compute_ms = 2000\n")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def expected(x: np.ndarray, daemon: RunningDaemon) -> np.ndarray:
    with Client(daemon.address, direct=False) as front:
        return front.infer("tiny", {"x": x}).outputs["y"]


def operations(daemon: RunningDaemon) -> dict[str, Any]:
    with Client(daemon.address, direct=False) as admin:
        return admin.stats()["operations"]


def raw_request(address: str, frames: list[bytes], timeout: float = 10) -> dict[str, Any]:
    """One request on a fresh hand-written ZMTP connection; the reply header."""
    import select

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address[len("ipc://") :])
    sock.setblocking(False)
    stream = zmtp.FrameStream(sock, zmtp.Limits(message_bytes=1 << 30), handshake=True, socket_type=b"DEALER", accept_types=frozenset({b"ROUTER"}))
    deadline = time.monotonic() + timeout
    try:
        stream.send(frames)
        while True:
            assert time.monotonic() < deadline, "no reply"
            select.select([sock], [sock] if stream.out_bytes else [], [], 0.1)
            stream.flush()
            for event in stream.read():
                header = msgpack.unpackb(event[0])
                if not header.get("goaway"):
                    return header  # type: ignore[no-any-return]
    finally:
        stream.close()


def front_lease(daemon: RunningDaemon, model: str = "tiny") -> dict[str, Any]:
    with Client(daemon.address, direct=False) as client:
        return client._call("lease", model=model)  # the raw result, as a client in any language sees it


def test_infer_goes_to_a_worker_and_answers_as_the_front_door(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    rng = np.random.default_rng(3)
    with Client(daemon.address) as client:
        for _ in range(20):
            x = rng.standard_normal((3, 64)).astype(np.float32)
            result = client.infer("tiny", {"x": x})
            np.testing.assert_array_equal(result.outputs["y"], expected(x, daemon))
            assert "dispatch_us" not in result.timing and {"queue_us", "compute_us", "total_us"} <= set(result.timing)
    ops = operations(daemon)
    assert ops["lease"]["OK"] >= 1 and ops["infer"]["OK"] >= 40  # 20 direct + 20 through the front door
    with Client(daemon.address, direct=False) as admin:
        tiny = admin.stats()["models"]["tiny"]
    assert tiny["requests"] >= 40  # every direct request is counted (exactly: stats flushes the workers first)


def test_stats_count_every_direct_request_exactly(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    with Client(daemon.address) as client:
        for _ in range(37):
            client.infer("tiny", {"x": X})
        stats = client.stats()
    assert stats["models"]["tiny"]["requests"] == 37 and stats["clients"]["uid=0"]["requests"] == 37


def test_a_lease_is_useless_to_another_uid(daemon_factory: Any, repo: Path) -> None:
    from other_uid import NOBODY, run_as

    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    lease = front_lease(daemon)  # issued to uid 0
    address = lease["workers"][0]["address"]
    stolen = run_as(NOBODY, """
        import select
        token = bytes.fromhex(sys.argv[2])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sys.argv[1][len("ipc://"):])
        sock.setblocking(False)
        stream = zmtp.FrameStream(sock, zmtp.Limits(), handshake=True, socket_type=b"DEALER", accept_types=frozenset({b"ROUTER"}))
        stream.send([msgpack.packb({"v": 1, "id": 1, "op": "attach", "lease": token})])
        replies = []
        while not replies:
            select.select([sock], [], [], 5)
            replies = stream.read()
        print(json.dumps(msgpack.unpackb(replies[0][0])["error"]))
    """, address, lease["lease"].hex())
    assert stolen.returncode == 0, stolen.stderr
    assert '"PERMISSION_DENIED"' in stolen.stdout and "uid=0" in stolen.stdout


def test_nothing_but_attach_is_read_before_a_lease_and_forged_leases_fail(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    lease = front_lease(daemon)
    address = lease["workers"][0]["address"]
    header = {"v": 1, "id": 5, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}
    assert raw_request(address, [msgpack.packb(header), X.tobytes()])["error"]["code"] == "PERMISSION_DENIED"
    forged = bytearray(lease["lease"])
    forged[-1] ^= 1
    reply = raw_request(address, [msgpack.packb({"v": 1, "id": 6, "op": "attach", "lease": bytes(forged)})])
    assert reply["error"]["code"] == "PERMISSION_DENIED"
    assert raw_request(address, [msgpack.packb({"v": 1, "id": 7, "op": "stats"})])["error"]["code"] == "INVALID_ARGUMENT"


def test_expiring_leases_are_renewed_without_a_failed_request(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_LEASE_TTL_S": "1.2"})
    with Client(daemon.address) as client:
        until = time.monotonic() + 4  # several lease lifetimes
        done = 0
        while time.monotonic() < until:
            client.infer("tiny", {"x": X})
            done += 1
    assert operations(daemon)["lease"]["OK"] >= 3 and done > 0


class Traffic:
    """One client asking `ask` over and over on a thread, from `with` to its end: what it got back, and
    what failed (each error's text)."""

    def __init__(self, address: str, ask: Callable[[Client], Any]) -> None:
        self.answers: list[Any] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, ask))

    def _run(self, address: str, ask: Callable[[Client], Any]) -> None:
        with Client(address) as client:
            while not self._stop.is_set():
                try:
                    self.answers.append(ask(client))
                except OpenInferError as exc:
                    self.failures.append(str(exc))

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_a_reload_revokes_leases_and_no_request_fails(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    with Traffic(daemon.address, lambda client: client.infer("tiny", {"x": X})) as traffic:
        wait_for(lambda: operations(daemon).get("lease", {}).get("OK", 0) >= 1, 20, "a lease")
        before = daemon.log_text().count('"repository synced"')
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.log_text().count('"repository synced"') > before, 20, "the reload")
        wait_for(lambda: operations(daemon)["lease"]["OK"] >= 2, 20, "a new lease after the reload")
    assert traffic.failures == []


def test_a_replaced_model_moves_clients_to_the_new_workers_without_a_failed_request(daemon_factory: Any, tmp_path: Path) -> None:
    root = world_readable_dir("oi-direct-swap-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx", seed=1)
    make_world_readable(root)
    daemon = daemon_factory(root, env=DIRECT)
    with Traffic(daemon.address, lambda client: client.infer("tiny", {"x": X}).outputs["y"][0, :2].copy()) as traffic:
        versions_seen = traffic.answers
        wait_for(lambda: len(versions_seen) > 10, 20, "traffic")
        first = versions_seen[-1]
        onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx", seed=2)  # same version, new file: replaced
        make_world_readable(root)
        with Client(daemon.address, direct=False) as admin:
            admin.reload()
        wait_for(lambda: not np.array_equal(versions_seen[-1], first), 60, "the replacement to serve")
        n = len(versions_seen)
        wait_for(lambda: len(versions_seen) > n + 20, 20, "more traffic on the replacement")
    shutil.rmtree(root, ignore_errors=True)
    assert traffic.failures == []
    assert "goaway" not in "".join(traffic.failures)


def replace_and_reload(daemon: RunningDaemon, root: Path, model_path: Path, name: str = "busy") -> None:
    """The same graph with new bytes in place of version 1 of `name`, and a reload: a replacement."""
    model = onnx.load(model_path)
    model.doc_string = "the same graph, new bytes: a replacement"
    onnx.save(model, model_path)
    make_world_readable(root)
    with Client(daemon.address, direct=False) as admin:
        assert f"{name}:1" in admin.reload()["replaced"]


def test_an_async_client_moves_to_the_replacement_after_a_goaway_without_an_error(daemon_factory: Any) -> None:
    """Round 10's attacker: after any GOAWAY, AsyncClient's next request raised a raw ValueError (it closed
    the retired worker's connection, then asked the event loop to stop watching its fd: -1 by then), and
    the fd, still registered, made a later request wait out its whole timeout. Every request across a
    replacement of a one-worker model must be answered, typed, and soon."""
    root = world_readable_dir("oi-direct-async-goaway-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx", seed=1)
    (root / "tiny" / "config.toml").write_text("workers = 1\n")
    make_world_readable(root)
    daemon = daemon_factory(root, env=DIRECT)

    async def across_a_replacement() -> tuple[list[str], float]:
        outcomes: list[str] = []
        slowest = 0.0
        async with AsyncClient(daemon.address, timeout=10) as client:
            first = (await client.infer("tiny", {"x": X})).outputs["y"].copy()
            onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx", seed=2)
            make_world_readable(root)
            with Client(daemon.address, direct=False) as admin:
                admin.reload()
            switched_at = None
            ends = time.monotonic() + 60
            while time.monotonic() < ends and (switched_at is None or time.monotonic() < switched_at + 1):
                started = time.monotonic()
                try:
                    y = (await client.infer("tiny", {"x": X})).outputs["y"]
                    outcomes.append("OK")
                    if switched_at is None and not np.array_equal(y, first):
                        switched_at = time.monotonic()
                except OpenInferError as exc:
                    outcomes.append(exc.code)
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.02)  # a client's pace, not a wait for a condition
        return outcomes, slowest

    outcomes, slowest = asyncio.run(across_a_replacement())
    shutil.rmtree(root, ignore_errors=True)
    assert set(outcomes) == {"OK"} and len(outcomes) > 10, outcomes
    assert slowest < 5, slowest


@dataclass
class OneBusyWorker:
    """A daemon serving `busy` (onnx_builders.busy_loop_model) with one worker, on the direct path."""

    daemon: RunningDaemon
    root: Path
    model_path: Path
    us_per_iteration: float  # measured on this machine, now

    def inputs(self, seconds: float) -> dict[str, np.ndarray]:
        """A request that runs about `seconds`."""
        return {"x": np.zeros(1, np.float32), "n": np.array(int(seconds * 1e6 / self.us_per_iteration), np.int64)}


def one_busy_worker(daemon_factory: Any, prefix: str, config: str = "") -> OneBusyWorker:
    root = world_readable_dir(prefix)
    model_path = onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\n" + config)
    make_world_readable(root)
    daemon = daemon_factory(root, env=DIRECT)
    with Client(daemon.address, timeout=60) as client:
        us_per_iteration = client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(200_000, np.int64)}).timing["compute_us"] / 200_000
    return OneBusyWorker(daemon, root, model_path, us_per_iteration)


def test_a_reload_lets_a_long_direct_run_on_a_retired_worker_finish(daemon_factory: Any) -> None:
    """Replacing a model retires its worker; a request running there past the retirement's 5 s grace is
    answered, not failed: the daemon kills a retired worker only once it runs nothing (or at its run's
    max_compute_ms). Round 9's attacker: a 7 s run was killed 5 s after the reload, WORKER_CRASHED, on
    the Python and C clients alike."""
    busy = one_busy_worker(daemon_factory, "oi-direct-long-run-")
    daemon, root, model_path = busy.daemon, busy.root, busy.model_path
    eight_seconds = busy.inputs(8)  # it outlasts the new worker's start plus the 5 s grace
    n = int(eight_seconds["n"])
    outcome: list[Any] = []

    def long_run() -> None:
        with Client(daemon.address, timeout=60) as client:
            try:
                outcome.append(client.infer("busy", eight_seconds))
            except OpenInferError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=long_run)
    thread.start()
    old_pid = worker_pid(daemon, "busy")
    cpu = psutil.Process(old_pid).cpu_times
    before = sum(cpu()[:2])
    wait_for(lambda: sum(cpu()[:2]) > before + 0.3, 20, "the long run to be under way")
    replace_and_reload(daemon, root, model_path)
    thread.join(60)
    shutil.rmtree(root, ignore_errors=True)
    assert len(outcome) == 1 and not isinstance(outcome[0], OpenInferError), outcome
    assert float(outcome[0].outputs["y"][0]) == float(n)
    wait_for(lambda: worker_pid(daemon, "busy") != old_pid, 30, "the replacement to serve alone")


def test_a_retired_workers_queue_is_answered_or_sent_elsewhere_never_lost(daemon_factory: Any) -> None:
    """Round 10's attacker: a retired worker ran what was still queued after its drain in one pass that
    held every reply, and the daemon killed it a max_compute_ms after its grace: computed answers were
    lost, and their requests failed DEADLINE_EXCEEDED ('still running past max_compute_ms') though none
    ran a second. Now it answers what it never started as an expired lease, which every client sends
    again on a new lease: 24 requests queued across a replacement all succeed."""
    busy = one_busy_worker(daemon_factory, "oi-direct-retired-queue-", "max_compute_ms = 2000\n")
    daemon, root, model_path = busy.daemon, busy.root, busy.model_path
    # 4x under max_compute_ms, and 24 of them outlast the drain (4 s) 3x and the old kill (QUIT + 6 s): a
    # calibration on a loaded machine that then quietens (0.25 s each once ran all 32 within the drain)
    half_second = busy.inputs(0.5)
    n = int(half_second["n"])

    async def across_a_replacement() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=60) as client:
            runs = [asyncio.ensure_future(client.infer("busy", half_second)) for _ in range(24)]
            await asyncio.sleep(0.5)  # they are queued on the one worker: now the replacement
            replace_and_reload(daemon, root, model_path)
            return await asyncio.gather(*runs, return_exceptions=True)

    outcomes = asyncio.run(across_a_replacement())
    shutil.rmtree(root, ignore_errors=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failed, failed
    assert all(float(o.outputs["y"][0]) == float(n) for o in outcomes)
    # The books: 25 requests, all answered OK; those sent back are `resent`, never PERMISSION_DENIED
    with Client(daemon.address, direct=False) as admin:
        versions = admin.stats()["models"]["busy"]["versions"].values()
    assert sum(v["requests"] for v in versions) == sum(v["success"] for v in versions) == 25, list(versions)
    assert sum(v.get("resent", 0) for v in versions) > 0, list(versions)  # 24 runs of 0.5 s outlast the 4 s drain


def test_a_reload_while_the_worker_runs_a_front_door_request_fails_no_direct_request(daemon_factory: Any) -> None:
    """Round 14's attacker: a model served on both paths, one worker: at each reload the old worker was
    killed as its front-door task ended, failing the direct requests it held WORKER_CRASHED (4 a reload).
    It was retired while still BUSY (the dispatcher retires a worker as its last task ends), and the
    supervisor sent QUIT - GOAWAY, drain - only to a READY one, killing any other at once."""
    busy = one_busy_worker(daemon_factory, "oi-direct-mixed-reload-")
    daemon, root, model_path = busy.daemon, busy.root, busy.model_path
    inputs = busy.inputs(0.02)
    failures: list[str] = []
    served = {"front door": 0, "direct": 0}
    stop = threading.Event()

    def front_door() -> None:
        with Client(daemon.address, timeout=30, direct=False) as client:
            while not stop.is_set():
                try:
                    client.infer("busy", inputs)
                    served["front door"] += 1
                except OpenInferError as exc:
                    failures.append(f"front door: {exc}")

    async def direct() -> None:
        async with AsyncClient(daemon.address, timeout=30) as client:
            async def one_at_a_time() -> None:
                while not stop.is_set():
                    try:
                        await client.infer("busy", inputs)
                        served["direct"] += 1
                    except OpenInferError as exc:
                        failures.append(f"direct: {exc}")

            await asyncio.gather(*(one_at_a_time() for _ in range(4)))

    threads = [threading.Thread(target=front_door), threading.Thread(target=lambda: asyncio.run(direct()))]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: served["front door"] > 5 and served["direct"] > 20, 30, "traffic on both paths")
        with Client(daemon.address, direct=False) as admin:
            for _ in range(2):
                replace_and_reload(daemon, root, model_path)
                wait_for(lambda: not admin.status()["retiring"], 30, "the old worker gone")
            before = dict(served)
            wait_for(lambda: served["front door"] > before["front door"] + 5 and served["direct"] > before["direct"] + 20, 30, "traffic on the last replacement")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        shutil.rmtree(root, ignore_errors=True)
    assert not failures, failures


def test_a_front_door_task_sent_behind_a_direct_run_is_not_killed_for_the_time_it_waited(daemon_factory: Any) -> None:
    """Round 16's attacker: a front-door task sent to a worker in the middle of a direct run waits for it
    (the supervisor does not see direct runs), and its max_compute_ms was counted from when it was sent:
    two runs of 0.7 x max_compute_ms back to back got the worker killed and the front-door request failed
    'past its model's max_compute_ms'. It counts from when the direct run ended (the deadline page). Runs of
    0.55 x max_compute_ms here: together past it, each within it on a host as much as 1.8x slower than
    calibrated (at 0.7 x, a run of the suite in two processes stopped the second at 2,018 ms)."""
    busy = one_busy_worker(daemon_factory, "oi-direct-behind-", "max_compute_ms = 2000\n")
    daemon, root = busy.daemon, busy.root
    worker = psutil.Process(worker_pid(daemon, "busy"))

    def run(path: str, inputs: dict[str, np.ndarray], outcomes: dict[str, str]) -> None:
        with Client(daemon.address, timeout=30, direct=path == "direct") as client:
            try:
                client.infer("busy", inputs)
                outcomes[path] = "OK"
            except OpenInferError as exc:
                outcomes[path] = str(exc)

    for attempt in range(3):
        # A host more than 1.8x slower than its calibration stops a run of its own at max_compute_ms (the
        # worker kept): not the fault looked for. Calibrated again, at most three times (a run of the
        # suite in two processes, an attacker beside it: the front door's own 1.1 s run took 2,020 ms).
        if attempt:
            with Client(daemon.address, timeout=30) as client:
                busy.us_per_iteration = client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(200_000, np.int64)}).timing["compute_us"] / 200_000
        inputs = busy.inputs(1.1)
        outcomes: dict[str, str] = {}
        cpu_before = sum(worker.cpu_times()[:2])
        direct = threading.Thread(target=run, args=("direct", inputs, outcomes))
        direct.start()
        wait_for(lambda: sum(worker.cpu_times()[:2]) - cpu_before > 0.05, 10, "the direct run under way")
        run("front door", inputs, outcomes)  # sent now: it waits for the direct run, then runs 1.1 s of its own
        direct.join(30)
        own_run_stopped = "of running: past its deadline" in outcomes.get("front door", "") and worker.is_running()
        if not own_run_stopped:
            break
    shutil.rmtree(root, ignore_errors=True)
    assert outcomes == {"direct": "OK", "front door": "OK"}, outcomes
    assert worker.is_running(), "the worker was killed"


def test_a_front_door_task_is_not_killed_behind_a_direct_batch_run_again_member_by_member(daemon_factory: Any) -> None:
    """Round 18's attacker: a direct batch stopped at max_compute_ms runs its members again alone (only
    a guilty one should fail); they ran one after another in the same turn of the worker's loop, each up
    to max_compute_ms, and a front-door task sent meanwhile waited past the one direct run the supervisor
    allows for: it failed 'past its model's max_compute_ms', its worker killed. The members now run one
    a turn of the loop, and the front-door task takes its turn between them."""
    root = world_readable_dir("oi-direct-batch-again-")
    onnx_builders.row_loop_model(root / "rows" / "1" / "model.onnx")
    (root / "rows" / "config.toml").write_text("workers = 1\nmax_compute_ms = 300\n\n[batching]\nmax_batch_size = 8\n")
    make_world_readable(root)
    daemon = daemon_factory(root, env=DIRECT)
    endless = {"x": np.array([[1e9]], np.float32)}  # a Loop of 1e9 iterations: stopped at max_compute_ms
    worker = psutil.Process(worker_pid(daemon, "rows"))
    stopped: list[str] = []

    async def batch_of_endless_runs() -> None:
        async with AsyncClient(daemon.address, timeout=60) as client:
            for outcome in await asyncio.gather(*(client.infer("rows", endless) for _ in range(8)), return_exceptions=True):
                stopped.append(type(outcome).__name__)

    cpu_before = sum(worker.cpu_times()[:2])
    attack = threading.Thread(target=lambda: asyncio.run(batch_of_endless_runs()))
    attack.start()
    try:
        wait_for(lambda: sum(worker.cpu_times()[:2]) - cpu_before > 0.05, 10, "the batch under way")
        with Client(daemon.address, timeout=30, direct=False) as client:
            answer = client.infer("rows", {"x": np.array([[1.0]], np.float32)})
    finally:
        attack.join(60)
        shutil.rmtree(root, ignore_errors=True)
    assert answer.outputs["y"].tolist() == [[2.0]]
    assert stopped == ["DeadlineExceeded"] * 8, stopped
    assert worker.is_running(), "the worker was killed"


def served_versions(daemon: RunningDaemon, model: str) -> list[int]:
    with Client(daemon.address, direct=False) as admin:
        return [row["version"] for row in admin.models() if row["name"] == model]


def test_a_new_version_under_version_policy_latest_takes_over_without_a_failed_request(daemon_factory: Any) -> None:
    """Round 13's attacker: with version_policy = "latest", adding version 2 dropped version 1 at once,
    and every request answered UNAVAILABLE "model tiny:2 is loading" until version 2 was ready (1,052
    failures of one client in 0.84 s; thousands across the C, sync and async clients). Version 1 now
    serves until version 2 does."""
    root = world_readable_dir("oi-direct-latest-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx", seed=1)
    (root / "tiny" / "config.toml").write_text('workers = 1\nversion_policy = "latest"\n')
    make_world_readable(root)
    daemon = daemon_factory(root, env=DIRECT)
    try:
        with Traffic(daemon.address, lambda client: client.infer("tiny", {"x": X}).version) as traffic:
            versions = traffic.answers
            wait_for(lambda: len(versions) > 10, 20, "traffic")
            onnx_builders.matmul_model(root / "tiny" / "2" / "model.onnx", seed=2)
            make_world_readable(root)
            with Client(daemon.address, direct=False) as admin:
                admin.reload()
            wait_for(lambda: versions[-1] == 2, 60, "version 2 to serve")
            n = len(versions)
            wait_for(lambda: len(versions) > n + 20, 20, "more traffic on version 2")
            wait_for(lambda: served_versions(daemon, "tiny") == [2], 30, "version 1 to leave")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert traffic.failures == [], traffic.failures[:3]


def test_a_killed_worker_fails_only_what_ran_on_it(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    results: list[str] = []

    def slow() -> None:
        with Client(daemon.address, timeout=30) as client:
            try:
                client.infer("busy", SLOW)
                results.append("OK")
            except OpenInferError as exc:
                results.append(exc.code)

    thread = threading.Thread(target=slow)
    thread.start()
    with Client(daemon.address, direct=False) as admin:
        wait_for(lambda: admin.stats()["operations"].get("lease", {}).get("OK", 0) >= 1, 20, "the lease")
        busy = next(w for w in admin.status()["workers"] if w["model"] == "busy")
        wait_for(lambda: _cpu_seconds(busy["pid"]) > 0.5, 20, "the worker to be deep in the run")
        os.kill(busy["pid"], signal.SIGKILL)
        thread.join(30)
        assert results == ["WORKER_CRASHED"]
        wait_for(lambda: any(w["model"] == "busy" and w["state"] == "ready" for w in admin.status()["workers"]), 60, "a replacement")
    with Client(daemon.address) as client:  # the next request takes a new lease and is served
        assert client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(1, np.int64)}).outputs["y"].shape == (1,)


def test_a_worker_gone_while_the_link_was_idle_costs_the_next_request_nothing(daemon_factory: Any, repo: Path) -> None:
    """The blocking client does not read an idle link before it sends: when the worker died in between,
    the send fails (nothing was sent) and the request is served elsewhere - never WORKER_CRASHED, which
    would say it may have run."""
    daemon = daemon_factory(repo, env=DIRECT)
    with Client(daemon.address, timeout=30) as client, Client(daemon.address, direct=False) as admin:
        client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(1, np.int64)})  # a link to the worker
        (old,) = [w["pid"] for w in admin.status()["workers"] if w["model"] == "busy"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: old not in [w["pid"] for w in admin.status()["workers"]], 30, "the killed worker gone")
        assert client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(1, np.int64)}).outputs["y"].shape == (1,)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_direct_request_past_max_compute_ms_is_stopped_by_its_worker(daemon_factory: Any, repo: Path) -> None:
    """capped's max_compute_ms is 2000: a run of ~10 s is stopped by the worker itself (run_watch.py:
    onnxruntime's terminate flag), answered DEADLINE_EXCEEDED naming the limit, long before the client's
    own 60 s; the worker lives on and serves the next request."""
    daemon = daemon_factory(repo, env=DIRECT)
    with Client(daemon.address, direct=False) as admin:
        before = [w["pid"] for w in admin.status()["workers"] if w["model"] == "capped"]
    with Client(daemon.address, timeout=60) as client:
        with pytest.raises(OpenInferError) as failed:
            client.infer("capped", {"x": np.zeros(1, np.float32), "n": np.array(10_000_000, np.int64)}, timeout=60)
        # the worker's own answer naming the limit (the client's timer would say "no reply ... within 60 s")
        assert failed.value.code == "DEADLINE_EXCEEDED" and "max_compute_ms = 2000" in failed.value.message, failed.value.message
        assert client.infer("capped", {"x": np.zeros(1, np.float32), "n": np.array(1, np.int64)}).outputs["y"].shape == (1,)
    with Client(daemon.address, direct=False) as admin:
        assert [w["pid"] for w in admin.status()["workers"] if w["model"] == "capped"] == before  # never killed
        assert admin.stats()["models"]["capped"]["failures"] == {"DEADLINE_EXCEEDED": 1}


def test_the_async_client_uses_the_direct_path_too(daemon_factory: Any, repo: Path) -> None:
    import asyncio

    daemon = daemon_factory(repo, env=DIRECT)

    async def main() -> list[np.ndarray]:
        async with AsyncClient(daemon.address) as client:
            results = await asyncio.gather(*(client.infer("tiny", {"x": X * i}) for i in range(16)))
            return [r.outputs["y"] for r in results]

    outputs = asyncio.run(main())
    for i, y in enumerate(outputs):
        np.testing.assert_array_equal(y, expected(X * i, daemon))
    assert operations(daemon)["lease"]["OK"] >= 1


def test_without_a_direct_path_clients_use_the_front_door(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={"OPENINFER_POOL_DIRECT": "0"})
    with Client(daemon.address) as client:
        for _ in range(3):
            assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
    ops = operations(daemon)
    assert ops["infer"]["OK"] == 3 and ops["lease"] == {"UNAVAILABLE": 1}  # asked once, then never again


def test_an_over_limit_request_is_refused_by_the_client_naming_the_limit(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_MAX_REQUEST_BYTES": "4096"})
    with Client(daemon.address) as client:
        with pytest.raises(OpenInferError) as refused:
            client.infer("tiny", {"x": np.ones((64, 64), np.float32)})  # 16 KiB
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "4096" in refused.value.message
    assert operations(daemon).get("infer", {}).get("RESOURCE_EXHAUSTED", 0) == 0  # never sent


# A pre step that spins for the request's `seconds`, or - asked for a negative number - makes its worker
# exit at once: a poison input.
POISON_STEPS = '''
import os
import time

INPUTS = [{"name": "seconds", "datatype": "FP32", "shape": []}]

def pre(inputs):
    seconds = float(inputs["seconds"])
    if seconds < 0:
        os._exit(70)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return {"x": __import__("numpy").zeros((1, 64), "float32")}
'''


def test_a_request_a_retiring_worker_had_read_is_not_sent_again_when_the_worker_dies_running_it(daemon_factory: Any) -> None:
    """Round 16's suspicion, and the last note's residual risk: a retiring worker still runs what it read
    before its GOAWAY, and a client whose connection then closed with a request unanswered took it for
    one the worker never read and sent it again - a poison input killed the worker that replaced it
    too. The GOAWAY now lists the requests the worker read (it answers one it reads later as a lease
    expiry, never runs it): a listed one is failed WORKER_CRASHED, never sent again. Here the poison is
    read beside a 4 s run, the model is replaced during that run, and the poison runs after the GOAWAY."""
    repo = ModelRepo("oi-direct-poison-")
    model_path = repo.model("poison", onnx_builders.matmul_model, config='workers = 1\n\n[steps]\nmodule = "steps.py"\n')
    (repo.root / "poison" / "steps.py").write_text(POISON_STEPS)
    daemon = daemon_factory(repo.ready(), env=DIRECT)
    lease = lease_of(daemon, "poison")
    blocker = Peer(lease["workers"][0]["address"])  # holds the worker while the client's two requests arrive

    def seconds(value: float) -> dict[str, Any]:
        return {"seconds": np.array(value, np.float32)}

    def worker_states() -> dict[int, str]:
        with Client(daemon.address, direct=False) as admin:
            return {w["pid"]: w["state"] for w in admin.status()["workers"]}

    async def poison_read_before_a_goaway() -> tuple[list[Any], int]:
        async with AsyncClient(daemon.address, timeout=60) as client:
            await client.infer("poison", seconds(0))  # the client's connection, attached, before the worker is held
            (link,) = client._core.links.values()
            assert "error" not in (blocker.ask(attach(lease["lease"])) or {"error": "closed"})
            blocker.stream.send([msgpack.packb({"v": 1, "id": 2, "op": "infer", "inputs": [{"name": "seconds", "datatype": "FP32", "shape": []}]}), np.array(1.5, np.float32).tobytes()])
            await asyncio.to_thread(wait_for, lambda: blocker.stream.flush() or not unread_by_peer(blocker.stream.sock), 30, "the worker reading the blocking request")
            long_run = asyncio.ensure_future(client.infer("poison", seconds(4)))
            poison = asyncio.ensure_future(client.infer("poison", seconds(-1)))
            # both wait in the socket behind the blocker, and are read together when it ends: then the 4 s run
            # (both sent first: under load the futures may not have run yet when the socket is first looked at,
            # and two requests the worker reads only after its GOAWAY are rightly sent to its replacement)
            sent_and_read = lambda: len(link.pending) == 2 and not link.stream.out_bytes and not unread_by_peer(link.stream.sock)  # noqa: E731
            await asyncio.to_thread(wait_for, sent_and_read, 30, "the worker reading both requests")
            (old_pid,) = worker_states()
            await asyncio.to_thread(replace_and_reload, daemon, repo.root, model_path, "poison")
            states = await asyncio.to_thread(wait_for, lambda: (s := worker_states()).get(old_pid) == "draining" and len(s) == 2 and s, 30, "the replacement ready and the old worker retired")
            assert not long_run.done(), "the 4 s run ended before the retirement: the poison did not run after a GOAWAY"
            (new_pid,) = set(states) - {old_pid}
            return await asyncio.gather(long_run, poison, return_exceptions=True), new_pid

    try:
        (answered, poisoned), new_pid = asyncio.run(poison_read_before_a_goaway())
        final = wait_for(lambda: s if list((s := worker_states()).values()) == ["ready"] else None, 30, "the retired worker gone, one ready")
    finally:
        blocker.close()
        repo.remove()
    assert not isinstance(answered, BaseException), answered
    assert isinstance(poisoned, WorkerCrashed), poisoned
    assert final == {new_pid: "ready"}, f"the replacement was killed by the poison sent again: {final}"

