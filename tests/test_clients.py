"""Client behaviour: no crossed replies across threads or coroutines, timeouts, late replies, restarts."""
from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from openinfer.client import AsyncClient, Client, DeadlineExceeded, InvalidArgument, OpenInferError, Unavailable
from daemon_harness import RunningDaemon
from reference import run_reference

pytestmark = pytest.mark.live


def test_threads_with_their_own_clients_get_their_own_answers(daemon: RunningDaemon, model_repo: Path) -> None:
    model = model_repo / "tiny" / "1" / "model.onnx"
    errors: list[str] = []

    def work(seed: int) -> None:
        with Client(daemon.address) as client:
            for i in range(25):
                x = np.full((1, 64), seed * 100 + i, dtype=np.float32)
                got = client.infer("tiny", {"x": x}).outputs["y"]
                if not np.allclose(got, run_reference(model, {"x": x})["y"], rtol=1e-5):
                    errors.append(f"thread {seed} request {i} got someone else's answer")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_one_shared_client_is_safe_across_threads(daemon: RunningDaemon) -> None:
    client = daemon.client()
    results: dict[int, float] = {}

    def work(seed: int) -> None:
        for _ in range(10):
            y = client.infer("scalar", {"x": np.array([1.0], np.float32), "k": np.array(seed, np.int64)}).outputs["y"]
            results[seed] = float(y[0])

    threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}


def test_async_coroutines_share_one_client_without_crossed_replies(daemon: RunningDaemon) -> None:
    async def main() -> list[tuple[int, float]]:
        async with AsyncClient(daemon.address) as client:
            async def one(k: int) -> tuple[int, float]:
                result = await client.infer("scalar", {"x": np.array([2.0], np.float32), "k": np.array(k, np.int64)})
                return k, float(result.outputs["y"][0])

            return await asyncio.gather(*(one(k) for k in range(40)))

    for k, y in asyncio.run(main()):
        assert y == 2.0 * k


def test_two_async_clients_in_one_loop(daemon: RunningDaemon) -> None:
    async def main() -> None:
        a = AsyncClient(daemon.address, client_name="a")
        b = AsyncClient(daemon.address, client_name="b")
        try:
            ra, rb = await asyncio.gather(
                a.infer("scalar", {"x": np.array([1.0], np.float32), "k": np.array(7, np.int64)}),
                b.infer("scalar", {"x": np.array([1.0], np.float32), "k": np.array(9, np.int64)}),
            )
            assert float(ra.outputs["y"][0]) == 7.0 and float(rb.outputs["y"][0]) == 9.0
            assert (await a.health())["ready"] is True
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_unreachable_daemon_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    with Client(f"ipc://{tmp_path}/none.sock", timeout=0.3) as client:
        with pytest.raises(Unavailable):
            client.infer("tiny", {"x": np.zeros((1, 64), np.float32)})


def test_timeout_then_late_reply_is_discarded(daemon: RunningDaemon) -> None:
    client = daemon.client()
    big = np.random.default_rng(0).random((16, 3, 256, 256), dtype=np.float32)
    with pytest.raises(DeadlineExceeded):
        client.infer("ocr_det", {"x": big}, timeout=0.001)
    # The next call must get its own answer, not the late one.
    result = client.infer("tiny", {"x": np.zeros((1, 64), np.float32)})
    assert result.model == "tiny" and result.outputs["y"].shape == (1, 64)


def test_result_arrays_are_zero_copy_views(daemon: RunningDaemon) -> None:
    y = daemon.client().infer("tiny", {"x": np.zeros((4, 64), np.float32)}).outputs["y"]
    assert not y.flags.owndata


def test_retries_only_unavailable_until_the_daemon_comes_back(model_repo: Path, tmp_path: Path) -> None:
    from daemon_harness import start_daemon

    address = f"ipc://{tmp_path}/late.sock"
    tmp_path.chmod(0o755)
    result: dict[str, Any] = {}

    def call() -> None:
        with Client(address, timeout=60, retries=12) as client:
            result["y"] = client.infer("tiny", {"x": np.zeros((1, 64), np.float32)}).outputs["y"].shape

    thread = threading.Thread(target=call)
    thread.start()  # the daemon is not there yet: UNAVAILABLE, retried with backoff
    daemon = start_daemon(model_repo, address=address)
    try:
        thread.join(60)
        assert result["y"] == (1, 64)
    finally:
        daemon.stop()


def test_an_async_client_used_from_a_second_event_loop_says_so_at_once(daemon: RunningDaemon) -> None:
    """Its direct connections are read by the loop it first ran on: from a second asyncio.run every direct
    reply went unread and each request failed DEADLINE_EXCEEDED after its whole timeout (found by
    session 10's attacker). Now the second loop is refused at once, as the caller's mistake."""
    client = AsyncClient(daemon.address, timeout=30)
    x = {"x": np.zeros((1, 64), np.float32)}

    async def first() -> None:
        assert (await client.infer("tiny", x)).outputs["y"].shape == (1, 64)
        assert client._core.links, "the request went straight to a worker"

    async def second() -> None:
        with pytest.raises(InvalidArgument, match="belongs to the event loop it was first used on"):
            await client.infer("tiny", x, timeout=30)
        with pytest.raises(InvalidArgument, match="belongs to the event loop"):
            await client.health()

    async def close() -> None:
        await client.close()

    asyncio.run(first())
    asyncio.run(second())
    asyncio.run(close())


def test_closing_an_async_client_fails_its_requests_still_taking_a_lease_and_leaves_nothing_open(daemon: RunningDaemon) -> None:
    """A close that comes while requests are still taking their first lease (found by session 10's
    attacker: they went on, opened a direct connection after the close and kept it)."""

    async def main() -> None:
        client = AsyncClient(daemon.address, timeout=30)
        requests = [asyncio.ensure_future(client.infer("tiny", {"x": np.zeros((1, 64), np.float32)})) for _ in range(4)]
        await asyncio.sleep(0)  # each has sent its lease request (one, the others wait for it) and waits
        await client.close()
        outcomes = await asyncio.gather(*requests, return_exceptions=True)
        assert [type(o) for o in outcomes] == [Unavailable] * 4, outcomes
        assert all("client closed" in str(o) for o in outcomes), outcomes
        assert client._core.links == {}

    asyncio.run(main())


@pytest.mark.parametrize("direct", [False, True], ids=["front-door", "direct"])
def test_closing_an_async_client_at_any_moment_of_its_first_requests_ends_each_with_a_typed_answer(daemon: RunningDaemon, direct: bool) -> None:
    """close() a few milliseconds into a fresh client's first requests, at a different moment each round:
    each request ends with a result or an OpenInferError, never a raw ZMQError or OSError (found by
    session 10's second attacker: a front-door send retried on a socket close() had closed, and an
    attach answered during close() let its request send on the closed link), and nothing stays open."""
    moments = random.Random(7)
    outcomes: Counter[str] = Counter()

    async def round_of_four() -> None:
        client = AsyncClient(daemon.address, timeout=5, direct=direct)

        async def one() -> str:
            try:
                await client.infer("tiny", {"x": np.zeros((1, 64), np.float32)})
                return "result"
            except OpenInferError as exc:
                return exc.code
            except Exception as exc:  # what this test is about
                return f"raw {type(exc).__name__}: {exc}"

        requests = [asyncio.ensure_future(one()) for _ in range(4)]
        await asyncio.sleep(moments.uniform(0, 0.004))
        await client.close()
        outcomes.update(await asyncio.gather(*requests))
        assert client._core.links == {}

    for _ in range(25):
        asyncio.run(round_of_four())
    assert set(outcomes) <= {"result", "UNAVAILABLE"}, outcomes
