"""Connections still in their handshake, and which of them gives way when they are too many.

Until its handshake completes the daemon does not know who a tcp:// peer is: CURVE names its key only at
INITIATE, so before that the peer is an address, a new one per connection, and no per-identity cap can
hold it. A peer with no key at all could otherwise keep every connection slot busy with bare connects
that send nothing, each for the whole handshake deadline, and reconnect as they are cut. So handshakes
get their own share of the slots, counted by source (the peer's host on tcp://, its uid on ipc://), and
when a new connection needs room the handshake that gives way is the oldest of the source holding the
most: a flood from one source, or a few, displaces only its own handshakes, while an honest handshake
(a few round trips, milliseconds) is over long before its source is the largest.
"""
from __future__ import annotations

import ipaddress
from typing import Generic, Protocol, TypeVar

MAX_HANDSHAKES_PER_HOST = 8  # a tcp:// source host; an honest client needs one at a time


class Handshaking(Protocol):
    @property
    def conn_id(self) -> int: ...

    @property
    def accepted_ns(self) -> int: ...


C = TypeVar("C", bound=Handshaking)


def handshake_share(max_connections: int) -> int:
    """How many of `max_connections` may be handshaking at once: half, so that authenticated clients
    always have the other half."""
    return max(1, max_connections // 2)


LOOPBACK = "loopback"  # the one source every loopback address counts as


def source_host(address: object) -> str:
    """What handshakes are counted by on tcp://: the peer's IPv4 address, or its IPv6 /64 (one host
    commonly holds a whole /64, so counting single IPv6 addresses would give it 2^64 shares). An IPv4
    peer of a dual-stack listener (::ffff:a.b.c.d) is its IPv4 address.

    Every loopback address (IPv4 127.0.0.0/8, IPv6 ::1, ::ffff:127.x.y.z) is one source, LOOPBACK: any
    local user may bind any of the 2^24 addresses of 127/8 before connecting, so counted one by one they
    would be 16M hosts and a local flood would displace every remote client's handshake. Local clients
    have ipc://, where the kernel proves their uid; grouped, a local flood displaces only loopback
    handshakes."""
    host = address[0] if isinstance(address, tuple) else str(address)
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return LOOPBACK
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Handshakes(Generic[C]):
    """The connections in their handshake, oldest first, by source. The only way to change the set."""

    def __init__(self) -> None:
        self._all: dict[int, C] = {}  # conn_id -> connection, in the order they were accepted
        self._source_of: dict[int, str] = {}
        self._by_source: dict[str, dict[int, C]] = {}  # each source's handshakes, oldest first
        self._by_count: dict[int, dict[str, None]] = {}  # n -> the sources holding n handshakes (ordered)

    def __len__(self) -> int:
        return len(self._all)

    def accepted_before(self, cutoff_ns: int) -> list[C]:
        """The handshakes accepted before `cutoff_ns` (monotonic): the first few in accepting order."""
        late: list[C] = []
        for conn in self._all.values():
            if conn.accepted_ns >= cutoff_ns:
                break
            late.append(conn)
        return late

    def count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def add(self, conn: C, source: str) -> None:
        held = self._by_source.setdefault(source, {})
        self._move(source, len(held), len(held) + 1)
        held[conn.conn_id] = conn
        self._all[conn.conn_id] = conn
        self._source_of[conn.conn_id] = source

    def discard(self, conn: C) -> None:
        """`conn` finished its handshake or closed."""
        if self._all.pop(conn.conn_id, None) is None:
            return
        source = self._source_of.pop(conn.conn_id)
        held = self._by_source[source]
        del held[conn.conn_id]
        self._move(source, len(held) + 1, len(held))
        if not held:
            del self._by_source[source]

    def oldest_of(self, source: str) -> C:
        return next(iter(self._by_source[source].values()))

    def largest_source(self) -> str:
        """The source holding the most handshakes (of those, the one that got there first)."""
        return next(iter(self._by_count[max(self._by_count)]))

    def _move(self, source: str, before: int, after: int) -> None:
        if before:
            bucket = self._by_count[before]
            del bucket[source]
            if not bucket:
                del self._by_count[before]
        if after:
            self._by_count.setdefault(after, {})[source] = None
