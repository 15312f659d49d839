"""The usual batch compute, and the clients whose requests stop batches (rounds 90-93), on both paths.

A request whose deadline falls before the model's batches usually end runs alone (PROTOCOL.md 7.1; the
rules of tests/attack/test_front_door_deadlines.py). That estimate is one average per model over every
batch, whatever the inputs, so each attack here moved it, or went around it, to have one client's
short-timeout requests stop another client's batches, or keep them out of batches: one batch made slow on
purpose (round 90), requests of no work run alone (round 91), batches of cheap requests and a restarted
estimate (round 92), a `sent_ns` set back (round 93). What holds is batch_rules: a batch counts at most
twice the estimate, an estimate no batch confirms is forgotten, and a client one of whose requests stopped a
batch has its short-timeout requests run alone for 10 s."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time
from typing import Any

import numpy as np
import pytest

import onnx_builders
from daemon_harness import wait_for
from other_uid import NOBODY, call_as
from openinfer.client import AsyncClient, Client, DeadlineExceeded
from test_front_door_deadlines import PATHS, _repo

pytestmark = pytest.mark.attack


@pytest.mark.parametrize("direct", PATHS)
def test_a_slow_batch_does_not_keep_short_timeouts_out_of_batches(daemon_factory: Any, direct: bool) -> None:
    """Round 90: the model's usual batch compute, which keeps a request whose deadline falls sooner out of
    batches, was an EWMA that one batch made slow on purpose (two rows of a value that sets the loop
    count, a long timeout) set high - after that every request with a shorter timeout ran alone, and as
    nothing batched nothing brought it down: batching was off for them for good (victims -75 %). A batch
    now counts at most twice the estimate, and an estimate no batch confirms for a second (or twice
    itself) is forgotten. Here: short-timeout requests batch; a ~1 s batch comes (counted little); they
    still batch; then on a fresh worker the first batch takes longer than their timeout (nothing to count
    it against): they batch again once it is forgotten."""
    # (a 20 ms delay: the attacker's two requests, sent together, batch even when read far apart on a loaded machine)
    root = _repo("rows", onnx_builders.row_loop_model, "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 20000\nquiet_us = 0\n")
    x = np.array([[1.0]], np.float32)
    try:
        daemon = daemon_factory(root)

        async def short_ones(client: AsyncClient, rounds: int) -> list[Any]:
            answers: list[Any] = []
            for _ in range(rounds):
                answers += await asyncio.gather(*(client.infer("rows", {"x": x}, timeout=0.15) for _ in range(8)), return_exceptions=True)
            return [got for got in answers if not isinstance(got, BaseException)]

        async def poisoned(client: AsyncClient, steps: float, at_least_us: int) -> None:
            attack = await asyncio.gather(*(client.infer("rows", {"x": np.array([[steps]], np.float32)}) for _ in range(2)))
            assert [got.batch_size for got in attack] == [2, 2] and attack[0].timing["compute_us"] > at_least_us, [got.timing for got in attack]

        async def counted_little() -> list[Any]:
            async with AsyncClient(daemon.address, timeout=30, direct=direct) as client:
                before = await short_ones(client, 5)
                assert sum(got.batch_size > 1 for got in before) > len(before) // 2, "they batch to begin with"
                await poisoned(client, 1.5e6, 300_000)  # ~1 s: counted in full, the estimate would pass their timeout
                return await short_ones(client, 10)

        after = asyncio.run(counted_little())
        assert len(after) > 40, f"{len(after)} of 80 answered"
        batched = sum(1 for got in after if got.batch_size > 1)
        assert batched > len(after) // 2, f"{batched} of {len(after)} short-timeout requests ran in a batch after one slow batch"

        daemon2 = daemon_factory(root)  # a fresh worker: no estimate yet

        async def first_batch_slow() -> tuple[list[Any], float]:
            async with AsyncClient(daemon2.address, timeout=30, direct=direct) as client:
                await poisoned(client, 4e5, 150_000)  # ~0.27 s, more than their timeout: forgotten after a second
                began = time.monotonic()
                while time.monotonic() < began + 20:
                    got = await short_ones(client, 1)
                    if any(each.batch_size > 1 for each in got):
                        return got, time.monotonic() - began
                return [], time.monotonic() - began

        got, waited = asyncio.run(first_batch_slow())
        assert got, f"short-timeout requests never batched again in {waited:.0f} s after the model's first batch took longer than their timeout"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_requests_of_no_work_run_alone_do_not_let_short_timeouts_into_slow_batches(daemon_factory: Any) -> None:
    """Round 91, against round 90's first fix: requests run alone lowered the usual batch compute (a batch
    was taken to cost at least what one of its members costs alone - not when the input sets the
    compute): a client's requests of no work with a 0.2 s timeout, kept out of another client's ~0.4 s
    batches, ran alone, brought the estimate under their timeout, joined those batches and stopped them
    at their deadline (the heavy client's answers/s -35 to -45 %). Run alone, they never lower it: none
    of them is stopped in a batch. On the direct path (the default): the front door's case did not
    reproduce in this short setup before the fix, and the stoppers' test covers it."""
    direct = True
    root = _repo("rows", onnx_builders.row_loop_model, "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 20000\nquiet_us = 0\n")
    try:
        daemon = daemon_factory(root)

        async def scenario() -> tuple[list[Any], list[Any]]:
            async with AsyncClient(daemon.address, timeout=30, direct=direct, client_name="heavy") as heavy, \
                    AsyncClient(daemon.address, timeout=30, direct=direct, client_name="light") as light:
                big = np.array([[6e5]], np.float32)  # ~0.4 s a batch
                await asyncio.gather(*(heavy.infer("rows", {"x": big}) for _ in range(3)))  # the estimate learnt
                until = time.monotonic() + 4.0
                heavy_answers: list[Any] = []
                light_answers: list[Any] = []

                async def heavy_loop() -> None:
                    while time.monotonic() < until:
                        heavy_answers.append(await heavy.infer("rows", {"x": big}))

                async def light_loop() -> None:
                    while time.monotonic() < until:
                        try:
                            light_answers.append(await light.infer("rows", {"x": np.zeros((1, 1), np.float32)}, timeout=0.2))
                        except DeadlineExceeded as exc:
                            light_answers.append(exc)

                await asyncio.gather(*(heavy_loop() for _ in range(3)), *(light_loop() for _ in range(6)))
                return heavy_answers, light_answers

        heavy_answers, light_answers = asyncio.run(scenario())
        assert heavy_answers and light_answers
        # A request of no work that joined a heavy batch was stopped while that ran ("stopped after ... ms"),
        # or ran as long as it; alone (or with its own kind) it runs in well under a millisecond, or expires
        # before it runs, behind a heavy batch.
        in_batches = [got for got in light_answers if isinstance(got, DeadlineExceeded) and got.message.startswith("stopped after")]
        in_batches += [got for got in light_answers if not isinstance(got, BaseException) and got.timing["compute_us"] > 50_000]
        assert not in_batches, f"{len(in_batches)} of {len(light_answers)} short requests ran in (or stopped) the heavy client's batches: {in_batches[:2]}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_requests_that_wait_for_no_company_take_turns_between_identities(daemon_factory: Any) -> None:
    """Round 90: on the direct path, requests that batch with no one (more rows than max_batch_size) were
    taken first-queued-first whatever their identity's turn, and with nothing else queued held for the
    whole max_queue_delay_us: uid 65534 keeping six such requests queued made root's wait the delay (1 s
    here) every time. They now run at once when no batch is held, and in the identities' turns."""
    root = _repo("rows", onnx_builders.row_loop_model, "workers = 1\n[batching]\nmax_batch_size = 4\nmax_queue_delay_us = 1000000\nquiet_us = 0\n")
    try:
        daemon = daemon_factory(root, env={"OPENINFER_SERVER_SOCKET_MODE": "0o666"})
        wide_x = np.full((5, 1), 1.0, np.float32)
        calls: list[tuple[float, float]] = []
        stop = threading.Event()

        def victim() -> None:
            with Client(daemon.address, timeout=10) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    client.infer("rows", {"x": wide_x})
                    calls.append((started, time.monotonic()))

        def attack() -> tuple[float, float]:
            async def stream() -> tuple[float, float]:
                async with AsyncClient(daemon.address, timeout=30) as client:
                    heavy = np.full((5, 1), 1.5e4, np.float32)  # ~20 ms a run
                    await client.infer("rows", {"x": heavy})
                    began = time.monotonic()

                    async def loop() -> None:
                        while time.monotonic() < began + 1.5:
                            await client.infer("rows", {"x": heavy})

                    await asyncio.gather(*(loop() for _ in range(6)))
                    return began, time.monotonic()

            return asyncio.run(stream())

        thread = threading.Thread(target=victim)
        thread.start()
        try:
            wait_for(lambda: len(calls) > 5, 20, "the victim answered")
            began, ended = call_as(NOBODY, attack)
        finally:
            stop.set()
            thread.join(30)
        during = [end - start for start, end in calls if began <= start and end <= ended]
        assert len(during) >= 3, (len(during), calls[-5:])
        assert max(during) < 0.5, sorted(during)[-5:]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(("direct", "backdated"), [pytest.param(False, False, id="front-door"), pytest.param(True, False, id="direct"), pytest.param(True, True, id="direct-sent_ns-set-back")])
def test_a_client_whose_requests_stop_batches_runs_alone_for_a_while(daemon_factory: Any, direct: bool, backdated: bool) -> None:
    """Round 92: the usual batch compute is one average over every batch of the model, whatever the
    inputs - uid 65534 kept 16 cheap requests with a long timeout in flight (full batches of their own
    while root's worker was idle, each taking 10 % off the estimate) and 6 of no work with a 0.25 s
    timeout, which then passed the cutoff, joined root's ~0.4 s batches and stopped them at their
    deadline: root's every burst waited ~0.25 s more than its own compute (25 ms without the attack).
    Once a request of a client has stopped a batch, that client's requests run alone for 10 s
    (batch_rules.BatchStoppers): one stopped batch, not one a burst. Round 93: on the direct path the bar
    was recorded as the time left when the worker read the request but checked against the timeout
    counted from its `sent_ns` - an attacker whose clock read 2 s early (sent_ns set back, timeout 2.25 s:
    the same 0.25 s deadline) passed it every time; both now measure the time left when read."""
    root = _repo("rows", onnx_builders.row_loop_model, "workers = 1\n[batching]\nmax_batch_size = 32\nmax_queue_delay_us = 20000\nquiet_us = 0\n")
    try:
        daemon = daemon_factory(root, env={"OPENINFER_SERVER_SOCKET_MODE": "0o666"})
        stop = threading.Event()
        waits: list[float] = []  # each burst of root's: its latency beyond its own compute, in seconds

        def victim() -> None:
            async def run() -> None:
                async with AsyncClient(daemon.address, timeout=60, direct=direct) as client:
                    big = np.array([[6e5]], np.float32)  # ~0.4 s a batch
                    while not stop.is_set():
                        began = time.monotonic()
                        got = await asyncio.gather(*(client.infer("rows", {"x": big}) for _ in range(3)))
                        waits.append(time.monotonic() - began - got[0].timing["compute_us"] / 1e6)
                        await asyncio.sleep(0.5)

            asyncio.run(run())

        def attack() -> int:
            if backdated:  # this child's clock reads 2 s early: each request's sent_ns says it was sent 2 s ago
                real = time.monotonic_ns
                time.monotonic_ns = lambda: real() - 2_000_000_000  # type: ignore[assignment]

            async def run() -> int:
                nothing = np.zeros((1, 1), np.float32)
                answered = 0
                async with AsyncClient(daemon.address, timeout=60, direct=direct) as client:
                    until = time.monotonic() + 6.0

                    async def cheap() -> None:
                        nonlocal answered
                        while time.monotonic() < until:
                            await client.infer("rows", {"x": nothing})
                            answered += 1

                    async def short() -> None:
                        while time.monotonic() < until:
                            try:
                                await client.infer("rows", {"x": nothing}, timeout=2.25 if backdated else 0.25)
                            except DeadlineExceeded:
                                pass
                            await asyncio.sleep(0.01)

                    await asyncio.gather(*(cheap() for _ in range(16)), *(short() for _ in range(6)))
                return answered

            return asyncio.run(run())

        thread = threading.Thread(target=victim)
        thread.start()
        try:
            wait_for(lambda: len(waits) >= 2, 30, "root's bursts under way")
            before = len(waits)
            assert call_as(NOBODY, attack) > 100, "the attacker's cheap requests were answered"
            during = waits[before:]
        finally:
            stop.set()
            thread.join(60)
        stopped = [round(w, 3) for w in during if w > 0.15]  # a burst's batch stopped at the attacker's 0.25 s
        assert len(during) >= 2 and len(stopped) <= 1, f"root's bursts waited {[round(w, 3) for w in during]} s beyond their own compute"
    finally:
        shutil.rmtree(root, ignore_errors=True)
