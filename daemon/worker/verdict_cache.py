"""A model's verdict cache (`[cache]` in its config.toml), one per worker: the answer to a request whose
inputs (names, datatypes, shapes, bytes) and asked-for outputs equal an earlier one's is sent again
without running anything. The same inputs recur on an appliance (the same attachment scanned twice, the
same URL), and a verdict is a pure function of them for a given model version: a worker serves exactly
one version, so its cache holds entries of that version only and goes with it when the version is
replaced. Looked up after the request was checked and admitted (access, lease, per-client limits), so a
hit bypasses none of them. Bounded by entries and by bytes - what an entry holds in the worker's memory, as
tracemalloc counts it: its payloads, its packed output specs, its key and bookkeeping -; entries may expire
(`ttl_s`). When it is full, the least recently used entry of the identity holding the most goes (of the
bound that is full: entries or bytes): one caller that floods the cache with new questions evicts its own
answers once it holds more than any other, and cannot push another caller below an equal share."""
from __future__ import annotations

import hashlib
import heapq
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from openinfer.daemon.frontdoor.handshakes import source_host
from openinfer.wire.protocol import pack, unpack
from openinfer.wire.zmtp import Buffer

# What an entry holds beyond the objects _charge sizes one by one: its 32-byte key (65), the Cached object
# (64) and its two integers (~60), its OrderedDict slot and node (~70: the table grows by doubling, so this
# is its cost between half full and full). Measured with tracemalloc (CPython 3.11): 236-264 per entry.
ENTRY_OVERHEAD_BYTES = 256


@dataclass(frozen=True, slots=True)
class Cached:
    owner: str  # the identity whose answer it is ("" in a shared cache)
    packed_specs: bytes  # the outputs' specs, packed: one object, where a list of dicts of strings and lists held ~1 KB
    payloads: list[bytes]
    nbytes: int
    expires_ns: int  # 0: never

    def specs(self) -> list[dict[str, Any]]:
        """The outputs' specs for a reply: a new list each time (~1 us for four outputs)."""
        specs: list[dict[str, Any]] = unpack(self.packed_specs)
        return specs


class _Largest:
    """Which owner holds the most, in O(log owners) a change: a max-heap whose stale items (an owner's
    earlier figures) are dropped as they surface, and rebuilt once they outnumber the live ones. (A scan
    of every owner on each eviction cost 53 ms a put with 262,144 of them - round 38.)"""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self.value: dict[str, int] = {}

    def set(self, owner: str, value: int) -> None:
        if value:
            self.value[owner] = value
            heapq.heappush(self._heap, (-value, owner))
        else:
            self.value.pop(owner, None)
        if len(self._heap) > 4 * len(self.value) + 64:
            self._heap = [(-held, who) for who, held in self.value.items()]
            heapq.heapify(self._heap)

    def largest(self) -> str:
        while True:
            negative, owner = self._heap[0]
            if self.value.get(owner) == -negative:
                return owner
            heapq.heappop(self._heap)

    def largest_or(self, owner: str) -> str:
        """The owner holding the most - `owner` itself when it holds as much (a tie went to the smaller
        name: a caller could push another one below an equal share, round 40)."""
        largest = self.largest()
        return owner if owner in self.value and self.value[owner] >= self.value[largest] else largest

    def clear(self) -> None:
        self._heap.clear()
        self.value.clear()


def owner_of(identity: str) -> str:
    """Whose entries a caller's are: its identity - but a plain tcp:// peer (`--insecure-tcp`, a grant with
    `anonymous = true`) is its host, "tcp=<host>": its identity is its connection ("tcp=<host>:<port>"), and
    one caller opening a connection every two questions counted as many and evicted a victim holding more
    than each (round 38). Not one "tcp" for all: peers on other hosts then hit each other's entries (round
    40). Connections from one host are one caller: nothing tells them apart."""
    return identity.rpartition(":")[0] if identity.startswith("tcp=") else identity


def share_of(identity: str) -> str:
    """Whose share of the room a caller's entries count to when the cache is full: its owner, but a plain
    tcp:// peer by its source as handshakes count it (every loopback address one, an IPv6 host's /64 one):
    a local peer connecting from 200 of 127/8's addresses was 200 callers of one entry each, and every
    eviction took the victim's, who held the most (round 85: 0 of 32 hits left against 32). Not the key's
    scope (owner_of): hosts on one /64 must not hit each other's entries."""
    if not identity.startswith("tcp="):
        return identity
    return "tcp=" + source_host(identity[4:].rpartition(":")[0].strip("[]"))


class VerdictCache:
    def __init__(self, max_entries: int, max_bytes: int, ttl_s: int, shared: bool = False) -> None:
        self.shared = shared  # False: every identity has its own entries (the scope is part of the key)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_ns = ttl_s * 1_000_000_000
        self._entries: dict[bytes, Cached] = {}
        # Each owner's keys, least recently used first; how many each holds, and how many bytes: whom to evict.
        self._held: dict[str, OrderedDict[bytes, None]] = {}
        self._counts = _Largest()
        self._bytes = _Largest()
        self.nbytes = 0

    def key(self, specs: Sequence[dict[str, Any]], data: Sequence[Buffer], wanted: Sequence[str], identity: str) -> bytes:
        """What makes two requests the same question: every input's name, datatype, shape and bytes, the
        outputs asked for, and - unless the cache is shared - who asks (the kernel-proven identity): one
        caller's hit must not tell another what was asked before. SHA-256: no collision to engineer, and
        twice BLAKE2b's speed where the CPU has SHA instructions (161 vs 311 us for 254 KB here)."""
        digest = hashlib.sha256()
        digest.update(pack([[spec["name"], spec["datatype"], list(spec["shape"])] for spec in specs] + [list(wanted), "" if self.shared else owner_of(identity)]))
        for frame in data:
            digest.update(memoryview(frame).nbytes.to_bytes(8, "little"))  # lengths too: no two splits of one byte string meet
            digest.update(frame)
        return digest.digest()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now_ns: int) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_ns and now_ns >= entry.expires_ns:
            self._drop(key)
            return None
        self._held[entry.owner].move_to_end(key)
        return entry

    def put(self, key: bytes, identity: str, specs: list[dict[str, Any]], payloads: Sequence[Any], now_ns: int) -> None:
        """Keep `identity`'s answer; never raises for want of memory: the cache is emptied instead (the
        answer itself is sent regardless)."""
        try:
            self._put(key, "" if self.shared else share_of(identity), specs, payloads, now_ns)
        except MemoryError:
            self._entries.clear()
            self._held.clear()
            self._counts.clear()
            self._bytes.clear()
            self.nbytes = 0

    def _put(self, key: bytes, owner: str, specs: list[dict[str, Any]], payloads: Sequence[Any], now_ns: int) -> None:
        copies = [bytes(payload) for payload in payloads]  # payloads may be views of arrays about to be reused
        packed_specs = pack(specs)
        nbytes = _charge(packed_specs, copies)
        if nbytes > self.max_bytes:
            return  # an answer larger than the whole cache is never kept
        if key in self._entries:
            self._drop(key)
        while self._entries and len(self._entries) >= self.max_entries:
            self._evict_from(self._counts.largest_or(owner))
        while self._entries and self.nbytes + nbytes > self.max_bytes:
            self._evict_from(self._bytes.largest_or(owner))
        self._entries[key] = Cached(owner, packed_specs, copies, nbytes, now_ns + self.ttl_ns if self.ttl_ns else 0)
        held = self._held.setdefault(owner, OrderedDict())
        held[key] = None
        self._counts.set(owner, len(held))
        self._bytes.set(owner, self._bytes.value.get(owner, 0) + nbytes)
        self.nbytes += nbytes

    def _evict_from(self, owner: str) -> None:
        """The owner's least recently used entry."""
        self._drop(next(iter(self._held[owner])))

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        held = self._held[entry.owner]
        del held[key]
        if not held:
            del self._held[entry.owner]
        self._counts.set(entry.owner, len(held))
        self._bytes.set(entry.owner, self._bytes.value[entry.owner] - entry.nbytes if held else 0)


def _charge(packed_specs: bytes, copies: list[bytes]) -> int:
    """The bytes an entry holds, which `status`, `stats` and `max_bytes` count: each object's own size
    (sys.getsizeof: a bytes object's header, a list's slots) and the fixed rest, not the payloads alone -
    a flat 256 bytes an entry once left four fifths of a small answer's memory uncounted."""
    return ENTRY_OVERHEAD_BYTES + sys.getsizeof(packed_specs) + sys.getsizeof(copies) + sum(sys.getsizeof(c) for c in copies)
