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


@pytest.fixture()
def ledger_fd() -> Iterator[int]:
    fd = os.memfd_create("books-test")
    os.ftruncate(fd, ledger.PAGE_BYTES + ledger.LEDGER_BYTES)
    yield fd
    os.close(fd)


def worker() -> Any:
    model = ServedModel("tiny", 1, Path("/nonexistent/tiny/1/model.onnx"), ModelConfig(batching=BatchingConfig(max_batch_size=16)), 1, 1)
    return SimpleNamespace(model=model, stage_records=[], direct_pending={}, tasks_served=0, ledger=None)


def write_traffic(writer: LedgerWriter, rng: random.Random, serial: int, requests: int) -> int:
    """What a worker writes for `requests` requests: admitted, run in batches, answered (some failed,
    some stages unmeasured), plus refusals and counted operations in between. Returns the next serial."""
    open_serials = []
    for _ in range(requests):
        serial += 1
        client = rng.choice(CLIENTS)
        writer.admitted(serial, serial * 3, client, rng.randrange(1 << 12))
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
        writer.admitted(1, 1, CLIENTS[0], 4)
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
        writer.admitted(1, 1, CLIENTS[0], 4)
        writer.stage(0, 1, 100.0)
        assert books.read(chain) == 2
        writer.answered(1, 1, CLIENTS[0], None, {"compute_us": 300.0, "total_us": 400.0}, 4, 4)
        assert books.read(chain) == 1
        assert model.stage_totals == {"first": [1, 1, 100.0]} and chain.stage_records == []
    finally:
        writer.close()
        reader.close()
