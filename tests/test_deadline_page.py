"""When the supervisor kills a worker for a direct run (DirectPath.overdue): only a run that is still going
half a second past its model's max_compute_ms from its start, read the same twice from the worker's
deadline page. The page's two words are written one at a time, so a read between one run's end and the
next one's start can pair a deadline with a start of 0 or of another run: an honest worker was killed
mid-burst that way (three tests of a full run lost requests to it), and a run merely past its request's
deadline is left to end (its client has given up on it)."""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from openinfer.daemon.direct.deadline_page import DeadlinePage
from openinfer.daemon.direct.endpoints import DirectPath

pytestmark = pytest.mark.unit

MAX_COMPUTE_MS = 1000
SECOND = 1_000_000_000


@pytest.fixture()
def page() -> Iterator[DeadlinePage]:
    shared = DeadlinePage.create("deadline-page-test")
    yield shared
    shared.close()


def worker_on(page: Any, ready_ns: int = 1) -> Any:
    """A worker ready since `ready_ns` (by default, long before any run here)."""
    return SimpleNamespace(page=page, retired=False, ready_ns=ready_ns, model=SimpleNamespace(config=SimpleNamespace(max_compute_ms=MAX_COMPUTE_MS)))


def test_a_run_past_max_compute_ms_is_overdue_and_one_past_its_deadline_only_is_not(page: DeadlinePage) -> None:
    now = time.monotonic_ns()
    page.running(now - 5 * SECOND, now - 4 * SECOND)
    assert [ran for _, ran in DirectPath.overdue([worker_on(page)], now)] == [5 * SECOND]
    page.running(now - SECOND // 5, now - SECOND // 10)  # past the request's deadline, within max_compute_ms
    assert DirectPath.overdue([worker_on(page)], now) == []
    page.idle()
    assert DirectPath.overdue([worker_on(page)], now) == []


def test_a_torn_read_of_the_page_never_kills(page: DeadlinePage) -> None:
    now = time.monotonic_ns()
    page.words[1] = now - 10 * SECOND  # a deadline with no start: read between idle() and running()
    page.words[0] = 0
    assert DirectPath.overdue([worker_on(page)], now) == []

    class Moving:
        """A page whose worker moves on between the supervisor's two reads."""

        def __init__(self) -> None:
            self.reads = iter([(now - 10 * SECOND, now - 9 * SECOND), (now - 1000, now + SECOND)])

        def read(self) -> tuple[int, int]:
            return next(self.reads)

    assert DirectPath.overdue([worker_on(Moving())], now) == []


def test_a_run_is_never_dated_before_its_worker_was_ready(page: DeadlinePage) -> None:
    """The page is the worker's word: a step claimed a run since the machine's boot and had each new worker
    killed at once (round 64's suspicion, reproduced). A claimed start counts from the worker's READY."""
    now = time.monotonic_ns()
    page.running(1, 1)
    assert DirectPath.overdue([worker_on(page, ready_ns=now - SECOND)], now) == []  # ready 1 s ago: within max_compute_ms + grace
    late = now + 2 * SECOND
    assert [ran for _, ran in DirectPath.overdue([worker_on(page, ready_ns=now - SECOND)], late)] == [3 * SECOND]

