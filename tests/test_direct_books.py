"""The supervisor takes a worker's ledger in bulk (DirectBooks._apply_batch: numpy over every record a pass
finds) unless it must see records one by one (a chain's STAGE records, cache outcomes, access-log
sampling). Both ways must leave the same books: the bulk path is checked here against the one-by-one
path on the same records, written by the worker's own LedgerWriter into a real shared ledger, across the
ring's wrap-around."""
from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from openinfer.daemon.direct import ledger
from openinfer.daemon.direct.books import DirectBooks
from openinfer.daemon.direct.ledger import LedgerReader, LedgerRejected, LedgerWriter
from openinfer.daemon.modelstore.modelconfig import BatchingConfig, ModelConfig
from openinfer.daemon.modelstore.models import ServedModel
from openinfer.daemon.observability.accounting import CLIENT_KEY, OTHER_CLIENTS, Accountant

pytestmark = pytest.mark.unit

CLIENTS = ("app@uid=1000", "uid=65534", "other@uid=0")
SENT_NS = 86_400 * 40 * 10**9 + 123_456_789  # a monotonic clock 40 days up: past any timing's bound
DEADLINE_NS = SENT_NS + 30 * 10**9


@pytest.fixture()
def ledger_fd() -> Iterator[int]:
    fd = os.memfd_create("books-test")
    os.ftruncate(fd, ledger.PAGE_BYTES + ledger.LEDGER_BYTES)
    yield fd
    os.close(fd)


def worker() -> Any:
    model = ServedModel("tiny", 1, Path("/nonexistent/tiny/1/model.onnx"), ModelConfig(batching=BatchingConfig(max_batch_size=16)), 1, 1)
    return SimpleNamespace(model=model, stage_records=[], direct_pending={}, tasks_served=0, ledger=None, retired=False)


def write_traffic(writer: LedgerWriter, rng: random.Random, serial: int, requests: int) -> int:
    """What a worker writes for `requests` requests: admitted, run in batches, answered (some failed,
    some stages unmeasured), plus refusals and counted operations in between. Returns the next serial."""
    open_serials = []
    for _ in range(requests):
        serial += 1
        client = rng.choice(CLIENTS)
        writer.admitted(serial, serial * 3, client, rng.randrange(1 << 12), DEADLINE_NS + serial, SENT_NS + serial)
        open_serials.append((serial, client))
        if rng.random() < 0.05:
            writer.refused(serial * 7, client, rng.choice(["infer", "(malformed)", "attach"]), "INVALID_ARGUMENT", rng.uniform(1, 90))
        if rng.random() < 0.03:
            writer.counted(client, "attach")
        if len(open_serials) >= rng.randrange(1, 17) or rng.random() < 0.1:
            writer.run(len(open_serials))
            for done, owner in open_serials[: len(open_serials) - (rng.random() < 0.2)]:  # one may stay open
                code = rng.choice([None] * 8 + ["DEADLINE_EXCEEDED", "INTERNAL"])
                timing = {key: rng.uniform(0, 4e4) for key in ledger.TIMING_KEYS if rng.random() < 0.9}
                writer.answered(done, done * 3, owner, code, timing, rng.randrange(1 << 12), rng.randrange(1 << 12))
            open_serials = []
    return serial


def test_the_bulk_path_leaves_the_same_books_as_one_record_at_a_time(ledger_fd: int) -> None:
    writer = LedgerWriter(ledger_fd)
    readers = {name: LedgerReader(ledger_fd, CLIENT_KEY, OTHER_CLIENTS) for name in ("bulk", "each")}
    books = {"bulk": DirectBooks(Accountant(), lambda w, e: None), "each": DirectBooks(Accountant(), lambda w, e: None, lambda: True)}
    workers = {name: worker() for name in books}
    rng = random.Random(5)
    serial = 0
    try:
        # Past the ring's end several times, in passes of different sizes; both readers take each pass.
        for _ in range(12):
            serial = write_traffic(writer, rng, serial, rng.randrange(200, ledger.RING_RECORDS // 5))
            for name in books:
                workers[name].ledger = readers[name]
                assert books[name].read(workers[name]) > 0
        assert writer.dropped == 0 and serial > 2 * ledger.RING_RECORDS // 3
        bulk, each = workers["bulk"], workers["each"]
        assert books["bulk"].accountant.snapshot() == books["each"].accountant.snapshot()
        assert bulk.model.batch_sizes == each.model.batch_sizes and sum(bulk.model.batch_sizes.values()) > 0
        assert bulk.direct_pending == each.direct_pending and bulk.tasks_served == each.tasks_served > 0
    finally:
        writer.close()
        for reader in readers.values():
            reader.close()


def test_a_run_larger_than_the_models_batches_is_refused_in_bulk_too(ledger_fd: int) -> None:
    writer, reader = LedgerWriter(ledger_fd), LedgerReader(ledger_fd, CLIENT_KEY, OTHER_CLIENTS)
    try:
        writer.admitted(1, 1, CLIENTS[0], 4, DEADLINE_NS, SENT_NS)
        writer.run(17)
        books, plain = DirectBooks(Accountant(), lambda w, e: None), worker()
        plain.ledger = reader
        with pytest.raises(LedgerRejected, match="a run of 17"):
            books.read(plain)
    finally:
        writer.close()
        reader.close()


def test_a_chains_stage_records_pair_with_an_answer_read_in_the_next_pass(ledger_fd: int) -> None:
    """A pass can end between a chain request's STAGE records and its ANSWERED: the next pass, which holds
    no STAGE record, must still pair them (the bulk path would count the answer without its stages and
    leave them for the next request's)."""
    from openinfer.daemon.modelstore.modelconfig import ChainConfig

    writer, reader = LedgerWriter(ledger_fd), LedgerReader(ledger_fd, CLIENT_KEY, OTHER_CLIENTS)
    try:
        model = ServedModel("both", 1, Path("/nonexistent/both/config.toml"), ModelConfig(chain=ChainConfig(("first", "second"))), 1, 1)
        chain = SimpleNamespace(model=model, stage_records=[], direct_pending={}, tasks_served=0, ledger=reader)
        books = DirectBooks(Accountant(), lambda w, e: None)
        writer.admitted(1, 1, CLIENTS[0], 4, DEADLINE_NS, SENT_NS)
        writer.stage(0, 1, 100.0)
        assert books.read(chain) == 2
        writer.answered(1, 1, CLIENTS[0], None, {"compute_us": 300.0, "total_us": 400.0}, 4, 4)
        assert books.read(chain) == 1
        assert model.stage_totals == {"first": [1, 1, 100.0]} and chain.stage_records == []
    finally:
        writer.close()
        reader.close()


def forged(fd: int, rows: list[dict[str, Any]], names: dict[int, str]) -> None:
    """Write records as a hostile worker may (any field, any order), numbered and published."""
    import mmap

    import numpy as np

    ring = mmap.mmap(fd, ledger.LEDGER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=ledger.PAGE_BYTES)
    for slot, key in names.items():
        raw = key.encode()
        ring[64 + slot * ledger.SLOT_BYTES : 64 + slot * ledger.SLOT_BYTES + 1 + len(raw)] = bytes((len(raw),)) + raw
    records = np.zeros(len(rows), dtype=ledger.RECORD_DTYPE)
    records["timing"] = np.nan
    for i, row in enumerate(rows):
        for key, value in row.items():
            records[i][key] = value
    records["seq"] = np.arange(1, len(rows) + 1)
    at = 64 + ledger.MAX_CLIENT_SLOTS * ledger.SLOT_BYTES
    ring[at : at + records.nbytes] = records.tobytes()
    ring[0:8] = len(rows).to_bytes(8, "little")
    ring.close()


def both_ways(rows: list[dict[str, Any]], names: dict[int, str]) -> dict[str, Any]:
    """The same records read in bulk and one by one: each way's books, worker and refusal."""
    out = {}
    for name, one_by_one in (("bulk", False), ("each", True)):
        fd = os.memfd_create("books-forged")
        os.ftruncate(fd, ledger.PAGE_BYTES + ledger.LEDGER_BYTES)
        forged(fd, rows, names)
        books, plain = DirectBooks(Accountant(), lambda w, e: None, lambda one_by_one=one_by_one: one_by_one), worker()
        plain.ledger = LedgerReader(fd, CLIENT_KEY, OTHER_CLIENTS)
        try:
            books.read(plain)
            refused = None
        except LedgerRejected as exc:
            refused = str(exc)
        out[name] = SimpleNamespace(books=books, worker=plain, refused=refused)
        plain.ledger.close()
        os.close(fd)
    return out


ONE_US = [1.0] * len(ledger.TIMING_KEYS)
ADMITTED_US = [DEADLINE_NS // 1000, SENT_NS // 1000] + [float("nan")] * (len(ledger.TIMING_KEYS) - 2)


def test_nothing_of_a_pass_is_booked_when_one_of_its_records_is_refused() -> None:
    """Found by an attacker: the bulk path booked a pass's answers before checking its RUN records, so
    answers written after a refused record (500 of them, for a client that never connected) counted."""
    rows = [{"kind": ledger.ANSWERED, "serial": 1, "slot": 0, "timing": ONE_US}, {"kind": ledger.RUN, "run_size": 999}]
    rows += [{"kind": ledger.ANSWERED, "serial": 100 + i, "slot": 1, "bytes_in": 1 << 40, "timing": ONE_US} for i in range(500)]
    out = both_ways(rows, {0: "app@uid=1000", 1: "victim@uid=1001"})
    for way in out.values():
        assert way.refused and "a run of 999" in way.refused
        assert "victim@uid=1001" not in way.books.accountant.by_client and way.worker.tasks_served <= 1


def test_requests_open_and_close_in_record_order() -> None:
    """Found by an attacker: admitting every request of a pass before closing any lost the order, so an
    answer that came before its admission, or a serial used again, left other requests open than one by
    one (what a dead worker's books count as lost)."""
    rows = [
        {"kind": ledger.ANSWERED, "serial": 7, "slot": 0, "timing": ONE_US},
        {"kind": ledger.ADMITTED, "serial": 7, "slot": 0, "bytes_in": 10, "timing": ADMITTED_US},
        {"kind": ledger.ADMITTED, "serial": 8, "slot": 0, "bytes_in": 10, "timing": ADMITTED_US},
        {"kind": ledger.ANSWERED, "serial": 8, "slot": 0, "timing": ONE_US},
        {"kind": ledger.ADMITTED, "serial": 8, "slot": 0, "bytes_in": 10, "timing": ADMITTED_US},
    ]
    out = both_ways(rows, {0: "app@uid=1000"})
    opened = ("app@uid=1000", 10, DEADLINE_NS // 1000 * 1000, SENT_NS // 1000 * 1000)
    assert out["bulk"].worker.direct_pending == out["each"].worker.direct_pending == {7: opened, 8: opened}


def test_cpu_sums_come_out_the_same_float() -> None:
    """Found by an attacker: summed client by client, the model's CPU total differed in its last digits
    from the sum in answer order. Now both are added in answer order."""
    cpus = [0.1, 1e11, 0.2, 0.3, 1e-3, 7.7, 1e11 + 0.5, 3.3] * 4
    rows = [{"kind": ledger.ANSWERED, "serial": i + 1, "slot": i % 2, "code": (i // 3) % 2, "timing": [float("nan")] * 7 + [cpu]} for i, cpu in enumerate(cpus)]
    out = both_ways(rows, {0: "a@uid=1", 1: "b@uid=2"})
    bulk, each = out["bulk"].books.accountant, out["each"].books.accountant
    assert bulk.by_model[("tiny", 1)].cpu_us == each.by_model[("tiny", 1)].cpu_us
    assert {k: v.cpu_us for k, v in bulk.by_client.items()} == {k: v.cpu_us for k, v in each.by_client.items()}


def test_a_pass_of_many_small_groups_is_read_one_by_one_and_a_pass_is_bounded(ledger_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an attacker: a worker naming a new (client, code) pair in every record made each record its
    own numpy group, and one pass of its ring cost the supervisor's loop 14 times what reading it one by one
    costs. Such a pass is read one by one; and the housekeeping pass takes at most `limit` records."""
    from openinfer.daemon.direct import books as books_module

    rows = [{"kind": ledger.ANSWERED, "serial": i + 1, "slot": i % 200, "code": i % 9, "timing": ONE_US} for i in range(1800)]
    forged(ledger_fd, rows, {slot: f"c{slot}@uid={slot}" for slot in range(200)})
    bulk = []
    monkeypatch.setattr(books_module.DirectBooks, "_apply_batch", lambda self, *args: bulk.append(args))
    books, plain = DirectBooks(Accountant(), lambda w, e: None), worker()
    plain.ledger = LedgerReader(ledger_fd, CLIENT_KEY, OTHER_CLIENTS)
    try:
        assert books.read(plain, limit=books_module.PASS_RECORDS) == books_module.PASS_RECORDS
        books.read_all([plain], lambda w, why: None, limit=1000)
        assert books.behind  # stopped at its limit: the supervisor reads again at once
        assert books.read(plain) == 1800 - books_module.PASS_RECORDS - 1000
        assert not bulk and plain.tasks_served == 1800
    finally:
        plain.ledger.close()


def test_a_dead_workers_unanswered_requests_count_as_their_clients_answer_them(ledger_fd: int) -> None:
    """Each request a worker admitted and never answered counts with the code the client library gives it
    when the worker's connection closes (client/core.py link_lost): DEADLINE_EXCEEDED past its deadline or
    past max_compute_ms from when it was sent, else WORKER_CRASHED. (The books used one code for all of a
    dead worker's requests: DEADLINE_EXCEEDED for every one of a worker killed for an overstay, while the
    clients of those still in time reported WORKER_CRASHED.)"""
    import time

    plain = worker()
    max_compute_ns = plain.model.config.max_compute_ms * 1_000_000
    now = time.monotonic_ns()
    writer = LedgerWriter(ledger_fd)
    writer.admitted(1, 1, CLIENTS[0], 4, now - 10**9, now - 2 * 10**9)  # its deadline passed
    writer.admitted(2, 2, CLIENTS[0], 4, now + 60 * 10**9, now - max_compute_ns - 10**9)  # sent longer ago than max_compute_ms
    writer.admitted(3, 3, CLIENTS[1], 4, now + 60 * 10**9, now - 10**9)  # in time: its worker crashed under it
    writer.admitted(4, 4, CLIENTS[1], 4, now + 60 * 10**9, now - 10**9)
    writer.answered(4, 4, CLIENTS[1], None, {"total_us": 5.0}, 4, 4)
    plain.ledger = LedgerReader(ledger_fd, CLIENT_KEY, OTHER_CLIENTS)
    books = DirectBooks(Accountant(), lambda w, e: None, lambda: False)
    try:
        assert books.lost(plain) == 3
    finally:
        writer.close()
    by_client = books.accountant.snapshot()["clients"]
    assert by_client[CLIENTS[0]]["failures"] == {"DEADLINE_EXCEEDED": 2}, by_client
    assert by_client[CLIENTS[1]]["failures"] == {"WORKER_CRASHED": 1}, by_client
