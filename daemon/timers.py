"""A heap of (when, callback) timers for the supervisor loop: deadlines, respawn backoff, timeouts."""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when_ns, next(self._seq), callback))

    def timeout_ms(self, default_ms: int) -> int:
        """How long the poller may sleep before the next timer is due."""
        if not self._heap:
            return default_ms
        wait = (self._heap[0][0] - time.monotonic_ns()) // 1_000_000 + 1
        return max(0, min(default_ms, wait))

    def run_due(self) -> None:
        heap = self._heap
        if not heap:
            return
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now:
            _, _, callback = heapq.heappop(heap)
            callback()

    def __len__(self) -> int:
        return len(self._heap)
