"""The rules that decide which direct connections a worker cuts when requests still arriving, or replies
waiting for their readers, hold too much of its memory (daemon/worker/direct_budgets.py). The attacks
that made them are in tests/attack/test_worker_endpoint.py, against real workers; here each rule alone."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from openinfer.daemon.worker.direct_budgets import STALLED_NS, replies_to_cut, uploads_to_refuse

pytestmark = pytest.mark.unit

NOW = 100 * STALLED_NS
MIB = 1 << 20


@dataclass(eq=False)
class Conn:
    name: str
    identity: str = "uid=1"
    in_bytes: int = 0
    out_bytes: int = 0
    last_read_ns: int = NOW  # moving unless told
    out_moved_ns: int = NOW
    closed: bool = False


def stalled(conn: Conn) -> Conn:
    conn.last_read_ns = conn.out_moved_ns = NOW - STALLED_NS
    return conn


def names(chosen: list) -> list[str]:
    return [c.name if isinstance(c, Conn) else c[0].name for c in chosen]


def test_within_the_soft_budget_nothing_is_cut() -> None:
    conns = [stalled(Conn("a", in_bytes=40 * MIB, out_bytes=40 * MIB)), Conn("b", in_bytes=50 * MIB, out_bytes=50 * MIB)]
    assert replies_to_cut(conns, NOW, 100 * MIB, 200 * MIB) == []
    assert uploads_to_refuse(conns, NOW, 100 * MIB, 200 * MIB) == []


def test_past_the_soft_budget_only_what_stalled_is_cut_largest_first() -> None:
    conns = [stalled(Conn("small", out_bytes=20 * MIB, in_bytes=20 * MIB)), stalled(Conn("large", out_bytes=60 * MIB, in_bytes=60 * MIB)),
             Conn("moving", out_bytes=90 * MIB, in_bytes=90 * MIB)]
    assert names(replies_to_cut(conns, NOW, 100 * MIB, 300 * MIB)) == ["large", "small"]  # 170 -> 110 -> 90
    assert names(uploads_to_refuse(conns, NOW, 100 * MIB, 300 * MIB)) == ["large", "small"]


def test_a_client_that_moves_is_never_cut_below_the_hard_budget() -> None:
    conns = [Conn(f"m{i}", out_bytes=50 * MIB, in_bytes=50 * MIB) for i in range(5)]  # 250 MiB, all moving
    assert replies_to_cut(conns, NOW, 100 * MIB, 300 * MIB) == []
    assert uploads_to_refuse(conns, NOW, 100 * MIB, 300 * MIB) == []


def test_past_the_hard_budget_replies_go_largest_first_moving_or_not() -> None:
    conns = [Conn("a", out_bytes=100 * MIB), Conn("b", out_bytes=150 * MIB), Conn("c", out_bytes=120 * MIB)]
    assert names(replies_to_cut(conns, NOW, 100 * MIB, 300 * MIB)) == ["b"]  # 370 -> 220


def test_past_the_hard_budget_the_identity_holding_most_loses_its_largest_upload_each_once() -> None:
    attacker = [Conn(f"x{i}", identity="uid=65534", in_bytes=60 * MIB) for i in range(5)]  # 300 MiB
    victim = [Conn("v", identity="uid=1000", in_bytes=90 * MIB)]
    refused = uploads_to_refuse(attacker + victim, NOW, 100 * MIB, 200 * MIB)  # 390 -> under 200: four of the attacker's
    assert names(refused) == ["x0", "x1", "x2", "x3"]
    assert all("uid=65534 holds the most room" in why for _, why in refused)
    assert len({id(c) for c, _ in refused}) == len(refused)


def test_closed_connections_and_headers_alone_are_not_counted() -> None:
    conns = [Conn("closed", in_bytes=500 * MIB, closed=True), stalled(Conn("header", in_bytes=1000))]
    assert uploads_to_refuse(conns, NOW, 1, 2) == []
