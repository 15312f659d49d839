"""What the Python clients do at the edges of the front door's connection (issue #18 item 1): a request
over the daemon's limits is refused before a byte of it is sent, naming the limit and the setting that
raises it (the limits are discoverable in `health`); a connection that drops fails the requests in flight
on it at once, with UNAVAILABLE saying so, instead of each waiting for its timeout."""
from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, start_daemon, wait_for
from openinfer.client import AsyncClient, Client, DeadlineExceeded, OpenInferError, ResourceExhausted, Unavailable
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

LIMIT = 1 << 20  # server.max_request_bytes of the daemon under test: 1 MiB
X = np.ones((1, 64), np.float32)
OVER = np.ones((8192, 64), np.float32)  # 2 MiB of tensor bytes
TIMEOUT_S = 20.0  # the callers' budget: a drop must be reported long before it


@pytest.fixture(scope="module")
def repo() -> Any:
    models = ModelRepo("oi-client-conn-")
    models.model("tiny", onnx_builders.matmul_model)
    models.model("spin", onnx_builders.spin_on_demand_model, config="max_compute_ms = 120000\n")
    yield models.ready()
    models.remove()


@pytest.fixture()
def running(repo: Path) -> Any:
    daemon = start_daemon(repo, env={"OPENINFER_SERVER_MAX_REQUEST_BYTES": str(LIMIT)})
    yield daemon
    daemon.stop()


def oversized_seen(daemon: RunningDaemon) -> int:
    """Messages the daemon read and skipped for their size."""
    return sum(daemon.client().stats()["operations"].get("(oversized)", {}).values())


def test_health_names_the_limits_of_one_request(running: RunningDaemon) -> None:
    assert running.client().health()["limits"] == {"max_request_bytes": LIMIT, "max_header_bytes": 65536, "max_frames": 257}


def test_the_sync_client_refuses_an_over_limit_request_before_sending_it(running: RunningDaemon) -> None:
    client = running.client(direct=False)
    with pytest.raises(ResourceExhausted, match=f"limit is {LIMIT} \\(server.max_request_bytes\\)") as caught:
        client.infer("tiny", {"x": OVER})
    assert caught.value.details == {"limit": LIMIT}
    assert oversized_seen(running) == 0  # never sent: the daemon skipped nothing
    assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


def test_the_async_client_refuses_an_over_limit_request_before_sending_it(running: RunningDaemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(running.address, direct=False) as client:
            with pytest.raises(ResourceExhausted, match="server.max_request_bytes"):
                await client.infer("tiny", {"x": OVER})
            assert (await client.infer("tiny", {"x": X})).outputs["y"].shape == (1, 64)

    asyncio.run(scenario())
    assert oversized_seen(running) == 0


def kill_daemon_when_spinning(daemon: RunningDaemon) -> None:
    """SIGKILL the supervisor once a spin request runs (its workers die with it): the clients'
    connections drop with their requests in flight."""
    watcher = Client(daemon.address, direct=False)
    try:
        wait_for(lambda: any(w["model"] == "spin" and w["state"] == "busy" for w in watcher.status()["workers"]), 30, "a spin request running")
        workers = [w["pid"] for w in watcher.status()["workers"]]
    finally:
        watcher.close()
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()
    for pid in workers:  # PR_SET_PDEATHSIG takes them down; wait, so no worker outlives the test
        try:
            psutil.Process(pid).wait(30)
        except psutil.NoSuchProcess:
            pass


def test_a_dropped_connection_fails_the_sync_clients_request_at_once(running: RunningDaemon) -> None:
    outcome: list[BaseException] = []

    def call() -> None:
        with Client(running.address, direct=False, timeout=TIMEOUT_S) as client:
            try:
                client.infer("spin", {"x": np.ones(1, np.float32)})
            except OpenInferError as exc:
                outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    kill_daemon_when_spinning(running)
    caller.join()  # ends either way: at the drop, or at its own 20 s timeout with DEADLINE_EXCEEDED
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable) and not isinstance(outcome[0], DeadlineExceeded)
    assert "closed while this request was in flight" in outcome[0].message and outcome[0].details == {"connection": "lost"}


def test_a_dropped_connection_fails_every_async_request_in_flight(running: RunningDaemon) -> None:
    async def scenario() -> list[BaseException]:
        async with AsyncClient(running.address, direct=False, timeout=TIMEOUT_S, retries=3) as client:
            calls = [asyncio.ensure_future(client.infer("spin", {"x": np.ones(1, np.float32)})) for _ in range(2)]
            await asyncio.get_running_loop().run_in_executor(None, kill_daemon_when_spinning, running)
            # they end either way: at the drop, or at their own timeout with DEADLINE_EXCEEDED
            return list(await asyncio.gather(*calls, return_exceptions=True))

    errors = asyncio.run(scenario())
    # retries=3 does not resend them: a request lost with its connection may have run
    assert len(errors) == 2 and all(type(e) is Unavailable and e.details == {"connection": "lost"} for e in errors), errors



def test_closing_a_client_twice_is_harmless(running: RunningDaemon) -> None:
    """A client closed by its owner and again by a context manager or a fixture (the harness does)."""
    client = Client(running.address, direct=False)
    assert client.health()["ready"]
    client.close()
    client.close()

    async def scenario() -> None:
        async_client = AsyncClient(running.address, direct=False)
        assert (await async_client.health())["ready"]
        await async_client.close()
        await async_client.close()

    asyncio.run(scenario())


def test_the_daemons_deadline_answer_arrives_before_the_clients_own_timer(running: RunningDaemon) -> None:
    """PROTOCOL.md 10.2: the client waits 10 % of its timeout longer (at least 50 ms), so a request that
    waited out its deadline in the daemon's queue comes back with the daemon's DEADLINE_EXCEEDED, which
    says where the time went, not the client's own "no reply" (which fired exactly at the timeout)."""
    blocker = threading.Thread(target=lambda: _spin_until_the_daemon_stops(running.address), daemon=True)
    blocker.start()  # the spin model's only worker runs it until the daemon stops
    with Client(running.address, direct=False) as admin:
        wait_for(lambda: any(w["model"] == "spin" and w["state"] == "busy" for w in admin.status()["workers"]), 30, "the spin worker busy")
    with Client(running.address, direct=False, timeout=0.3) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            client.infer("spin", {"x": np.ones(1, np.float32)})
    assert "no reply" not in caught.value.message and "queue" in caught.value.message, caught.value.message


def _spin_until_the_daemon_stops(address: str) -> None:
    with Client(address, direct=False, timeout=5.0) as client:  # its deadline ends the run soon after the test
        try:
            client.infer("spin", {"x": np.ones(1, np.float32)})
        except OpenInferError:
            pass  # its deadline, or the daemon stopping under it
