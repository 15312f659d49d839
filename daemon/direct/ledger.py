"""The ledger: how a worker's direct requests reach the supervisor's books, exactly, even if it is killed.

A worker answers requests the supervisor never sees. Before it sends each reply it appends one fixed-size
record to a ring in memory it shares with the supervisor (the memfd of its deadline page, after the
first page); the supervisor reads the ring on its housekeeping pass and before every `stats` answer and
metrics snapshot. So a reply a client holds is always in the ring already: `stats` is exact without
asking the worker anything, and a worker killed mid-run loses nothing it answered. It also records each
request it admits: what a dead worker admitted and never answered is counted as lost (WORKER_CRASHED,
or DEADLINE_EXCEEDED when the supervisor killed it for overstaying a deadline), which is what the client
library answers such requests with.

Layout (little-endian), after the deadline page:
  header     write_seq u64 (worker), read_seq u64 (supervisor), dropped u64 (worker), 40 bytes spare
  clients    MAX_CLIENT_SLOTS x SLOT_BYTES: [length u8, key bytes] - the accounting keys, written once each
  ring       RING_RECORDS x RECORD: see _RECORD
A record carries its own sequence number, written last (one aligned 8-byte store): the reader takes
only records whose number is the one it expects, so a record still being written is read on a later
pass, never half. The header's positions are single 8-byte stores and loads too (a memoryview of
unsigned 64-bit words: struct.pack_into writes byte by byte, and a reader on the other core saw torn
positions).

The worker is not trusted: every record and client key is checked where it is read (LedgerRejected
retires the worker); a worker can only misreport its own requests. The ring is bounded: when the
supervisor has not caught up, the worker drops records and counts them (`dropped`, shown in stats).
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from openinfer.daemon.observability.client_key import LabelBudget
from openinfer.wire.errors import OpenInferError
from openinfer.wire.protocol import OPERATIONS

PAGE_BYTES = 4096  # the deadline page comes first (deadline_page.py)
LEDGER_BYTES = 4 << 20  # ~34,000 records: ~1 s of one worker at its fastest (two records per request)
MAX_CLIENT_SLOTS = 1024
# Requests one worker holds admitted and unanswered (its queue refuses more: RESOURCE_EXHAUSTED). The
# supervisor keeps what it needs to count each as lost if the worker dies, and no more than this many:
# it once kept 1,000,000 a hostile step recorded (+214 MiB) and booked them all in one pass (~1 s).
MAX_ADMITTED = 8192
SLOT_BYTES = 96
_HEADER_BYTES = 64
_CLIENTS_AT = _HEADER_BYTES
_RING_AT = _CLIENTS_AT + MAX_CLIENT_SLOTS * SLOT_BYTES
# seq, serial (pairs ADMITTED with ANSWERED; 0 = none), the client's request id, client slot, run size
# (RUN: how many requests ran together), kind, code, op, cache (ANSWERED by a model with [cache]:
# CACHE_MISS or CACHE_HIT; else 0), bytes in, bytes out, then the timing stages (TIMING_KEYS) in
# microseconds (NaN = not measured).
TIMING_KEYS = ("decode_us", "queue_us", "prep_us", "compute_us", "encode_us", "batch_wait_us", "total_us", "cpu_us")
_RECORD = struct.Struct("<QQQIHBBBBQQ" + "d" * len(TIMING_KEYS) + "6x")  # doubles: the books match the replies exactly; 120 bytes, so every record is 8-aligned
RING_RECORDS = (LEDGER_BYTES - _RING_AT) // _RECORD.size
# The same record as a numpy dtype: the supervisor reads what a pass finds in one copy and checks it whole.
RECORD_DTYPE = np.dtype([
    ("seq", "<u8"), ("serial", "<u8"), ("request_id", "<u8"), ("slot", "<u4"), ("run_size", "<u2"), ("kind", "u1"), ("code", "u1"),
    ("op", "u1"), ("cache", "u1"), ("bytes_in", "<u8"), ("bytes_out", "<u8"), ("timing", "<f8", (len(TIMING_KEYS),)), ("spare", "V6"),
])
assert RECORD_DTYPE.itemsize == _RECORD.size

# An ADMITTED record's first two timing slots hold when the request must be answered by and when its
# client sent it (monotonic microseconds: same host, same clock), so that a request its dead worker never
# answered is counted as its client library answers it (DirectBooks.lost).
ADMITTED_DEADLINE_US, ADMITTED_SENT_US = TIMING_KEYS[0], TIMING_KEYS[1]
MONOTONIC_US_MAX = float(1 << 53)  # where a double stops holding every microsecond (~285 years of uptime)
# COUNTED: an operation answered OK (attach, cancel); RUN: one run of `run_size` requests (batch sizes);
# STAGE: what one chain request spent in one member - `run_size` = the member's place in the chain,
# `bytes_in` = how many times it ran, compute_us = for how long (written before the request's ANSWERED)
ADMITTED, ANSWERED, REFUSED, COUNTED, RUN, STAGE = 1, 2, 3, 4, 5, 6
CACHE_MISS, CACHE_HIT = 1, 2  # an ANSWERED record's cache byte
# LEASE_EXPIRED: never a reply's code - a PERMISSION_DENIED whose details say the lease expired, the
# client's cue to renew and send the same request again (PROTOCOL.md 17.4): every reload revokes all
# leases and a retiring worker sends back what it never started, and counting those as denials would
# show an operator access refusals that never happened. The books count them as `resent`.
LEASE_EXPIRED = "LEASE_EXPIRED"
CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "WORKER_CRASHED", "UNAVAILABLE", "PERMISSION_DENIED", "INTERNAL", LEASE_EXPIRED)
OPS = ("infer", "(malformed)", "(oversized)", *sorted(OPERATIONS - {"infer"}))
_CODE_INDEX = {code: i for i, code in enumerate(CODES)}
_OP_INDEX = {op: i for i, op in enumerate(OPS)}
_NAN = math.nan
_NO_TIMING = (_NAN,) * len(TIMING_KEYS)
# A record's byte counts never reach 2**48 (256 TiB): the bound where the reader knows none closer (no
# address-space limit on the worker, or a reader in a test).
MAX_RECORD_BYTES = (1 << 48) - 1
_pack_record = _RECORD.pack_into
_RECORD_BYTES = _RECORD.size


class LedgerRejected(ValueError):
    """A record or client key a conforming worker never writes."""


@dataclass(frozen=True, slots=True)
class Entry:
    kind: int
    serial: int
    request_id: int
    client: str
    run_size: int
    code: str | None  # None = OK
    op: str
    bytes_in: int
    bytes_out: int
    timing: dict[str, float]
    cache: int = 0


def _map(fd: int) -> mmap.mmap:
    return mmap.mmap(fd, LEDGER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=PAGE_BYTES)


def _words(ledger: mmap.mmap) -> memoryview:
    """The ledger as unsigned 64-bit words: an item is read and written in one 8-byte access."""
    return memoryview(ledger).cast("Q")


_WRITE, _READ, _DROPPED = 0, 1, 2  # header words: records written (worker), read (supervisor), dropped


class LedgerWriter:
    """The worker's end."""

    def __init__(self, fd: int) -> None:
        self.map = _map(fd)
        self.words = _words(self.map)
        self._slots: dict[str, int] = {}  # client key -> its slot (several labels may share one)
        self._slot_count = 0
        self._labels = LabelBudget()
        self._seq = self.words[_WRITE]
        self.dropped = 0

    def _slot(self, client: str) -> int:
        slot = self._slots.get(client)
        if slot is None:
            kept = self._labels.key(client)  # an identity's labels past its budget share one slot
            slot = self._slots.get(kept)
            if slot is None:
                slot = self._slot_count
                if slot >= MAX_CLIENT_SLOTS:
                    return MAX_CLIENT_SLOTS  # the reader keys these as "other" (accounting.OTHER_CLIENTS)
                raw = kept.encode()[: SLOT_BYTES - 1]
                self.map[_CLIENTS_AT + slot * SLOT_BYTES : _CLIENTS_AT + slot * SLOT_BYTES + 1 + len(raw)] = bytes((len(raw),)) + raw
                self._slot_count += 1
                self._slots[kept] = slot
            if len(self._slots) < 4 * MAX_CLIENT_SLOTS:  # labels seen, each mapped to its slot at once next time
                self._slots[client] = slot
        return slot

    def _append(self, serial: int, request_id: int, client: str, run_size: int, kind: int, code: str | None, op: str, bytes_in: int, bytes_out: int, timing: dict[str, float] | None, cache: int = 0) -> None:
        # Two of these per direct request: written for speed (no helper calls on the common path).
        seq = self._seq
        words = self.words
        if seq - words[_READ] >= RING_RECORDS:
            self.dropped += 1
            words[_DROPPED] = self.dropped
            return
        slot = self._slots.get(client)
        if slot is None:
            slot = self._slot(client)
        at = _RING_AT + (seq % RING_RECORDS) * _RECORD_BYTES
        _pack_record(  # number 0 while the fields are written: no reader takes it yet
            self.map, at, 0, serial, request_id, slot, run_size, kind, _CODE_INDEX[code or "OK"], _OP_INDEX.get(op, 1), cache, bytes_in, bytes_out,
            *(_NO_TIMING if timing is None else map(timing.get, TIMING_KEYS, _NO_TIMING)),
        )
        seq += 1
        words[at >> 3] = seq  # then its number, in one store: the record is whole from here on
        self._seq = seq
        words[_WRITE] = seq

    def admitted(self, serial: int, request_id: int, client: str, bytes_in: int, deadline_ns: int, sent_ns: int) -> None:
        self._append(serial, request_id, client, 0, ADMITTED, None, "infer", bytes_in, 0, {ADMITTED_DEADLINE_US: deadline_ns / 1000, ADMITTED_SENT_US: sent_ns / 1000})

    def answered(self, serial: int, request_id: int, client: str, code: str | None, timing: dict[str, float], bytes_in: int, bytes_out: int, cache: int = 0) -> None:
        self._append(serial, request_id, client, 0, ANSWERED, code, "infer", bytes_in, bytes_out, timing, cache)

    def refused(self, request_id: int, client: str, op: str, code: str, total_us: float) -> None:
        self._append(0, request_id, client, 0, REFUSED, code, op, 0, 0, {"total_us": total_us})

    def counted(self, client: str, op: str) -> None:
        self._append(0, 0, client, 0, COUNTED, None, op, 0, 0, None)

    def run(self, size: int) -> None:
        self._append(0, 0, "", size, RUN, None, "infer", 0, 0, None)

    def has_room(self, records: int) -> bool:
        """Whether this many records fit now (a chain's STAGE records go in only with room for their ANSWERED:
        one dropped between them would pair them with the next request's)."""
        return self._seq + records - self.words[_READ] <= RING_RECORDS

    def stage(self, member: int, runs: int, compute_us: float) -> None:
        self._append(0, 0, "", member, STAGE, None, "infer", runs, 0, {"compute_us": compute_us})

    def close(self) -> None:
        self.words.release()
        self.map.close()


class LedgerReader:
    """The supervisor's end: yields checked entries, at most what was written since the last read."""

    def __init__(self, fd: int, client_key: re.Pattern[str], other: str, leased: Callable[[str], bool] = lambda identity: True, max_request_bytes: int = MAX_RECORD_BYTES, max_answer_bytes: int = MAX_RECORD_BYTES) -> None:
        self.map = _map(fd)
        # The largest request the worker was told to admit: no request it books can be larger (a step
        # that books more per record than that is lying about what a client sent). And the most output one
        # answer can carry: every output frame is in the worker's memory when it books the answer, so no
        # more than its address-space limit (a step that books more bills its client for bytes never sent).
        self._max_bytes_in = max_request_bytes
        self._max_bytes_out = max_answer_bytes
        self.words = _words(self.map)
        self._client_key = client_key
        self._other = other
        self._leased = leased  # whether an identity holds (or held) a lease for this worker's model version
        self._clients: dict[int, str] = {}
        self._read = 0

    def close(self) -> None:
        self.words.release()
        self.map.close()

    def dropped(self) -> int:
        return int(self.words[_DROPPED])

    def _client(self, slot: int) -> str:
        if slot == MAX_CLIENT_SLOTS:
            return self._other
        known = self._clients.get(slot)
        if known is not None:
            return known  # written once: a worker cannot rename a client afterwards
        if slot > MAX_CLIENT_SLOTS:
            raise LedgerRejected(f"client slot {slot}")
        at = _CLIENTS_AT + slot * SLOT_BYTES
        length = self.map[at]
        try:
            key = bytes(self.map[at + 1 : at + 1 + length]).decode()
        except UnicodeDecodeError:
            raise LedgerRejected("client key is not UTF-8") from None
        if not self._client_key.fullmatch(key):
            raise LedgerRejected(f"client key {key[:80]!r} is not an identity")
        if not self._leased(key.rpartition("@")[2]):
            # Not an identity this model leased to: a conforming worker names one only in a refusal of a
            # peer without a lease; a hostile one, to book its requests to any uid. Either way the shared
            # row, and looked at again next time (the uid may take a lease later).
            return self._other
        self._clients[slot] = key
        return key

    def read(self) -> list[Entry]:
        return self.read_batch().entries()

    def read_batch(self, limit: int | None = None) -> "RecordBatch":
        """Every whole record written since the last read (the first `limit` of them), checked, as one
        array (LedgerRejected if any record is not what a conforming worker writes: then nothing of the
        batch is taken)."""
        words = self.words
        written = words[_WRITE]
        start = self._read
        if written - start > RING_RECORDS or written < start:
            raise LedgerRejected("write position out of range")
        records = self._copy(start, written - start if limit is None else min(limit, written - start))
        # A record is whole once it carries its number (written last): take the run of those from the start.
        whole = records["seq"] == np.arange(start + 1, start + 1 + len(records), dtype=np.uint64)
        if not whole.all():
            records = records[: int(np.argmin(whole))]
        batch = RecordBatch(records, self._check(records))
        self._read = start + len(records)
        words[_READ] = self._read  # the worker may reuse what was read
        return batch

    def _copy(self, start: int, count: int) -> np.ndarray:
        """Records start .. start+count of the ring, copied out (it wraps at most once)."""
        first = start % RING_RECORDS
        head = min(count, RING_RECORDS - first)
        at = _RING_AT + first * _RECORD.size
        parts = [self.map[at : at + head * _RECORD.size]]
        if count > head:
            parts.append(self.map[_RING_AT : _RING_AT + (count - head) * _RECORD.size])
        return np.frombuffer(b"".join(parts), dtype=RECORD_DTYPE)

    def _check(self, records: np.ndarray) -> dict[int, str]:
        """Raise LedgerRejected at the first record out of range; the client key of every slot named."""
        if not len(records):
            return {}
        kind, code, cache, stages = records["kind"], records["code"], records["cache"], records["timing"]
        bytes_in, bytes_out = records["bytes_in"], records["bytes_out"]
        bad = (kind < ADMITTED) | (kind > STAGE) | (code >= len(CODES)) | (records["op"] >= len(OPS)) | (bytes_in > MAX_RECORD_BYTES) | (bytes_out > MAX_RECORD_BYTES)
        # What LedgerWriter writes: bytes in on ADMITTED and ANSWERED (the request's), and on STAGE (a run
        # count, checked where it is booked); bytes out on ANSWERED alone; 0 and 0 on REFUSED, COUNTED, RUN.
        answered = kind == ANSWERED
        bad |= ((kind == ADMITTED) | answered) & (bytes_in > self._max_bytes_in)
        bad |= (bytes_in != 0) & (kind != ADMITTED) & ~answered & (kind != STAGE)
        bad |= (bytes_out != 0) & ~answered
        bad |= answered & (bytes_out > self._max_bytes_out)
        if bad.any():
            raise LedgerRejected(f"record {int(records['seq'][np.argmax(bad)])}: fields out of range")
        # A miss on any answer (looked up, then run: it may fail), a hit on a success alone.
        bad = (cache > CACHE_HIT) | ((cache != 0) & (kind != ANSWERED)) | ((cache == CACHE_HIT) & (code != 0))
        if bad.any():
            at = int(np.argmax(bad))
            raise LedgerRejected(f"record {int(records['seq'][at])}: cache {int(cache[at])} on a record that cannot have one")
        admitted = kind == ADMITTED
        untimed = admitted & np.isnan(stages[:, :2]).any(axis=1)
        if untimed.any():
            raise LedgerRejected(f"record {int(records['seq'][np.argmax(untimed)])}: an admitted request without its deadline and send time")
        bound = np.where(admitted, MONOTONIC_US_MAX, 1e12)[:, None]  # an admitted request's times are clock readings
        with np.errstate(invalid="ignore"):
            bad_stage = ~np.isnan(stages) & ~((stages >= 0) & (stages < bound))
        if bad_stage.any():
            row, column = divmod(int(np.argmax(bad_stage)), len(TIMING_KEYS))
            raise LedgerRejected(f"record {int(records['seq'][row])}: {TIMING_KEYS[column]} = {float(stages[row, column])}")
        named = (kind != RUN) & (kind != STAGE)
        return {slot: self._client(slot) for slot in np.unique(records["slot"][named]).tolist()}


class RecordBatch:
    """Records read together: the array (RECORD_DTYPE) and the client key of each slot they name."""

    __slots__ = ("records", "clients")

    def __init__(self, records: np.ndarray, clients: dict[int, str]) -> None:
        self.records = records
        self.clients = clients

    def __len__(self) -> int:
        return len(self.records)

    def entries(self, mask: np.ndarray | None = None) -> list[Entry]:
        """The records (those `mask` selects) one by one."""
        records = self.records if mask is None else self.records[mask]
        clients = self.clients
        entries = []
        for serial, request_id, slot, run_size, kind, code, op, cache, bytes_in, bytes_out, stages in zip(
            *(records[name].tolist() for name in ("serial", "request_id", "slot", "run_size", "kind", "code", "op", "cache", "bytes_in", "bytes_out", "timing"))
        ):
            timing = {key: value for key, value in zip(TIMING_KEYS, stages) if value == value}  # NaN: not measured
            client = "" if kind in (RUN, STAGE) else clients[slot]
            entries.append(Entry(kind, serial, request_id, client, run_size, None if code == 0 else CODES[code], OPS[op], bytes_in, bytes_out, timing, cache))
        return entries


def ledger_code(exc: OpenInferError, op: str = "infer") -> str:
    """The code a refusal is booked under: its own, but LEASE_EXPIRED for an `infer` whose lease expired
    - refused on a connection that had attached a valid lease (it expired, or a reload revoked it), or
    sent back by a retiring worker. An `attach` refused "expired" stays PERMISSION_DENIED: its token
    may be anything (round 15: forged tokens and leases of other models, booked as resent, hid a
    uid's probes of a model it may not use)."""
    return LEASE_EXPIRED if op == "infer" and exc.details.get("lease") == "expired" else exc.code
