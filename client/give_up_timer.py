"""One timer for every direct request an AsyncClient waits on.

Each waiting request has its own give-up time. A timer per request (or an asyncio.wait_for, which also
adds a pass of the event loop to every reply) costs every request; here a reply costs a dict entry and a
heap push, and one event-loop timer is always set to the earliest give-up. The give-ups are kept in a heap,
so ending thousands of waits one by one costs O(log n) each, not a scan of every wait per firing. Entries
of answered requests are left in the heap and skipped; the heap is rebuilt from the live ones when they
are a minority, which keeps it no larger than about twice the requests in flight."""
from __future__ import annotations

import asyncio
import heapq
import time
from typing import Callable

REBUILD_SLACK = 64  # stale entries always tolerated before a rebuild (so a client at c = 1 rarely rebuilds)


class GiveUpTimer:
    def __init__(self, due: Callable[[int], None]) -> None:
        """`due(request_id)` is called, on the event loop, when that request's give-up time has come."""
        self._due = due
        self._when: dict[int, float] = {}  # request id -> give-up (time.monotonic()), the live entries
        self._order: list[tuple[float, int]] = []  # heap of (give-up, request id), stale ones included
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0
        self._handle_loop: asyncio.AbstractEventLoop | None = None

    def arm(self, request_id: int, when: float) -> None:
        self._when[request_id] = when
        order = self._order
        heapq.heappush(order, (when, request_id))
        if len(order) > 2 * len(self._when) + REBUILD_SLACK:
            order[:] = [(at, rid) for rid, at in self._when.items()]
            heapq.heapify(order)
        loop = asyncio.get_running_loop()
        if self._handle is None or when < self._handle_at or self._handle_loop is not loop:  # (a timer of a loop that ended never fires)
            self._set(when, loop)

    def disarm(self, request_id: int) -> None:
        """The request ended (answered, failed or cancelled): it is never `due`."""
        self._when.pop(request_id, None)

    def stop(self) -> None:
        """The client closed: no timer is left on its loop."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._when.clear()
        self._order.clear()

    def _set(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle_at = when
        self._handle_loop = loop
        self._handle = loop.call_later(max(0.0, when - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = time.monotonic()
        order = self._order
        live = self._when
        while order and (order[0][0] <= now or live.get(order[0][1]) != order[0][0]):
            when, request_id = heapq.heappop(order)
            if live.get(request_id) == when:
                del live[request_id]
                self._due(request_id)
        if order:
            self._set(order[0][0], asyncio.get_running_loop())
