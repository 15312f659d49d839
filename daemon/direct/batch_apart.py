"""Whose requests are batched only with their own, and until when: after a crash no one can be held to.

Both paths batch several clients' requests in one run. When such a run crashes its worker, no single
client can be held to the crash (workerpool/crash_blame.py), so a poison batched with others' requests
escaped the crash strikes: on the direct path (attacker round 81), and on the front door (round 83), whose
crashed batches' members run again alone to find the poison - one whose deadline passed before its turn
never ran alone, and its sender crashed the worker 40 times without a strike. The clients of that run
(the front door's running unit; on the direct path, the uids the worker's deadline page names) are then
batched apart for the strikes' window: each one's requests only with its own, so that the next crash is
someone's strike. Everyone else's batches stay as they were (round 82: keeping every uid apart after one
such crash cut the model's throughput to a third for all its clients, and lasted each worker's life).

The supervisor keeps this per model: its front door's queue reads it (dispatch._take_batch), and it is
sent whole to the model's workers (APART, worker/messages.py) after their ACK and whenever it changes; a
worker reads it on every batch it takes. Times are CLOCK_MONOTONIC ns, the same clock in every process of
the host.
"""
from __future__ import annotations

from collections.abc import Container, Iterator, Set as AbstractSet

import msgpack

from openinfer.daemon.workerpool.crash_blame import striker

EVERYONE = "*"  # a run the page did not name (too many uids to name, an identity not a uid's): all apart
MAX_ENTRIES = 4096  # beyond this many uids kept apart at once, everyone is


class _Everyone:
    def __contains__(self, identity: object) -> bool:
        return True


ALL = _Everyone()


class _Kept:
    """The identities kept apart now; a plain tcp:// peer's (one identity per connection) by its source,
    as strikes count it: reconnecting does not take it out."""

    __slots__ = ("until_ns",)

    def __init__(self, until_ns: dict[str, int]) -> None:
        self.until_ns = until_ns

    def __contains__(self, identity: object) -> bool:
        return identity in self.until_ns or (isinstance(identity, str) and identity.startswith("tcp=") and striker(identity) in self.until_ns)

    def __iter__(self) -> Iterator[str]:
        return iter(self.until_ns)


class BatchApart:
    def __init__(self, until_ns: dict[str, int] | None = None) -> None:
        self.until_ns = until_ns or {}  # identity (or EVERYONE) -> kept apart until then

    def __bool__(self) -> bool:
        return bool(self.until_ns)

    def keep_apart(self, identities: AbstractSet[str], until_ns: int, now_ns: int) -> None:
        """The identities of a crashed run (an empty set: not named) are kept apart until `until_ns`."""
        self.drop_past(now_ns)
        for identity in identities or (EVERYONE,):
            self.until_ns[striker(identity)] = until_ns
        if len(self.until_ns) > MAX_ENTRIES:
            self.until_ns = {EVERYONE: until_ns}

    def drop_past(self, now_ns: int) -> None:
        if any(until <= now_ns for until in self.until_ns.values()):
            self.until_ns = {identity: until for identity, until in self.until_ns.items() if until > now_ns}

    def now(self, now_ns: int) -> Container[str] | None:
        """Whose requests are batched only with their own at `now_ns`: None when no one's."""
        if not self.until_ns:
            return None
        self.drop_past(now_ns)
        if not self.until_ns:
            return None
        return ALL if EVERYONE in self.until_ns else _Kept(self.until_ns)

    def encode(self) -> bytes:
        return msgpack.packb(self.until_ns)  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, raw: bytes) -> "BatchApart":
        """From an APART message (only the supervisor writes to the worker's channel); a malformed one
        raises ValueError and the worker keeps what it had."""
        table = msgpack.unpackb(raw, strict_map_key=True)
        if not isinstance(table, dict) or len(table) > MAX_ENTRIES or not all(isinstance(k, str) and isinstance(v, int) for k, v in table.items()):
            raise ValueError("malformed APART table")
        return cls(table)
