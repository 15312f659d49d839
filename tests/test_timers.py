"""The supervisor's timer heap: order, cancellation that frees what a timer referenced, the timerfd."""
from __future__ import annotations

import gc
import select
import time
import weakref

import pytest

from daemon_harness import wait_for
from openinfer.daemon.loop.timers import MonotonicTimerFd, TimerHeap

pytestmark = pytest.mark.unit


class Payload:
    """Stands in for a queued task and its tensor frames."""


def test_due_timers_run_in_time_order_and_cancelled_ones_never_run() -> None:
    heap = TimerHeap()
    ran: list[str] = []
    now = time.monotonic_ns()
    heap.call_at(now + 3, lambda: ran.append("c"))
    cancelled = heap.call_at(now + 2, lambda: ran.append("cancelled"))
    heap.call_at(now + 1, lambda: ran.append("a"))
    heap.call_at(now + 10**12, lambda: ran.append("later"))
    heap.cancel(cancelled)
    heap.cancel(cancelled)  # twice is harmless
    wait_for(lambda: time.monotonic_ns() > now + 3, 1, "the first three to be due")
    heap.run_due()
    assert ran == ["a", "c"]
    assert len(heap) == 1


def test_a_timer_that_raises_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    """Round 22's attacker: a reload applied `ping_interval_s = nan` and the ping tick's int(nan) raised out
    of run_due, ending the supervisor's loop - the daemon died with every client's request. The setting
    is refused now (tests/attack/test_reload.py); and a timer that raises is logged, as a handler that
    raises in the loop's dispatch is, and the timers due after it run."""
    heap = TimerHeap()
    ran: list[str] = []
    now = time.monotonic_ns()
    heap.call_at(now + 1, lambda: ran.append("a"))
    heap.call_at(now + 2, lambda: int(float("nan")))
    heap.call_at(now + 3, lambda: ran.append("c"))
    wait_for(lambda: time.monotonic_ns() > now + 3, 1, "all three to be due")
    heap.run_due()
    assert ran == ["a", "c"]
    assert "internal error in a supervisor timer" in caplog.text and "cannot convert float NaN to integer" in caplog.text

def test_cancel_frees_what_the_callback_held_before_the_deadline() -> None:
    heap = TimerHeap()
    payload = Payload()
    alive = weakref.ref(payload)
    timer = heap.call_at(time.monotonic_ns() + 30 * 10**9, lambda p=payload: None)  # type: ignore[misc]
    del payload
    gc.collect()
    assert alive() is not None  # the pending timer holds it
    heap.cancel(timer)
    gc.collect()
    assert alive() is None  # freed now, not in 30 s


def test_cancelled_entries_are_compacted_away() -> None:
    heap = TimerHeap()
    far = time.monotonic_ns() + 10**12
    timers = [heap.call_at(far + i, lambda: None) for i in range(5000)]
    for timer in timers[:4000]:
        heap.cancel(timer)
    assert len(heap) < 2500  # rebuilt once the cancelled were more than half
    assert heap.timeout_ms(1000) == 1000


def test_timerfd_wakes_the_poller_at_the_head_timer_and_not_before() -> None:
    heap = TimerHeap(MonotonicTimerFd())
    assert heap.wakeup is not None
    poller = select.poll()
    poller.register(heap.wakeup.fd, select.POLLIN)
    ran: list[int] = []
    due = time.monotonic_ns() + 300_000  # 300 us: below the poller's millisecond resolution
    heap.call_at(due, lambda: ran.append(time.monotonic_ns()))
    assert heap.timeout_ms(1000) == 1000  # the fd, not the timeout, carries the precision
    assert poller.poll(5000), "the timerfd never fired"
    heap.on_wakeup()
    heap.run_due()
    assert ran and ran[0] >= due
    assert not poller.poll(0)  # one-shot, and read: no busy loop
    heap.close()
