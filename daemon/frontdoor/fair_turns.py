"""Whose message the front door handles next: start-time fair queueing over client identities.

Each identity (a uid, a CURVE key, a tcp:// host: all its connections together) has a virtual time,
the loop time its messages have taken; the connection holding messages whose identity has taken the
least goes next, one message at a time, and the front door's messages take at most PASS_NS of a pass of
the supervisor's loop, so that the worker channels, the timers and new reads come in between.
An identity that comes back after a quiet spell starts at the clock (the virtual time of the message
last handled), not below it: quiet time is not saved up to be spent in a burst later.

Why: round 50 held the loop ~10 s with 3,000 `status` in one write (every worker was then killed as
unresponsive); round 52 gave each of 480 uids a turn per pass and a pass lasted 1.6-3.7 s. Here a client
that asks little - a request now and then - is next whenever it asks, however many identities flood the
door and whatever their requests cost; those share what is left in proportion.

A message is charged at least MIN_COST_NS (reading and queueing it cost something even when handling it
is cheap). Within one identity its connections take turns in the order they became ready.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from openinfer.wire.zmtp import Event

if TYPE_CHECKING:
    from .connections import Connection

log = logging.getLogger("openinfer.access")

PASS_NS = 2_000_000
MIN_COST_NS = 2_000
FORGET_ABOVE = 4096  # identities remembered past this many: those at or below the clock carry nothing


class FairTurns:
    def __init__(self, handle: Callable[["Connection", Event], None]) -> None:
        self._handle = handle
        self._usage: dict[str, int] = {}  # turn key -> its virtual time (ns)
        self._clock = 0  # the virtual time of the message handled last
        self._identities: list[tuple[int, int, str]] = []  # heap of ready identities: (virtual time, order, key)
        self._connections: dict[str, deque["Connection"]] = {}  # a ready identity's ready connections, in turn
        self._order = itertools.count()

    def __bool__(self) -> bool:
        """Connections wait with messages the next pass can handle: the loop must not sleep."""
        return bool(self._identities)

    def add(self, conn: "Connection") -> None:
        """`conn` holds pending messages it may handle now: it takes its place among the ready, behind its
        identity's other ready connections."""
        if conn.in_turns:
            return
        conn.in_turns = True
        key = conn.turn_key
        waiting = self._connections.get(key)
        if waiting is not None:
            waiting.append(conn)
            return
        self._connections[key] = deque((conn,))
        usage = self._usage.get(key, 0)
        if usage < self._clock:
            usage = self._clock
            self._usage[key] = usage
        heapq.heappush(self._identities, (usage, next(self._order), key))

    def serve(self) -> None:
        """Handle pending messages, one at a time, the least-served identity's first (its connections in
        turn), for at most PASS_NS (one message at least)."""
        identities, connections, usage_of = self._identities, self._connections, self._usage
        end = time.monotonic_ns() + PASS_NS
        served = False
        while identities:
            started = time.monotonic_ns()
            if started >= end and served:
                break
            usage, _, key = heapq.heappop(identities)
            waiting = connections[key]
            conn = waiting.popleft()
            conn.in_turns = False
            pending = conn.pending
            if conn.closed or conn.dropping or not pending:
                conn.pending, conn.pending_bytes = None, 0  # a struck-out connection is read no more
            elif conn.reading:  # (else its replies back up: added again once they are written)
                served = True
                if usage > self._clock:
                    self._clock = usage
                try:
                    self._handle(conn, pending.popleft())
                except Exception:  # the handler answers everything itself; a bug must not strand the others
                    log.exception("internal error while handling a client's message; continuing")
                usage += max(time.monotonic_ns() - started, MIN_COST_NS)
                usage_of[key] = usage
                if not pending:
                    conn.pending, conn.pending_bytes = None, 0
                elif not conn.closed and not conn.in_turns:
                    conn.in_turns = True
                    waiting.append(conn)
            if waiting:
                heapq.heappush(identities, (usage, next(self._order), key))
            else:
                del connections[key]
        if len(usage_of) > FORGET_ABOVE:
            self._usage = {key: value for key, value in usage_of.items() if value > self._clock or key in connections}
