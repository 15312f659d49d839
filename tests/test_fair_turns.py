"""The front door's fair turns (daemon/frontdoor/fair_turns.py), in process, on a clock of the test's own:
each read or message costs what the test says, so what is done in which pass is exact."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from openinfer.daemon.frontdoor import fair_turns
from openinfer.daemon.frontdoor.fair_turns import PASS_NS, FairTurns

pytestmark = pytest.mark.unit

MS = 1_000_000


@dataclass(eq=False)
class FakeConnection:
    turn_key: str
    name: str
    read_cost_ns: int = 0
    messages_per_read: int = 0
    pending: deque[Any] | None = None
    pending_bytes: int = 0
    in_turns: bool = False
    wants_read: bool = False
    reading: bool = True
    dropping: bool = False
    closed: bool = False
    reads: int = 0
    done: list[str] = field(default_factory=list)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000 * MS

    def monotonic_ns(self) -> int:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(fair_turns.time, "monotonic_ns", fake.monotonic_ns)
    return fake


def make_turns(clock: Clock, log: list[str], message_cost_ns: int) -> FairTurns:
    def handle(conn: Any, event: Any) -> None:
        clock.now += message_cost_ns
        log.append(conn.name)

    def read(conn: Any) -> None:
        clock.now += conn.read_cost_ns
        conn.reads += 1
        if conn.messages_per_read:
            conn.pending = deque([[b"m"]] * conn.messages_per_read)

    return FairTurns(handle, read)


def test_reading_takes_its_identitys_turns_and_a_pass_its_budget(clock: Clock) -> None:
    """Round 53: 60 connections of one uid, each read costing ~45 ms to parse (requests of 256 empty frames),
    were all read in one pass of the loop - uncharged - and a victim waited seconds. A read is a unit of
    its identity's turns now: a pass does one unit past its budget at most, and a victim that comes
    while the flood's reads are queued is next."""
    log: list[str] = []
    turns = make_turns(clock, log, message_cost_ns=100_000)
    flood = [FakeConnection("uid=65534", f"flood{i}", read_cost_ns=13 * MS, messages_per_read=100) for i in range(60)]
    for conn in flood:
        conn.wants_read = True
        turns.add(conn)
    started = clock.now
    turns.serve()
    assert sum(conn.reads for conn in flood) == 1 and clock.now - started == 13 * MS  # the first unit goes; the budget ends the pass
    victim = FakeConnection("uid=1000", "victim", pending=deque([[b"infer"]]))
    turns.add(victim)
    turns.serve()
    assert log[:1] == ["victim"], log[:5]  # next, ahead of the 59 reads and 100 messages queued before it
    passes = 0
    while turns:
        before = clock.now
        turns.serve()
        passes += 1
        assert clock.now - before <= PASS_NS + 13 * MS  # never more than the budget and one unit
    assert sum(conn.reads for conn in flood) == 60 and log.count("victim") == 1


def test_an_identitys_connections_take_turns_and_identities_share_in_proportion(clock: Clock) -> None:
    """Round 52: inside one identity the connection always readable took the whole turn. Its ready
    connections take a message each in turn; an identity arriving starts at the clock and shares from there."""
    log: list[str] = []
    turns = make_turns(clock, log, message_cost_ns=10_000)
    hog = FakeConnection("tcp=loopback", "hog", pending=deque([[b"m"]] * 1000))
    turns.add(hog)
    turns.serve()
    first_pass = len(log)
    shy = FakeConnection("tcp=loopback", "shy", pending=deque([[b"m"]]))
    turns.add(shy)
    other = FakeConnection("uid=7", "other", pending=deque([[b"m"]] * 3))
    turns.add(other)
    turns.serve()
    after = log[first_pass:]
    # From the clock on, the two identities alternate (no more than one of the hog's identity's messages
    # between two of the other's), and inside the hog's identity its connections alternate too.
    assert after[:6].count("other") == 3 and "shy" in after[:6], after[:8]
    assert after[: after.index("shy")].count("hog") <= 1, after[:8]
