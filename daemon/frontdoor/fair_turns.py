"""Whose work a door does next: start-time fair queueing over client identities. The front door's
(frontdoor/connections.py) and each worker's own endpoint (worker/direct.py) serve their clients so.

The work is what a client's connection costs the loop (the supervisor's, a worker's): reading and parsing
what it sent (handshakes too), and handling each message. Each identity (a uid, a CURVE key, a tcp:// host:
all its connections together) has a virtual time, the loop time its work has taken; the identity that has taken
the least goes next, one unit at a time (a read, or one message), its connections in the order they
became ready; and client work takes at most PASS_NS of a pass of the loop (one unit at least), so that the
worker channels and the timers come in between. An identity that comes back after a quiet spell starts at
the clock (the virtual time of the unit done last), not below it: quiet time is not saved up to be spent
in a burst later.

Why: round 50 held the loop ~10 s with 3,000 `status` in one write (every worker was then killed as
unresponsive); round 52 gave each of 480 uids a turn of every pass and a pass lasted 1.6-3.7 s; round 53
sent requests of 256 empty frames whose parsing (110 ms a read) nobody was charged for. Here a client that
asks little waits for at most one unit of each identity busy at the same time - a few ms beside a few
flooding identities, whatever their requests cost, ~1 s beside 480 uids (root's, or as many users') each
keeping `status` busy - and the busy ones share what is left in proportion.

A unit is charged at least MIN_COST_NS (queueing it costs something even when doing it is cheap). A pass
is short (PASS_NS): a connection whose read drained the kernel's buffer comes back only when the loop
polls again, so an upload beside a flood got one socket buffer (~200 KiB) a pass - 70-120 MiB/s with 2 ms
passes, 230-280 with these (round 54's residual; 1,500 alone; the front door's throughput is unchanged).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from typing import Callable, Generic, Protocol, TypeVar

from openinfer.wire.zmtp import Event, Oversized

log = logging.getLogger("openinfer.access")

PASS_NS = 500_000  # (see above)
MIN_COST_NS = 2_000
# What a pending message holds beyond its frames' bytes, for the memory rule: the list and the deque slot
# (~64 B), each non-empty frame's bytes object (~41 B over its length; an empty frame is CPython's one b"").
EVENT_OVERHEAD_BYTES = 64
FRAME_OVERHEAD_BYTES = 41
FORGET_ABOVE = 4096  # identities remembered past this many: those at or below the clock carry nothing


class TurnTaker(Protocol):
    """A connection as the turns see it: the front door's (connections.py) and a worker's (worker/direct.py)."""

    in_turns: bool
    wants_read: bool
    pending: deque[Event] | None
    pending_bytes: int
    closed: bool
    reading: bool

    @property
    def turn_key(self) -> str: ...  # whose turns it takes: its identity

    @property
    def dropping(self) -> bool: ...  # read no more: its pending messages are dropped


C = TypeVar("C", bound=TurnTaker)


class FairTurns(Generic[C]):
    def __init__(self, handle: Callable[[C, Event], None], read: Callable[[C], None], *, finish_lone_read: bool = False) -> None:
        """`finish_lone_read`: a pass past its budget still handles the messages read from the one connection
        ready, while no other is (a worker's: its messages are admissions of a few tens of us each, at most
        a read's 256; the front door's `status` costs ms). Cut between them, a pipelined client's requests
        read together were admitted a run apart - smaller batches, and a retiring worker's GOAWAY listed
        one of two requests it had read (tests/test_direct_path.py)."""
        self._handle = handle
        self._read = read
        self._finish_lone_read = finish_lone_read
        self._usage: dict[str, int] = {}  # turn key -> its virtual time (ns)
        self._clock = 0  # the virtual time at which the unit done last started
        self._identities: list[tuple[int, int, str]] = []  # heap of ready identities: (virtual time, order, key)
        self._connections: dict[str, deque[C]] = {}  # a ready identity's ready connections, in turn
        self._order = itertools.count()

    def __bool__(self) -> bool:
        """Connections wait with messages the next pass can handle: the loop must not sleep."""
        return bool(self._identities)

    def add(self, conn: C) -> None:
        """`conn` holds pending messages it may handle now, or is to be read (`wants_read`): it takes its
        place among the ready, behind its identity's other ready connections."""
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
        """Units of client work - a read or one pending message - the least-served identity's first (its
        connections in turn), for at most PASS_NS (one unit at least)."""
        identities, connections, usage_of = self._identities, self._connections, self._usage
        end = time.monotonic_ns() + PASS_NS
        served = False
        while identities:
            started = time.monotonic_ns()
            if started >= end and served and not (self._finish_lone_read and self._lone_pending()):
                break
            usage, _, key = heapq.heappop(identities)
            waiting = connections[key]
            conn = waiting.popleft()
            conn.in_turns = False
            pending = conn.pending
            if conn.closed or conn.dropping or not conn.reading or not (pending or conn.wants_read):
                # Struck out: read no more. Its replies backing up: added again once they are written.
                if conn.closed or conn.dropping:
                    conn.pending, conn.pending_bytes = None, 0
            else:
                served = True
                if usage > self._clock:
                    self._clock = usage
                try:
                    if pending:
                        event = pending.popleft()
                        conn.pending_bytes -= held_by(event)
                        self._handle(conn, event)
                    else:
                        conn.wants_read = False
                        self._read(conn)  # its complete messages become its pending ones; wants_read again if cut short
                        pending = conn.pending
                except Exception:  # the callbacks answer everything themselves; a bug must not strand the others
                    log.exception("internal error while handling a client's message; continuing")
                usage += max(time.monotonic_ns() - started, MIN_COST_NS)
                usage_of[key] = usage
                if not pending:
                    conn.pending, conn.pending_bytes = None, 0
                if (pending or conn.wants_read) and not conn.closed and not conn.in_turns:
                    if conn.turn_key == key:
                        conn.in_turns = True
                        waiting.append(conn)
                    else:  # a CURVE handshake named its key in this read: its messages are that key's turns
                        self.add(conn)
            if waiting:
                heapq.heappush(identities, (usage, next(self._order), key))
            else:
                del connections[key]
        if len(usage_of) > FORGET_ABOVE:
            self._usage = {key: value for key, value in usage_of.items() if value > self._clock or key in connections}


    def _lone_pending(self) -> bool:
        """One connection ready, holding messages it read."""
        identities = self._identities
        if len(identities) != 1:
            return False
        waiting = self._connections[identities[0][2]]
        return len(waiting) == 1 and bool(waiting[0].pending)


def hold_pending(conn: TurnTaker, events: list[Event]) -> None:
    """A read's complete messages become `conn`'s pending ones, their bytes counted (serve takes each off
    as it is handled; the memory rules count what is left)."""
    conn.pending = deque(events)
    conn.pending_bytes = sum(held_by(event) for event in events)


def held_by(event: Event) -> int:
    """What a message read and not handled yet holds (the memory rule counts it)."""
    frames = event.frames if isinstance(event, Oversized) else event  # an Oversized report: the frames before its limit
    return EVENT_OVERHEAD_BYTES + sum(len(frame) + FRAME_OVERHEAD_BYTES if len(frame) else 8 for frame in frames)
