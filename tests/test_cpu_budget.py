"""The CPU budget steps' image decoding runs under (daemon/steps/cpu_budget.py), in process."""
from __future__ import annotations

import threading
import time

import pytest

from openinfer.daemon.steps.cpu_budget import OverBudget, cpu_budget

pytestmark = pytest.mark.unit


def spin_until(cpu_s: float) -> None:
    """Python work (the interpreter checks for signals between bytecodes) for `cpu_s` of this process's CPU."""
    end = time.process_time() + cpu_s
    while time.process_time() < end:
        pass


def test_a_block_past_its_budget_is_interrupted_where_it_stands() -> None:
    started = time.process_time()
    with pytest.raises(OverBudget):
        with cpu_budget(0.05):
            spin_until(10.0)
    assert time.process_time() - started < 5.0  # stopped near its budget, not at the end of its work


def test_a_block_that_swallows_each_interruption_still_ends_over_budget() -> None:
    """Pillow wraps its parsers in broad excepts: code that catches the interruption (even as BaseException)
    and goes on is interrupted again, and the block cannot end as if it had kept to its budget."""
    with pytest.raises(OverBudget):
        with cpu_budget(0.05):
            for _ in range(40):
                try:
                    spin_until(0.01)
                except BaseException:  # noqa: BLE001 - the hostile pattern under test
                    pass


def test_within_budget_nothing_is_raised_then_or_later() -> None:
    with cpu_budget(5.0):
        spin_until(0.01)
    spin_until(0.1)  # past where a timer left armed would fire (its 10 ms repeat)


def test_outside_the_main_thread_it_refuses_rather_than_run_unbounded() -> None:
    raised: list[BaseException] = []

    def other() -> None:
        try:
            with cpu_budget(1.0):
                pass
        except BaseException as exc:  # noqa: BLE001
            raised.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError)
