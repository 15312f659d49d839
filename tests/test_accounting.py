"""Accounting: exact counts, exact stage sums, HDR percentiles within their stated error, clients kept
apart, on real Accountant objects (test_accounting_live.py: the same end to end against a daemon)."""
from __future__ import annotations

import random
from bisect import bisect_left
from collections import Counter, defaultdict
from typing import Any, Callable

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

from openinfer.wire.errors import ErrorCode
from openinfer.daemon.observability.accounting import (
    DURATION_BUCKETS_US,
    HDR_HIGHEST_US,
    HDR_SIGNIFICANT_DIGITS,
    MAX_CLIENTS,
    MEMBER_STAGES,
    OTHER_CLIENTS,
    PERCENTILES,
    STAGES,
    Accountant,
    LatencySketch,
    hdr_bucket_range,
    hdr_index,
    hdr_indices,
)

pytestmark = pytest.mark.unit

SERVER_STAGES = ("decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us")
# 2 significant digits: sub-buckets of width 2**b hold values >= 128 * 2**b, so a reported value is at
# most 1/128 above the exact order statistic (of whole microseconds); below 256 µs it is exact.
RELATIVE_ERROR = 0.01


def success_timing(rng: random.Random) -> dict[str, float]:
    """A success reply's timing as the supervisor builds it (stages, cpu, total >= their sum)."""
    timing = {key: rng.uniform(0.0, 300.0) for key in SERVER_STAGES}
    timing["cpu_us"] = rng.uniform(0.0, 400.0)
    timing["total_us"] = sum(timing[k] for k in SERVER_STAGES) + rng.uniform(0.0, 50.0)
    return timing


def ns(value_us: float) -> int:
    return int(value_us * 1000)


# -- unit: counts and sums ---------------------------------------------------------------------------
def test_counts_stage_sums_bytes_and_cpu_are_exact_after_a_mixed_run() -> None:
    rng = random.Random(7)
    acc = Accountant()
    codes = [None] * 12 + [code.value for code in ErrorCode]
    want_requests: Counter[tuple[str, int]] = Counter()
    want_codes: dict[tuple[str, int], Counter[str]] = {}
    want_stage: dict[tuple[str, int], dict[str, list[int]]] = {}
    want_buckets: dict[tuple[tuple[str, int], str, str], list[float]] = {}
    want_client: dict[str, Counter[str]] = {}
    want_bytes: Counter[tuple[str, int, str]] = Counter()
    want_cpu_us: dict[tuple[str, int], float] = defaultdict(float)
    want_rejected: Counter[str] = Counter()
    for _ in range(5000):
        code = rng.choice(codes)
        client = rng.choice(["alice@uid=0", "bob@uid=0", "0badc0de"])
        known = code is None or rng.random() < 0.8
        if code is not None and not known:  # refused before a model was known (malformed, NOT_FOUND, ...)
            timing = {"total_us": rng.uniform(1.0, 80.0)}
            acc.record(None, None, client, code, timing)
            want_rejected[code] += 1
            want_client.setdefault(client, Counter())[code] += 1
            continue
        key = (rng.choice(["tiny", "ocr"]), rng.choice([1, 2]))
        if code is None or code in ("WORKER_CRASHED", "INTERNAL"):
            timing = success_timing(rng)  # a worker answered: every stage is there
            if code is not None:
                del timing["prep_us"], timing["compute_us"], timing["encode_us"]
            if rng.random() < 0.2:
                timing["batch_wait_us"] = timing["queue_us"]
        else:
            timing = {"total_us": rng.uniform(1.0, 5e7)}  # refused or expired before dispatch
        bytes_in, bytes_out = rng.randrange(1 << 20), (rng.randrange(1 << 20) if code is None else 0)
        acc.record(key[0], key[1], client, code, timing, bytes_in, bytes_out)
        label = code or "OK"
        want_requests[key] += 1
        want_codes.setdefault(key, Counter())[label] += 1
        want_client.setdefault(client, Counter())[label] += 1
        want_bytes[(*key, "in")] += bytes_in
        want_bytes[(*key, "out")] += bytes_out
        want_cpu_us[key] += timing.get("cpu_us", 0.0)
        for k, v in timing.items():
            if k in ("cpu_us",):
                continue
            slot = want_stage.setdefault(key, {}).setdefault(k[: -len("_us")], [0, 0])
            slot[0] += 1
            slot[1] += ns(v)
            want_buckets.setdefault((key, label, k[: -len("_us")]), []).append(v)

    snap = acc.snapshot({("tiny", 1): 3})
    assert snap["rejected"] == dict(want_rejected)
    assert snap["duration_buckets_us"] == list(DURATION_BUCKETS_US)
    for key, n in want_requests.items():
        name, version = key
        got = snap["models"][name]["versions"][str(version)]
        assert got["requests"] == n
        assert got["success"] == want_codes[key]["OK"]
        assert got["failures"] == {c: k for c, k in want_codes[key].items() if c != "OK"}
        assert got["stages"] == {stage: {"count": c, "ns": s} for stage, (c, s) in want_stage[key].items()}
        assert set(got["stages"]) <= set(STAGES)
        assert got["latency"]["count"] == n == got["stages"]["total"]["count"]
        assert got["bytes_in"] == want_bytes[(*key, "in")] and got["bytes_out"] == want_bytes[(*key, "out")]
        assert got["cpu_seconds"] == pytest.approx(want_cpu_us[key] / 1e6, abs=1e-6)
        assert got["worker_restarts"] == (3 if key == ("tiny", 1) else 0)
        for label, by_stage in got["durations"].items():
            for stage, row in by_stage.items():
                values = want_buckets[(key, label, stage)]
                assert row["count"] == len(values) and row["ns"] == sum(ns(v) for v in values)
                # `le` is cumulative and inclusive, as Prometheus buckets are.
                assert row["le"] == [sum(1 for v in values if v <= bound) for bound in DURATION_BUCKETS_US]
        model = snap["models"][name]
        assert model["requests"] == sum(n for (m, _), n in want_requests.items() if m == name)
    for client, counts in want_client.items():
        got = snap["clients"][client]
        assert got["requests"] == sum(counts.values()) and got["success"] == counts["OK"]
        assert got["failures"] == {c: k for c, k in counts.items() if c != "OK"}
        assert "durations" not in got
    assert sum(c["requests"] for c in snap["clients"].values()) == sum(want_requests.values()) + sum(want_rejected.values())


def test_a_batch_recorded_at_once_equals_its_members_recorded_one_by_one() -> None:
    """record_batch buckets the stages a batch's members share once: the figures must not differ."""
    rng = random.Random(3)
    one_by_one, at_once = Accountant(), Accountant()
    for _ in range(300):
        key = (rng.choice(["tiny", "ocr"]), rng.choice([1, 2]))
        whole = success_timing(rng)
        shared = {k: whole[k] for k in ("dispatch_us", "prep_us", "compute_us", "encode_us", "return_us", "cpu_us")}
        members = []
        for _ in range(rng.randrange(1, 12)):
            own = (rng.uniform(1, 50), rng.uniform(1, 5e4), rng.uniform(0, 600), rng.uniform(100, 1e5))  # MEMBER_STAGES
            client = rng.choice(["alice@uid=0", "bob@uid=0", "0badc0de"])
            bytes_in, bytes_out = rng.randrange(1 << 16), rng.randrange(1 << 16)
            members.append((client, own, bytes_in, bytes_out))
            one_by_one.record(key[0], key[1], client, None, {**dict(zip(MEMBER_STAGES, own)), **shared}, bytes_in, bytes_out)
        clients, own, bytes_in, bytes_out = (list(column) for column in zip(*members))
        at_once.record_batch(key[0], key[1], shared, clients, own, bytes_in, bytes_out)
    one_by_one.record("tiny", 1, "alice@uid=0", "INVALID_ARGUMENT", {"total_us": 12.0})  # the two mix
    at_once.record("tiny", 1, "alice@uid=0", "INVALID_ARGUMENT", {"total_us": 12.0})

    def without_cpu(snapshot: dict[str, Any]) -> tuple[dict[str, Any], list[float]]:
        cpu = []
        for entry in [*snapshot["clients"].values(), *(v for m in snapshot["models"].values() for v in m["versions"].values())]:
            cpu.append(entry.pop("cpu_seconds"))
        return snapshot, cpu

    want, want_cpu = without_cpu(one_by_one.snapshot())
    got, got_cpu = without_cpu(at_once.snapshot())
    assert got == want
    assert got_cpu == pytest.approx(want_cpu, rel=1e-9)  # summed in another order


def test_requests_recorded_many_at_once_equal_the_same_recorded_one_by_one() -> None:
    """record_many (a worker's ledger read in bulk) must add exactly what record adds per request: counts,
    stage sums to the nanosecond, duration buckets, the latency sketch, bytes and the CPU sum - with
    stages missing from some requests (NaN) and values on bucket bounds; add_cpu adds the CPU in answer order."""
    from openinfer.daemon.direct.ledger import TIMING_KEYS

    rng = random.Random(11)
    one_by_one, at_once = Accountant(), Accountant()
    for _ in range(60):
        client = rng.choice(["alice@uid=0", "uid=65534"])
        code = rng.choice([None, None, "INVALID_ARGUMENT", "DEADLINE_EXCEEDED"])
        rows, bytes_in, bytes_out = [], 0, 0
        for _ in range(rng.randrange(1, 40)):
            timing = {key: rng.choice([rng.uniform(0.0, 3e5), float(rng.choice(DURATION_BUCKETS_US)), rng.uniform(0, 2)]) for key in TIMING_KEYS if rng.random() < 0.8}
            size_in, size_out = rng.randrange(1 << 20), rng.randrange(1 << 20)
            one_by_one.record("tiny", 1, client, code, timing, size_in, size_out)
            rows.append(timing)
            bytes_in, bytes_out = bytes_in + size_in, bytes_out + size_out
        stages = {key: np.array([row.get(key, np.nan) for row in rows]) for key in TIMING_KEYS}
        at_once.record_many("tiny", 1, client, code, stages, bytes_in, bytes_out)
        at_once.add_cpu("tiny", 1, [client] * len(rows), [row.get("cpu_us", 0.0) for row in rows])
    assert at_once.snapshot() == one_by_one.snapshot()


def test_hdr_indices_is_hdr_index_for_every_value() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([np.arange(0, 5000, 0.5), rng.uniform(0, 2 * HDR_HIGHEST_US, 20_000), 2.0 ** np.arange(0, 33), 2.0 ** np.arange(1, 33) - 1])
    assert hdr_indices(values).tolist() == [hdr_index(value) for value in values.tolist()]


def test_batches_recorded_later_are_in_every_snapshot_and_held_only_boundedly() -> None:
    """record_batch_later defers the work to the loop's idle moments: a snapshot taken before any idle
    moment must still count every batch, and a loop that is never idle must not pile them up."""
    from openinfer.daemon.observability.accounting import PENDING_BATCHES_MAX

    shared = {"dispatch_us": 30.0, "prep_us": 2.0, "compute_us": 40.0, "encode_us": 3.0, "return_us": 20.0, "cpu_us": 35.0}
    own = [(5.0, 200.0, 100.0, 400.0), (6.0, 180.0, 90.0, 410.0)]
    now, later = Accountant(), Accountant()
    now.record_batch("tiny", 1, shared, ["a", "b"], own, [256, 256], [1024, 1024])
    later.record_batch_later("tiny", 1, shared, ["a", "b"], own, [256, 256], [1024, 1024])
    assert later.snapshot() == now.snapshot()  # nothing flushed it but the snapshot itself
    for _ in range(PENDING_BATCHES_MAX * 3):
        later.record_batch_later("tiny", 1, shared, ["a"], own[:1], [256], [1024])
    assert len(later._pending_batches) < PENDING_BATCHES_MAX
    later.flush()
    assert later.snapshot()["models"]["tiny"]["requests"] == 2 + PENDING_BATCHES_MAX * 3


def test_keys_outside_the_stages_are_ignored_and_batch_wait_is_its_own_row() -> None:
    acc = Accountant()
    acc.record("m", 1, "c", None, {"queue_us": 40.0, "batch_wait_us": 30.0, "client_us": 9e9, "transport_us": 5.0, "cpu_us": 7.0, "total_us": 100.0})
    got = acc.snapshot()["models"]["m"]["versions"]["1"]
    assert got["stages"] == {"queue": {"count": 1, "ns": 40_000}, "batch_wait": {"count": 1, "ns": 30_000}, "total": {"count": 1, "ns": 100_000}}
    assert got["latency"]["mean_us"] == 100.0


def test_two_named_clients_are_accounted_separately() -> None:
    acc = Accountant()
    rng = random.Random(1)
    for _ in range(30):
        acc.record("tiny", 1, "alice@uid=1000", None, success_timing(rng), 256, 256)
    for _ in range(7):
        acc.record("tiny", 1, "bob@uid=1000", None, success_timing(rng), 256, 256)
    acc.record("tiny", 1, "bob@uid=1000", "INVALID_ARGUMENT", {"total_us": 12.0})
    acc.record(None, None, "bob@uid=1000", "NOT_FOUND", {"total_us": 3.0})
    clients = acc.snapshot()["clients"]
    assert set(clients) == {"alice@uid=1000", "bob@uid=1000"}
    assert (clients["alice@uid=1000"]["requests"], clients["alice@uid=1000"]["success"], clients["alice@uid=1000"]["failures"]) == (30, 30, {})
    assert (clients["bob@uid=1000"]["requests"], clients["bob@uid=1000"]["success"]) == (9, 7)
    assert clients["bob@uid=1000"]["failures"] == {"INVALID_ARGUMENT": 1, "NOT_FOUND": 1}
    assert clients["alice@uid=1000"]["bytes_in"] == 30 * 256 and clients["bob@uid=1000"]["bytes_in"] == 7 * 256
    assert clients["bob@uid=1000"]["stages"]["total"]["count"] == 9
    assert clients["bob@uid=1000"]["stages"]["compute"]["count"] == 7


def test_client_keys_are_bounded() -> None:
    acc = Accountant()
    for i in range(MAX_CLIENTS + 50):
        acc.record("m", 1, f"{i:08x}", None, {"total_us": 10.0})
    clients = acc.snapshot()["clients"]
    assert len(clients) == MAX_CLIENTS + 1
    assert clients[OTHER_CLIENTS]["requests"] == 50
    assert sum(c["requests"] for c in clients.values()) == MAX_CLIENTS + 50


def test_snapshot_is_a_copy() -> None:
    acc = Accountant()
    acc.record("m", 1, "c", None, {"compute_us": 5.0, "total_us": 10.0})
    snap = acc.snapshot()
    before = repr(snap)
    for _ in range(10):
        acc.record("m", 1, "c", "INTERNAL", {"compute_us": 5.0, "total_us": 10.0})
    assert repr(snap) == before


# -- unit: the HDR sketch -----------------------------------------------------------------------------
def test_hdr_layout_is_hdrh_index_for_index() -> None:
    reference = HdrHistogram(1, HDR_HIGHEST_US, HDR_SIGNIFICANT_DIGITS)
    rng = np.random.default_rng(0)
    values = np.concatenate([np.arange(1, 20_000), rng.integers(1, HDR_HIGHEST_US, 20_000), 2 ** np.arange(0, 31), 2 ** np.arange(1, 31) - 1])
    for value in values.tolist():
        index = hdr_index(value)
        assert index == reference._counts_index_for(value), value
        low, high = hdr_bucket_range(index)
        assert (low, high) == (reference.get_lowest_equivalent_value(value), reference.get_highest_equivalent_value(value)), value
        assert low <= value <= high
        if value < 256:
            assert low == high == value  # exact below 2**8
        else:
            assert (high - low + 1) / low <= 1 / 128  # the 2-significant-digit bound (< 1 %)
    assert hdr_index(0.2) == hdr_index(1) and hdr_index(10 * HDR_HIGHEST_US) == hdr_index(HDR_HIGHEST_US)


DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "lognormal": lambda rng, n: rng.lognormal(np.log(250.0), 0.6, n),
    "lognormal_wide": lambda rng, n: rng.lognormal(np.log(2000.0), 1.5, n),
    "exponential": lambda rng, n: rng.exponential(800.0, n),
    "uniform": lambda rng, n: rng.uniform(50.0, 150_000.0, n),
    "bimodal": lambda rng, n: np.where(rng.random(n) < 0.9, rng.normal(180.0, 15.0, n), rng.normal(45_000.0, 4_000.0, n)).clip(1.0),
    "pareto_tail": lambda rng, n: 100.0 * (1.0 + rng.pareto(1.5, n)),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_percentiles_match_numpy_within_the_stated_error(name: str) -> None:
    samples = DISTRIBUTIONS[name](np.random.default_rng(42), 100_000)
    acc = Accountant()
    for value in samples.tolist():
        acc.record("m", 1, "c", None, {"total_us": value})
    latency = acc.snapshot()["models"]["m"]["versions"]["1"]["latency"]
    recorded = np.clip(samples.astype(np.int64), 1, HDR_HIGHEST_US)  # what the sketch keeps: whole µs
    ordered = np.sort(recorded)
    for p in PERCENTILES:
        got = latency[f"p{p:g}_us"]
        exact = float(ordered[max(1, int(p * ordered.size / 100 + 0.5)) - 1])  # the order statistic HDR rounds
        assert exact <= got <= exact * (1 + RELATIVE_ERROR), (name, p, got, exact)
        raw = float(np.percentile(samples, p))  # numpy's default (interpolated), on the raw floats
        assert abs(got - raw) <= RELATIVE_ERROR * raw + 1.0, (name, p, got, raw)
    assert latency["mean_us"] == pytest.approx(sum(int(v * 1000) for v in samples.tolist()) / samples.size / 1000, abs=0.05)
    assert recorded.max() <= latency["max_us"] <= recorded.max() * (1 + RELATIVE_ERROR)
    # And the same numbers hdrh itself reports for the same values.
    hist = HdrHistogram(1, HDR_HIGHEST_US, HDR_SIGNIFICANT_DIGITS)
    for value in recorded.tolist():
        hist.record_value(value)
    assert {f"p{p:g}_us": latency[f"p{p:g}_us"] for p in PERCENTILES} == {f"p{p:g}_us": hist.get_value_at_percentile(p) for p in PERCENTILES}
    assert latency["max_us"] == hist.get_max_value()


def test_sketch_round_trips_through_hdrh() -> None:
    sketch = LatencySketch()
    for value in np.random.default_rng(5).lognormal(6.0, 1.0, 5000).tolist():
        sketch.record(value)
    hist = sketch.to_hdr()
    assert hist.get_total_count() == sketch.total == 5000
    assert {p: hist.get_value_at_percentile(p) for p in PERCENTILES} == sketch.percentiles()
    assert LatencySketch().percentiles() == {} and LatencySketch().max_us() == 0


def test_duration_buckets_span_50us_to_60s() -> None:
    assert DURATION_BUCKETS_US[0] == 50 and DURATION_BUCKETS_US[-1] == 60_000_000
    assert list(DURATION_BUCKETS_US) == sorted(set(DURATION_BUCKETS_US))
    assert bisect_left(DURATION_BUCKETS_US, 50.0) == 0 and bisect_left(DURATION_BUCKETS_US, 50.001) == 1
