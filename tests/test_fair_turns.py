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
    reads_cut: bool = False  # each read stops at its budget, the kernel holding more
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
        conn.wants_read = conn.reads_cut

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


def test_a_read_cut_at_its_budget_is_read_again_in_its_identitys_turns_not_once_a_pass(clock: Clock) -> None:
    """Round 54's residual: a connection uploading a 64 MiB request beside an identity flooding requests
    of empty frames (each of its reads ~3 ms to parse) was read once a pass: after a read cut at its budget
    it left the turns until the loop polled again, so it got a fourteenth of its speed alone, not the half
    its turns are worth. A read cut short keeps its connection in the turns."""
    log: list[str] = []
    turns = make_turns(clock, log, message_cost_ns=20_000)
    flood = [FakeConnection("uid=65534", f"flood{i}", read_cost_ns=3 * MS, messages_per_read=30, reads_cut=True) for i in range(14)]
    upload = FakeConnection("uid=1000", "upload", read_cost_ns=50_000, reads_cut=True)
    started = clock.now
    for _ in range(50):  # the loop: what is readable is added at each poll (connections.py: _on_ready), then a pass
        for conn in (*flood, upload):
            if not conn.in_turns and not conn.pending:
                conn.wants_read = True
                turns.add(conn)
        turns.serve()
    elapsed = clock.now - started
    upload_ns = upload.reads * upload.read_cost_ns
    flood_ns = sum(conn.reads for conn in flood) * 3 * MS + sum(name.startswith("flood") for name in log) * 20_000
    assert elapsed >= 50 * PASS_NS and flood_ns + upload_ns == elapsed
    assert upload_ns >= 0.4 * elapsed and flood_ns >= 0.4 * elapsed, f"the upload had {upload_ns / elapsed:.0%} of the loop"


def test_a_workers_pass_finishes_the_read_in_hand_while_no_one_else_waits(clock: Clock) -> None:
    """A worker's turns (finish_lone_read): the requests a lone pipelining client sent together are admitted
    in one pass, not a run apart; once another connection waits, the budget ends the pass as anywhere."""
    log: list[str] = []
    worker = FairTurns(make_turns(clock, log, message_cost_ns=MS)._handle, make_turns(clock, log, 0)._read, finish_lone_read=True)
    lone = FakeConnection("uid=1000", "lone", pending=deque([[b"infer"]] * 10))
    worker.add(lone)
    worker.serve()
    assert log.count("lone") == 10  # 10 ms, past the 0.5 ms budget: the read in hand, no one else waiting
    front_door = make_turns(clock, log, message_cost_ns=MS)
    lone.pending = deque([[b"status"]] * 10)
    front_door.add(lone)
    front_door.serve()
    assert log.count("lone") == 11  # the front door's pass ends at its budget: one unit past it
    first, second = (FakeConnection(f"uid={uid}", name, pending=deque([[b"infer"]] * 10)) for uid, name in ((1001, "first"), (2001, "second")))
    worker.add(first)
    worker.add(second)
    worker.serve()
    assert log.count("first") + log.count("second") == 1  # two waiting: the budget holds (one unit past it)
