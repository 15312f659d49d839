"""How much memory a worker's direct connections may hold, and whom to cut when they hold more.

Two kinds of bytes sit in a worker for clients that are slow or hostile: requests still arriving (their
frames announced room under the worker's RLIMIT_AS before a byte landed) and replies waiting for readers.
Each has a soft budget (a quarter of the worker's memory limit) and a hard one (a half). Past the soft
one only what has stalled (no bytes moved for STALLED_NS) is cut, largest first: a client that uploads
or reads is never cut for it. Past the hard one the largest goes, moving or not. Measured before these
rules: 33 connections announcing 128 MiB each filled a worker's 4 GiB, and 36 connections of one uid,
each within its own reply backlog, did the same with replies; every large request of other clients
failed. The functions here decide; DirectDoor (direct.py) answers and closes.
"""
from __future__ import annotations

import resource
from typing import Protocol, Sequence, TypeVar

from openinfer.wire.protocol import MAX_HEADER_BYTES

STALLED_NS = 1_000_000_000  # bytes that have not moved for this long have stalled


class Holder(Protocol):
    """What the rules look at on a connection (DirectConnection)."""

    identity: str
    closed: bool
    last_read_ns: int  # when request bytes last came
    out_moved_ns: int  # when its outbox last began to fill or shrank

    @property
    def in_bytes(self) -> int: ...

    @property
    def out_bytes(self) -> int: ...


H = TypeVar("H", bound=Holder)


def held_budgets(max_request_bytes: int) -> tuple[int, int]:
    """(soft, hard) budgets of bytes, each kind: a quarter and a half of the worker's address-space limit
    (its memory limit); never less than two, and four, largest requests."""
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    one = max_request_bytes + MAX_HEADER_BYTES
    quarter = address_space // 4 if address_space != resource.RLIM_INFINITY else 16 * one
    return max(2 * one, quarter), max(4 * one, 2 * quarter)


def replies_to_cut(conns: Sequence[H], now_ns: int, soft: int, hard: int) -> list[H]:
    """Connections whose unread replies must go (their connections closed), in order."""
    waiting = [c for c in conns if c.out_bytes]
    total = sum(c.out_bytes for c in waiting)
    if total <= soft:
        return []
    stalled = [c for c in waiting if now_ns - c.out_moved_ns >= STALLED_NS]
    cut: list[H] = []
    for conn in sorted(stalled, key=lambda c: c.out_bytes, reverse=True) + sorted(waiting, key=lambda c: c.out_bytes, reverse=True):
        if conn.closed or conn in cut or total <= (soft if conn in stalled else hard):
            continue
        total -= conn.out_bytes
        cut.append(conn)
    return cut


def uploads_to_refuse(conns: Sequence[H], now_ns: int, soft: int, hard: int) -> list[tuple[H, str]]:
    """Connections whose unfinished request must be refused, in order, each with the reason to give."""
    arriving = [c for c in conns if c.in_bytes > MAX_HEADER_BYTES and not c.closed]
    total = sum(c.in_bytes for c in arriving)
    refused: list[tuple[H, str]] = []
    if total <= soft:
        return refused
    for conn in sorted((c for c in arriving if now_ns - c.last_read_ns >= STALLED_NS), key=lambda c: c.in_bytes, reverse=True):
        if total <= soft:
            return refused
        total -= conn.in_bytes
        refused.append((conn, "it stalled, holding room the worker needs"))
    left = [c for c in arriving if all(c is not r for r, _ in refused)]
    while total > hard and left:
        by_identity: dict[str, int] = {}
        for conn in left:
            by_identity[conn.identity] = by_identity.get(conn.identity, 0) + conn.in_bytes
        most = max(by_identity, key=by_identity.__getitem__)
        conn = max((c for c in left if c.identity == most), key=lambda c: c.in_bytes)
        total -= conn.in_bytes
        left.remove(conn)
        refused.append((conn, f"{most} holds the most room for requests still arriving ({by_identity[most]} bytes)"))
    return refused
