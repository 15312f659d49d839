"""Per-model and per-client accounting: counts, cumulative per-stage time, latency distributions.

`Accountant.record` runs once per request inside the supervisor's single-threaded loop, so it does only
integer and dict arithmetic (~4 µs per call here, see bench/accounting_overhead.py); everything that
reads the aggregates (`snapshot`, the Prometheus exporter in metrics.py) works on copies. A batch's
successful members are accounted with `record_batch_later`: the loop adds them in when it is about to
sleep (while a batch is on a worker), and `snapshot` adds in whatever is still waiting, so no reader ever
sees a batch missing.

What is kept, per model version and per client:
- requests, successes, failures by wire code;
- per-stage time in Triton's cumulative `{count, ns}` shape (stages in `STAGES`; `batch_wait` is the
  part of `queue` a batched task spent waiting for its batch, not an extra stage; `total` is the whole
  server-side time);
- the distribution of `total`: an HDR histogram of whole microseconds (1 µs .. 1 h, 2 significant
  digits) giving p50/p90/p99/p99.9 and max, plus an exact mean from the `total` sum. Error bound: a
  reported percentile is the top of the bucket holding the exact order statistic, so it is never below
  it and at most 1/128 (0.78 %, i.e. within 1 %) above; exact under 256 µs. Durations are truncated
  to whole microseconds first (< 1 µs more);
- bytes in (request tensors) and out (reply tensors), worker CPU seconds.
Per model version only: every stage's time in the fixed Prometheus buckets `DURATION_BUCKETS_US`, per
wire code, which metrics.py exposes as `openinfer_request_duration_seconds`.
"""
from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram


PERCENTILES = (50.0, 90.0, 99.0, 99.9)
STAGES = ("decode", "queue", "dispatch", "prep", "compute", "encode", "return", "batch_wait", "total")
_STAGE_INDEX = {f"{stage}_us": index for index, stage in enumerate(STAGES)}  # timing key -> row
# A batch member's own stages (record_batch), in this order; total_us last. The others are shared.
MEMBER_STAGES = ("decode_us", "queue_us", "batch_wait_us", "total_us")
_MEMBER_INDEX = tuple(_STAGE_INDEX[key] for key in MEMBER_STAGES)
# Upper bounds (µs, inclusive, as Prometheus' `le`) of the duration buckets: 50 µs .. 60 s, 1-2.5-5 steps.
DURATION_BUCKETS_US = (
    50, 100, 250, 500,
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
)
_BUCKET_BOUNDS = np.array(DURATION_BUCKETS_US, dtype=np.float64)  # record_many's bisect_left, as searchsorted
_BUCKET_ROW = len(DURATION_BUCKETS_US) + 2  # one counter per bucket, one for > 60 s, then the ns sum
PENDING_BATCHES_MAX = 32  # batches record_batch_later may hold before adding them in regardless
MAX_CLIENTS = 1024  # distinct client keys kept; later ones are accounted under OTHER_CLIENTS
from .client_key import CLIENT_KEY, LABELS_PER_IDENTITY, OTHER_LABELS, LabelBudget  # noqa: E402,F401  (CLIENT_KEY: what a worker's ledger may name as a client)
OTHER_CLIENTS = "(other)"

# HDR layout: lowest 1 µs, highest one hour, 2 significant digits. The same layout as hdrh's
# HdrHistogram(1, HDR_HIGHEST_US, 2), checked index for index by tests/test_accounting.py.
HDR_HIGHEST_US = 3_600_000_000
HDR_SIGNIFICANT_DIGITS = 2
_SUB_BUCKET_BITS = 8  # 2 significant digits need 2 * 10**2 distinct values per bucket: 256 sub-buckets
_HALF_BITS = _SUB_BUCKET_BITS - 1
_SUB_BUCKET_MASK = (1 << _SUB_BUCKET_BITS) - 1
_HALF = 1 << _HALF_BITS


def hdr_index(value_us: float) -> int:
    """Bucket index of a duration in the HDR layout (whole microseconds, clamped to 1 µs .. 1 h).

    `Accountant.record` inlines this arithmetic; keep the two in step."""
    v = int(value_us)
    if v < 1:
        v = 1
    elif v > HDR_HIGHEST_US:
        v = HDR_HIGHEST_US
    b = (v | _SUB_BUCKET_MASK).bit_length() - _SUB_BUCKET_BITS
    return ((b + 1) << _HALF_BITS) + (v >> b) - _HALF


def hdr_indices(values_us: np.ndarray) -> np.ndarray:
    """hdr_index of each value (float64 µs), as an array."""
    v = np.clip(values_us.astype(np.int64), 1, HDR_HIGHEST_US)
    # bit_length of v | mask: frexp's exponent, exact for integers below 2**53
    b = np.frexp((v | _SUB_BUCKET_MASK).astype(np.float64))[1].astype(np.int64) - _SUB_BUCKET_BITS
    return ((b + 1) << _HALF_BITS) + (v >> b) - _HALF


def hdr_bucket_range(index: int) -> tuple[int, int]:
    """(lowest, highest) whole-µs value that lands in bucket `index` (hdrh's equivalent-value range)."""
    b = (index >> _HALF_BITS) - 1
    sub = (index & (_HALF - 1)) + _HALF
    if b < 0:
        sub -= _HALF
        b = 0
    lowest = sub << b
    return lowest, lowest + (1 << b) - 1


class LatencySketch:
    """An HDR histogram stored sparsely: {bucket index: count} of the non-empty buckets only.

    Why not hdrh's HdrHistogram itself: its pure-Python `record_value` costs ~0.75 µs and its
    `get_mean_value` walks all 3,328 counters (~5 ms), which the supervisor's loop cannot afford per
    request or per published snapshot. Here recording is one dict update and a snapshot walks only the
    non-empty buckets (tens); `to_hdr()` gives the equivalent HdrHistogram (same percentiles)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def record(self, value_us: float) -> None:
        index = hdr_index(value_us)
        self.counts[index] = self.counts.get(index, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentiles(self, percentiles: tuple[float, ...] = PERCENTILES) -> dict[float, int]:
        """Value at each percentile, as hdrh reports it: the highest value equivalent to the bucket
        holding the `round(p% of count)`-th smallest sample (at least the first)."""
        if not self.counts:
            return {}
        indices = sorted(self.counts)
        cumulative = list(accumulate(map(self.counts.__getitem__, indices)))
        total = cumulative[-1]
        result: dict[float, int] = {}
        for p in percentiles:
            target = max(1, int(min(p, 100.0) * total / 100 + 0.5))
            result[p] = hdr_bucket_range(indices[bisect_left(cumulative, target)])[1]
        return result

    def max_us(self) -> int:
        return hdr_bucket_range(max(self.counts))[1] if self.counts else 0

    def to_hdr(self) -> HdrHistogram:
        """The same distribution as an hdrh HdrHistogram (e.g. to encode, merge or cross-check it)."""
        hist = HdrHistogram(1, HDR_HIGHEST_US, HDR_SIGNIFICANT_DIGITS)
        for index, count in self.counts.items():
            hist.record_value(hdr_bucket_range(index)[0], count)
        return hist


class UsageStats:
    """What one model version or one client has used. Written only by `Accountant.record`."""

    __slots__ = ("requests", "success", "failures", "resent", "stage_ns", "latency", "bytes_in", "bytes_out", "cpu_us", "by_model", "durations", "_summary")

    def __init__(self, by_model: bool = False) -> None:
        self.by_model = by_model  # a model version's stats (else a client's)
        self.requests = 0
        self.success = 0
        self.failures: dict[str, int] = {}
        self.resent = 0  # direct requests a worker sent back, never run, to be sent again (count_resent)
        # Per STAGES entry: [count, ns]. Clients only: a model version's are summed from `durations`.
        self.stage_ns: list[list[int]] = [[0, 0] for _ in STAGES]
        self.latency = LatencySketch()  # of total_us
        self.bytes_in = 0
        self.bytes_out = 0
        self.cpu_us = 0.0
        # Model versions only: code (None = OK) -> per STAGES entry, the counts per DURATION_BUCKETS_US
        # bucket (not cumulative), the count above the last bound, then the ns sum.
        self.durations: dict[str | None, list[list[int]]] = {}
        self._summary: tuple[int, dict[str, Any]] = (0, {"count": 0})  # (requests, latency summary) last computed

    def stage_totals(self) -> list[tuple[int, int]]:
        """(count, ns) per STAGES entry."""
        if not self.by_model:
            return [(count, ns) for count, ns in self.stage_ns]
        last = len(DURATION_BUCKETS_US) + 1
        totals = [(0, 0)] * len(STAGES)
        for rows in self.durations.values():
            totals = [(count + sum(row[:last]), ns + row[-1]) for (count, ns), row in zip(totals, rows)]
        return totals

    def snapshot(self) -> dict[str, Any]:
        """A fresh, JSON-ready copy: nothing in it is shared with the live counters."""
        totals = self.stage_totals()
        stages = {stage: {"count": count, "ns": ns} for stage, (count, ns) in zip(STAGES, totals) if count}
        if self._summary[0] != self.requests:  # idle since the last snapshot: nothing to recompute
            count, total_ns = totals[-1]
            summary: dict[str, Any] = {"count": count}
            if count:
                for p, value in self.latency.percentiles(PERCENTILES).items():
                    summary[f"p{p:g}_us"] = value
                summary["mean_us"] = round(total_ns / count / 1000, 1)
                summary["max_us"] = self.latency.max_us()
            self._summary = (self.requests, summary)
        snap: dict[str, Any] = {
            "requests": self.requests,
            "success": self.success,
            "failures": dict(self.failures),
            "resent": self.resent,
            "stages": stages,
            "latency": dict(self._summary[1]),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "cpu_seconds": round(self.cpu_us / 1e6, 6),
        }
        if self.by_model:
            snap["durations"] = _durations_snapshot(self.durations)
        return snap


def _durations_snapshot(durations: dict[str | None, list[list[int]]]) -> dict[str, Any]:
    """{code: {stage: {"count", "ns", "le": [cumulative count <= each DURATION_BUCKETS_US bound]}}}."""
    out: dict[str, Any] = {}
    last = len(DURATION_BUCKETS_US)
    for code, rows in sorted(durations.items(), key=lambda item: item[0] or ""):
        by_stage: dict[str, Any] = {}
        for stage, row in zip(STAGES, rows):
            cumulative = list(accumulate(row[:last]))
            count = cumulative[-1] + row[last]
            if count:
                by_stage[stage] = {"count": count, "ns": row[-1], "le": cumulative}
        out["OK" if code is None else code] = by_stage
    return out


class Accountant:
    """Aggregates finished requests. One instance per supervisor; no global state.

    Client key (computed by the supervisor, accounted here as given): the peer's identity, i.e.
    `uid=N` over ipc:// (from the kernel), `curve=<key>` for a CURVE client, `tcp=<host:port>` for a
    plain tcp:// connection (--insecure-tcp); `"<name>@<that identity>"` when the request carries a
    client name (`Client(client_name=...)`). At most LABELS_PER_IDENTITY labels of one identity get keys of
    their own (the rest share OTHER_LABELS@identity), and at most MAX_CLIENTS keys in all; requests from
    later keys are accounted under OTHER_CLIENTS."""

    def __init__(self) -> None:
        self.by_model: dict[tuple[str, int], UsageStats] = {}
        self.by_client: dict[str, UsageStats] = {}
        self.rejected: dict[str, int] = {}  # requests refused before a model was known, by code
        self.operations: dict[str, dict[str, int]] = {}  # every request by operation: {op: {"OK" or code: n}}
        self._pending_batches: list[tuple[Any, ...]] = []  # record_batch_later's, not yet added in
        self._labels = LabelBudget()  # of by_client's keys

    def count_resent(self, model: str | None, version: int | None, client: str, n: int) -> None:
        """Direct requests a worker answered "lease expired" (a reload revoked the lease, or a retiring
        worker sent back what it never started): their clients send them again, and the answer to that
        is the request counted. Not requests, not failures: `resent` of the model version and client."""
        self.client_usage(client).resent += n
        if model is not None and version is not None:
            self._model_stats(model, version).resent += n

    def count_operation(self, op: str, code: str | None, n: int = 1) -> None:
        """Every request the daemon reads is counted here by operation and outcome (infer included)."""
        by_code = self.operations.get(op)
        if by_code is None:
            by_code = self.operations[op] = {}
        key = code or "OK"
        by_code[key] = by_code.get(key, 0) + n

    def record_batch_later(
        self,
        model: str,
        version: int,
        shared: dict[str, float],
        clients: list[str],
        own: list[tuple[float, float, float, float]],
        bytes_in: list[int],
        bytes_out: list[int],
    ) -> None:
        """`record_batch`, done when the supervisor's loop is idle (`flush`), so that a batch's members'
        replies and the next requests are not held up by their bookkeeping. Every reader (`snapshot`)
        flushes first, so nothing deferred is ever missing from what it reports; at most
        PENDING_BATCHES_MAX batches wait (a loop that is never idle adds them in as it goes)."""
        pending = self._pending_batches
        pending.append((model, version, shared, clients, own, bytes_in, bytes_out))
        if len(pending) >= PENDING_BATCHES_MAX:
            self.flush()

    def flush(self) -> None:
        """Add in the batches `record_batch_later` deferred."""
        pending = self._pending_batches
        if pending:
            self._pending_batches = []
            record_batch = self.record_batch
            for args in pending:
                record_batch(*args)

    def record(
        self,
        model: str | None,
        version: int | None,
        client: str,
        code: str | None,
        timing: dict[str, float],
        bytes_in: int = 0,
        bytes_out: int = 0,
    ) -> None:
        """Account one finished request (code None = success). `timing` holds the `*_us` stages of the
        reply plus `cpu_us`; keys not in STAGES are ignored. The hot path: measure before adding work."""
        user = self.by_client.get(client)
        if user is None:
            user = self._new_client(client)
        user_stages = user.stage_ns
        stats = None
        if model is not None and version is not None:
            stats, rows = self._model_rows(model, version, code)
            for key, value in timing.items():
                i = _STAGE_INDEX.get(key)
                if i is None:
                    continue
                ns = int(value * 1000)
                row = rows[i]
                row[bisect_left(DURATION_BUCKETS_US, value)] += 1
                row[-1] += ns
                slot = user_stages[i]
                slot[0] += 1
                slot[1] += ns
        else:
            if code is not None:
                self.rejected[code] = self.rejected.get(code, 0) + 1
            for key, value in timing.items():
                i = _STAGE_INDEX.get(key)
                if i is not None:
                    slot = user_stages[i]
                    slot[0] += 1
                    slot[1] += int(value * 1000)
        total = timing.get("total_us")
        index = -1
        if total is not None:  # hdr_index(), inlined
            v = int(total)
            if v < 1:
                v = 1
            elif v > HDR_HIGHEST_US:
                v = HDR_HIGHEST_US
            b = (v | _SUB_BUCKET_MASK).bit_length() - _SUB_BUCKET_BITS
            index = ((b + 1) << _HALF_BITS) + (v >> b) - _HALF
        cpu_us = timing.get("cpu_us", 0.0)
        for usage in (user, stats) if stats is not None else (user,):
            usage.requests += 1
            if code is None:
                usage.success += 1
            else:
                failures = usage.failures
                failures[code] = failures.get(code, 0) + 1
            if index >= 0:
                counts = usage.latency.counts
                counts[index] = counts.get(index, 0) + 1
            usage.bytes_in += bytes_in
            usage.bytes_out += bytes_out
            usage.cpu_us += cpu_us

    def record_many(self, model: str, version: int, client: str, code: str | None, stages: dict[str, np.ndarray], bytes_in: int, bytes_out: int) -> None:
        """`record` for many requests of one model version, client and outcome at once (a worker's ledger,
        read in bulk): `stages` holds one array per timing key, NaN where a request has no such stage.
        Adds exactly what `record` called once per request would but for the CPU, which the caller adds
        in answer order with `add_cpu` (tests/test_accounting.py)."""
        count = len(next(iter(stages.values())))
        user = self.client_usage(client)
        stats, rows = self._model_rows(model, version, code)
        for key, values in stages.items():
            i = _STAGE_INDEX.get(key)
            if i is None:
                continue
            measured = values[~np.isnan(values)]
            if not len(measured):
                continue
            ns = int((measured * 1000).astype(np.int64).sum())  # each truncated as record's int(value * 1000)
            row = rows[i]
            buckets = np.bincount(np.searchsorted(_BUCKET_BOUNDS, measured, side="left"), minlength=len(row) - 1)
            for bucket in np.flatnonzero(buckets).tolist():
                row[bucket] += int(buckets[bucket])
            row[-1] += ns
            slot = user.stage_ns[i]
            slot[0] += len(measured)
            slot[1] += ns
        total = stages.get("total_us")
        latency: list[tuple[int, int]] = []
        if total is not None and len(measured_total := total[~np.isnan(total)]):
            indices, counts = np.unique(hdr_indices(measured_total), return_counts=True)
            latency = list(zip(indices.tolist(), counts.tolist()))
        for usage in (user, stats):
            usage.requests += count
            if code is None:
                usage.success += count
            else:
                usage.failures[code] = usage.failures.get(code, 0) + count
            sketch = usage.latency.counts
            for index, n in latency:
                sketch[index] = sketch.get(index, 0) + n
            usage.bytes_in += bytes_in
            usage.bytes_out += bytes_out

    def add_cpu(self, model: str, version: int, clients: list[str], cpu_us: list[float]) -> None:
        """The worker CPU of requests record_many booked, in the order they were answered: one by one as
        record adds it, so each float sum comes out the same."""
        stats = self.by_model[(model, version)]
        for client, value in zip(clients, cpu_us):
            self.client_usage(client).cpu_us += value
            stats.cpu_us += value

    def client_usage(self, client: str) -> UsageStats:
        """The client's entry, made on first use (past MAX_CLIENTS keys: the shared OTHER_CLIENTS one)."""
        user = self.by_client.get(client)
        return user if user is not None else self._new_client(client)

    def record_batch(
        self,
        model: str,
        version: int,
        shared: dict[str, float],
        clients: list[str],
        own: list[tuple[float, float, float, float]],
        bytes_in: list[int],
        bytes_out: list[int],
    ) -> None:
        """Account the successful members of one batch: the same result as `record` once per member i
        with `{**dict(zip(MEMBER_STAGES, own[i])), **shared}`, clients[i], bytes_in[i], bytes_out[i], at a
        fraction of the cost (the hot path at high load): the stages the members share are bucketed once,
        the members' own stages a column at a time, and each client's figures added once per batch."""
        count = len(own)
        if not count:
            return
        stats, rows = self._model_rows(model, version, None)
        shared_ns: list[tuple[int, int]] = []
        for key, value in shared.items():
            i = _STAGE_INDEX.get(key)
            if i is None:
                continue
            ns = int(value * 1000)
            row = rows[i]
            row[bisect_left(DURATION_BUCKETS_US, value)] += count
            row[-1] += ns * count
            shared_ns.append((i, ns))
        cpu_us = shared.get("cpu_us", 0.0)
        stats.requests += count
        stats.success += count
        stats.cpu_us += cpu_us * count
        stats.bytes_in += sum(bytes_in)
        stats.bytes_out += sum(bytes_out)
        buckets = DURATION_BUCKETS_US
        columns = list(zip(*own))  # one tuple per MEMBER_STAGES entry
        ns_columns: list[list[int]] = []
        for i, column in zip(_MEMBER_INDEX, columns):
            row = rows[i]
            for value in column:
                row[bisect_left(buckets, value)] += 1
            ns_column = [int(value * 1000) for value in column]
            row[-1] += sum(ns_column)
            ns_columns.append(ns_column)
        indices = list(map(hdr_index, columns[-1]))  # total_us
        model_latency = stats.latency.counts
        for index in indices:
            model_latency[index] = model_latency.get(index, 0) + 1
        first = clients[0]
        if clients.count(first) == count:  # the common case: one client's requests
            self._add_client_share(first, shared_ns, cpu_us, count, [sum(ns) for ns in ns_columns], indices, sum(bytes_in), sum(bytes_out))
            return
        positions: dict[str, list[int]] = {}
        for position, client in enumerate(clients):
            positions.setdefault(client, []).append(position)
        for client, members in positions.items():
            self._add_client_share(
                client,
                shared_ns,
                cpu_us,
                len(members),
                [sum(ns[p] for p in members) for ns in ns_columns],
                [indices[p] for p in members],
                sum(bytes_in[p] for p in members),
                sum(bytes_out[p] for p in members),
            )

    def _add_client_share(
        self, client: str, shared_ns: list[tuple[int, int]], cpu_us: float, n: int, own_ns: list[int], indices: list[int], bytes_in: int, bytes_out: int
    ) -> None:
        """One client's `n` members of a batch: own_ns[k] = the summed ns of MEMBER_STAGES[k], indices =
        the HDR buckets of their total_us."""
        user = self.by_client.get(client)
        if user is None:
            user = self._new_client(client)
        user_stages = user.stage_ns
        for i, ns in shared_ns:
            slot = user_stages[i]
            slot[0] += n
            slot[1] += ns * n
        for i, ns in zip(_MEMBER_INDEX, own_ns):
            slot = user_stages[i]
            slot[0] += n
            slot[1] += ns
        counts = user.latency.counts
        for index in indices:
            counts[index] = counts.get(index, 0) + 1
        user.requests += n
        user.success += n
        user.bytes_in += bytes_in
        user.bytes_out += bytes_out
        user.cpu_us += cpu_us * n

    def _model_rows(self, model: str, version: int, code: str | None) -> tuple[UsageStats, list[list[int]]]:
        """A model version's stats and its duration rows for `code`, created on first use."""
        stats = self._model_stats(model, version)
        rows = stats.durations.get(code)
        if rows is None:
            rows = stats.durations[code] = [[0] * _BUCKET_ROW for _ in STAGES]
        return stats, rows

    def _model_stats(self, model: str, version: int) -> UsageStats:
        stats = self.by_model.get((model, version))
        if stats is None:
            stats = self.by_model[(model, version)] = UsageStats(by_model=True)
        return stats

    def _new_client(self, client: str) -> UsageStats:
        kept = self._labels.key(client)
        if kept != client:
            return self.client_usage(kept)
        if len(self.by_client) >= MAX_CLIENTS:
            client = OTHER_CLIENTS
            user = self.by_client.get(client)
            if user is not None:
                return user
        user = self.by_client[client] = UsageStats()
        return user

    def snapshot(self, restarts: dict[tuple[str, int], int] | None = None) -> dict[str, Any]:
        """Fresh copies of everything (safe to hand to another thread). Each model version's entry has
        `durations` (the Prometheus buckets, bounds in `duration_buckets_us`); clients' entries do not."""
        self.flush()
        models: dict[str, Any] = {}
        for (name, version), stats in sorted(self.by_model.items()):
            entry = models.setdefault(name, {"requests": 0, "success": 0, "failures": {}, "versions": {}})
            snap = stats.snapshot()
            if restarts is not None:
                snap["worker_restarts"] = restarts.get((name, version), 0)
            entry["versions"][str(version)] = snap
            entry["requests"] += snap["requests"]
            entry["success"] += snap["success"]
            for code, n in snap["failures"].items():
                entry["failures"][code] = entry["failures"].get(code, 0) + n
        return {
            "models": models,
            "clients": {client: stats.snapshot() for client, stats in sorted(self.by_client.items())},
            "rejected": dict(self.rejected),
            "operations": {op: dict(by_code) for op, by_code in sorted(self.operations.items())},
            "duration_buckets_us": list(DURATION_BUCKETS_US),
        }

