"""A direct request's timeout covers everything before its send, not only the wait for its reply.

The clients once counted the give-up from the moment of the send, and waited without bound for what comes
before it: this client's other request connecting to the same worker (AsyncClient), the connection's
handshake (Client: the request then went to the front door with a 1 ms budget and failed "no reply within
0.001 s"), or another thread's request on the same Client. A worker running a step it cannot stop answers
none of that until the run ends, so a request with a 1 s timeout waited as long as the run.

Each test holds the model's only worker in a 5 s spin and sends a request with a 1 s timeout: it must fail
DEADLINE_EXCEEDED, saying what it waited for, while the spin still runs (the order of events, not a
duration, is asserted). Each fails on the code before the change: the request ends after the spin."""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

from daemon_harness import wait_for
from openinfer.client import AsyncClient, Client, DeadlineExceeded, InferResult
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

SPIN_S = 5.0  # far longer than the 1 s timeouts below plus any slack, so the order of events is certain
QUICK = {"seconds": np.array(0.0, np.float32)}


@pytest.fixture
def spin_daemon(daemon_factory: Any) -> Iterator[Any]:
    models = ModelRepo("oi-deadlines-")
    models.spinning_model("spin", "workers = 1\nmax_compute_ms = 30000\n")  # its step spins for `seconds`
    yield daemon_factory(models.ready(), env={"OPENINFER_POOL_DIRECT": "1"})
    shutil.rmtree(models.root, ignore_errors=True)


def _worker_cpu_s(worker: psutil.Process) -> float:
    times = worker.cpu_times()
    return float(times.user + times.system)


@contextmanager
def _worker_spinning(address: str, client: Client | None = None) -> Iterator[threading.Thread]:
    """The model's only worker runs a 5 s spin (sent by `client`, else by a client of its own) for the
    body; yields the thread that waits for its reply, and checks that reply afterwards."""
    with Client(address, timeout=30) as watcher:
        worker = psutil.Process(next(w["pid"] for w in watcher.status()["workers"] if w["model"] == "spin"))
    before = _worker_cpu_s(worker)
    results: list[InferResult] = []

    def spin() -> None:
        if client is not None:
            results.append(client.infer("spin", {"seconds": np.array(SPIN_S, np.float32)}, timeout=30))
            return
        with Client(address, timeout=30) as own:
            results.append(own.infer("spin", {"seconds": np.array(SPIN_S, np.float32)}, timeout=30))

    runner = threading.Thread(target=spin, daemon=True)
    runner.start()
    wait_for(lambda: _worker_cpu_s(worker) - before > 0.3, timeout=20, what="the worker to be running the spin")
    yield runner
    runner.join(timeout=60)
    assert [r.outputs["y"].shape for r in results] == [(1, 64)]


def test_a_blocking_client_gives_up_at_its_deadline_on_a_handshake_the_busy_worker_does_not_answer(spin_daemon: Any) -> None:
    with _worker_spinning(spin_daemon.address) as spin, Client(spin_daemon.address, timeout=30) as late:
        with pytest.raises(DeadlineExceeded, match=r"timeout \(1 s\) passed before it was sent: the worker at ipc://\S+ did not complete the connection"):
            late.infer("spin", QUICK, timeout=1)
        assert spin.is_alive(), "the request gave up only after the run it waited behind had ended"
    with Client(spin_daemon.address, timeout=30) as late:  # the worker was only busy: it serves again
        assert late.infer("spin", QUICK).outputs["y"].shape == (1, 64)


def test_a_blocking_client_shared_by_threads_gives_up_at_its_deadline_behind_another_threads_request(spin_daemon: Any) -> None:
    """An infer waits for the other thread's request no longer than its own timeout, and an admin call
    (status) no longer than the client's."""
    with Client(spin_daemon.address, timeout=1) as shared:
        shared.infer("spin", QUICK)  # lease and link ready: only the other thread's request is in the way
        with _worker_spinning(spin_daemon.address, shared) as spin:
            with pytest.raises(DeadlineExceeded, match=r"another thread's request held this client"):
                shared.infer("spin", QUICK, timeout=1)
            with pytest.raises(DeadlineExceeded, match=r"another thread's request held this client"):
                shared.status()
            assert spin.is_alive(), "the request gave up only after the other thread's request had ended"
        assert shared.infer("spin", QUICK).outputs["y"].shape == (1, 64)


def test_an_async_client_gives_up_at_its_deadline_while_its_other_request_still_connects(spin_daemon: Any) -> None:
    """AsyncClient: a request that finds another one connecting to the worker waits for it, but not past
    its own deadline; the connecting request is served once the worker is free."""

    async def two_requests(spin: threading.Thread) -> None:
        async with AsyncClient(spin_daemon.address, timeout=30) as client:
            first = asyncio.ensure_future(client.infer("spin", QUICK, timeout=30))
            for _ in range(2000):  # until it holds the connection's lock, waiting for the handshake
                if any(lock.locked() for lock in client._link_locks.values()):
                    break
                await asyncio.sleep(0.005)
            else:
                pytest.fail("the first request never started connecting")
            with pytest.raises(DeadlineExceeded, match=r"timeout \(1 s\) passed before it was sent: another request of this client was still connecting"):
                await client.infer("spin", QUICK, timeout=1)
            assert spin.is_alive(), "the request gave up only after the run it waited behind had ended"
            assert (await first).outputs["y"].shape == (1, 64)

    with _worker_spinning(spin_daemon.address) as spin:
        asyncio.run(two_requests(spin))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_async_request_cancelled_in_its_handshake_closes_its_connection_at_once(spin_daemon: Any) -> None:
    """AsyncClient connected in an executor thread, which a cancel could not interrupt: the connection to
    the busy worker stayed open, its thread blocked, until the handshake's deadline or the end of the run.
    The handshake now runs on the event loop; a cancel closes the socket at once."""

    async def cancelled_in_handshake() -> tuple[int, int, int]:
        async with AsyncClient(spin_daemon.address, timeout=30) as client:
            await client.status()  # the front door's connection is up: the request adds only its worker's
            baseline = _open_fds()
            request = asyncio.create_task(client.infer("spin", QUICK, timeout=20))
            until = time.monotonic() + 10
            while _open_fds() == baseline:  # the connection to the worker, whose handshake cannot end yet
                assert time.monotonic() < until, "the request never connected to the worker"
                await asyncio.sleep(0.005)
            during = _open_fds()
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            return baseline, during, _open_fds()

    with _worker_spinning(spin_daemon.address) as spin:
        baseline, during, after = asyncio.run(cancelled_in_handshake())
        assert spin.is_alive(), "the client was closed only after the run it waited behind had ended"
    assert during == baseline + 1 and after == baseline, (baseline, during, after)
