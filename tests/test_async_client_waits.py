"""How AsyncClient bounds its waits, on a real event loop, in process: the one timer for every direct
wait (openinfer.client.give_up_timer) and the deadline-bounded lock before a lease or a new link.

The timer's first form scanned every waiting request at each firing: thousands of waits ending one by one
cost a scan each, quadratic in all (an attacker measured 3.6 s of CPU for 20,000 waits 200 µs apart). These
tests hold what replaced it to the same promises: each wait ends once, in order, never before its time, an
answered one never, and the bookkeeping stays bounded by the requests in flight."""
from __future__ import annotations

import asyncio
import time

import pytest

from openinfer.client.async_client import _take_turn
from openinfer.client.give_up_timer import REBUILD_SLACK, GiveUpTimer

pytestmark = pytest.mark.unit


def test_each_wait_ends_once_in_order_never_early_and_an_answered_one_never() -> None:
    async def run() -> tuple[list[int], list[int], set[int]]:
        fired: list[int] = []
        early: list[int] = []
        when: dict[int, float] = {}

        def due(request_id: int) -> None:
            if time.monotonic() < when[request_id]:
                early.append(request_id)
            fired.append(request_id)

        timer = GiveUpTimer(due)
        start = time.monotonic() + 0.05
        # Armed out of order (later ones first, then earlier), as requests of mixed timeouts are.
        for request_id in [*range(200, 400), *range(0, 200)]:
            when[request_id] = start + request_id * 0.0005
            timer.arm(request_id, when[request_id])
        answered = set(range(0, 400, 3))
        for request_id in answered:
            timer.disarm(request_id)
        while len(fired) < 400 - len(answered):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # nothing more may come
        timer.stop()
        return fired, early, answered

    fired, early, answered = asyncio.run(run())
    assert early == []
    assert fired == sorted(fired) and len(fired) == len(set(fired))
    assert set(fired) == set(range(400)) - answered


def test_the_heap_stays_bounded_by_the_requests_in_flight() -> None:
    """A client at c = 8 answering 10,000 requests leaves no more than about twice those in flight (plus a
    fixed slack) behind, however long their give-ups are."""

    async def run() -> int:
        timer = GiveUpTimer(lambda request_id: None)
        far = time.monotonic() + 3600
        largest = 0
        for request_id in range(10_000):
            timer.arm(request_id, far + request_id)
            if request_id >= 8:
                timer.disarm(request_id - 8)
            largest = max(largest, len(timer._order))
        timer.stop()
        return largest

    assert asyncio.run(run()) <= 2 * 9 + REBUILD_SLACK + 1


def test_a_wait_armed_on_a_second_event_loop_still_ends() -> None:
    """A timer set on a loop that ended never fires: arming on a new loop sets it there, even for a
    give-up later than the one the dead timer was set for."""
    timer_box: list[GiveUpTimer] = []
    fired: list[int] = []

    async def first() -> None:
        timer_box.append(GiveUpTimer(fired.append))
        timer_box[0].arm(1, time.monotonic() + 0.01)  # the loop ends before this fires

    async def second() -> None:
        timer_box[0].arm(2, time.monotonic() + 0.03)
        for _ in range(400):
            if len(fired) == 2:
                return
            await asyncio.sleep(0.005)

    asyncio.run(first())
    asyncio.run(second())
    assert fired == [1, 2]


def test_the_lock_wait_is_bounded_even_just_after_a_release() -> None:
    """Just after a release, before the waiter it woke has run, the lock reads unlocked: an acquire then
    queued behind that waiter without a bound, for as long as it held the lock (found by session 10's
    attacker: a 0.5 s request waited 5.7 s). A 0.2 s wait arriving then must give up at its deadline,
    before the next holder lets go a second later."""

    async def run() -> tuple[bool, bool]:
        lock = asyncio.Lock()
        await lock.acquire()
        released = asyncio.Event()

        async def next_holder() -> None:
            assert await _take_turn(lock, time.monotonic() + 30)
            await asyncio.sleep(1.0)
            released.set()
            lock.release()

        holder = asyncio.ensure_future(next_holder())
        while not lock._waiters:  # until it waits in the lock
            await asyncio.sleep(0.001)
        lock.release()  # wakes that waiter, which has not run yet
        took = await _take_turn(lock, time.monotonic() + 0.2)
        gave_up_first = not released.is_set()
        if took:
            lock.release()
        await holder
        return took, gave_up_first

    took, gave_up_first = asyncio.run(run())
    assert not took and gave_up_first
