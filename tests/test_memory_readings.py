"""`status` reads each process's memory from /proc at most once a second (daemon/control/admin.py): a
worker's smaps costs ~0.3-0.7 ms to read, and every local peer the shipped policy grants `status` could
make the supervisor spend that for every worker, request after request."""
from __future__ import annotations

import pytest

from openinfer.daemon.control import admin
from openinfer.daemon.control.admin import MEMORY_READ_NS, MemoryReadings

pytestmark = pytest.mark.unit


def test_a_process_is_read_once_a_second_and_one_no_longer_asked_about_is_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []

    def read(pid: int) -> dict[str, int]:
        reads.append(pid)
        return {"rss": 1000 * pid + len(reads), "uss": 0, "pss": 0}

    monkeypatch.setattr(admin, "_memory", read)
    readings = MemoryReadings()
    first = readings.of([1, 2], now_ns=0)
    for now in range(0, MEMORY_READ_NS, MEMORY_READ_NS // 100):  # 100 `status` within the second
        assert readings.of([1, 2], now_ns=now) == first
    assert reads == [1, 2]
    later = readings.of([1, 2], now_ns=MEMORY_READ_NS)
    assert reads == [1, 2, 1, 2] and later != first  # a second on: read again
    readings.of([2], now_ns=MEMORY_READ_NS + 1)  # worker 1 gone
    readings.of([1, 2], now_ns=MEMORY_READ_NS + 2)  # a new process with its pid is read, not shown the old one's
    assert reads == [1, 2, 1, 2, 1]
