"""The supervisor's side of the ledgers (ledger.py): each worker's records of its direct requests, read
and put into the books - the accountant (stats, metrics), the models' batch sizes, the access log -
checked first. What a worker admitted and never answered is counted when it is gone."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from openinfer.daemon.observability.accounting import CLIENT_KEY, OTHER_CLIENTS, Accountant
from openinfer.daemon.workerpool.workers import WorkerHandle

from openinfer.daemon.steps.contract import MAX_MODEL_CALLS

from .ledger import MAX_ADMITTED, ADMITTED, ADMITTED_DEADLINE_US, ADMITTED_SENT_US, ANSWERED, CACHE_HIT, CODES, COUNTED, LEASE_EXPIRED, REFUSED, RUN, STAGE, TIMING_KEYS, Entry, LedgerReader, LedgerRejected, RecordBatch

LogAccess = Callable[[WorkerHandle, Entry], None]


# A pass books a plain model's records in bulk only while its (client, code) groups average at least this
# many records: each group costs ~100 us of numpy calls, a record ~10 us one by one. A worker that names a
# new client in every record (it may: the keys are its word) gets the one-by-one cost, not 16 times it.
MIN_RECORDS_PER_GROUP = 16
# The housekeeping pass reads at most this many records of one worker (the rest wait for the next pass, 20 ms
# on): a worker that floods its ledger holds the supervisor's loop for a bounded time. Honest workers at
# 35 k requests/s write ~700 per pass. `stats` and metrics snapshots read everything: they are exact.
PASS_RECORDS = 512


def _opened(client: str, bytes_in: int, deadline_us: float, sent_us: float) -> tuple[str, int, int, int]:
    """What the books keep of a request a worker admitted, until it is answered (WorkerHandle.direct_pending):
    its ADMITTED record's clock readings back in nanoseconds, as DirectBooks.lost compares them."""
    return client, bytes_in, int(deadline_us * 1000), int(sent_us * 1000)


def _keep_open(pending: dict[int, tuple[str, int, int, int]], serial: int, opened: tuple[str, int, int, int]) -> None:
    """An admitted request into worker.direct_pending, which holds at most MAX_ADMITTED: a conforming
    worker never has more open (its queue refuses them), so past that the oldest goes - a request whose
    answer the ring dropped, or a forgery; either way no more memory, and no longer a pass, for it."""
    if len(pending) >= MAX_ADMITTED and serial not in pending:
        del pending[next(iter(pending))]
    pending[serial] = opened


def _groups(answered: np.ndarray) -> np.ndarray:
    """Each ANSWERED record's (client slot, code) group, as one number."""
    return answered["slot"].astype(np.int64) * len(CODES) + answered["code"]


class DirectBooks:
    def __init__(self, accountant: Accountant, log_access: LogAccess, logging_access: Callable[[], bool] = lambda: False) -> None:
        self.accountant = accountant
        self.log_access = log_access  # a sampled answer, for the access log
        self.logging_access = logging_access  # whether the access log samples answers: then each is seen one by one
        self.active = False  # the last read found records: read again soon
        self.behind = False  # the last read stopped at its limit with records left: read again at once

    @staticmethod
    def open(worker: WorkerHandle, fd: int, max_request_bytes: int, max_answer_bytes: int) -> None:
        # A record may name only an identity its model version leased to: a worker (its model's steps)
        # that names any other, a uid that never called it, books it under OTHER_CLIENTS. And it may book
        # no request larger than the worker admits (`max_request_bytes`, as the worker was given it), nor
        # an answer larger than the worker's memory can hold (`max_answer_bytes`).
        lessees = worker.model.lessees
        worker.ledger = LedgerReader(fd, CLIENT_KEY, OTHER_CLIENTS, lessees.__contains__, max_request_bytes, max_answer_bytes)

    def read(self, worker: WorkerHandle, limit: int | None = None) -> int:
        """Take in what the worker recorded since the last read (at most `limit` records; the rest waits
        for the next pass); LedgerRejected if any of it is not what a conforming worker writes (then none
        of it is taken)."""
        ledger = worker.ledger
        if ledger is None:
            return 0
        batch = ledger.read_batch(limit)
        records = batch.records
        kind = records["kind"]
        answered = records[kind == ANSWERED]
        groups = _groups(answered)
        # One by one: a chain's STAGE records pair with the answer they precede (which may come in the
        # next pass), cache outcomes are checked each, the access log samples answers; and a pass of many
        # (client, code) groups with few records each costs less this way.
        if self.logging_access() or worker.stage_records or (kind == STAGE).any() or records["cache"].any() or (len(answered) >= MIN_RECORDS_PER_GROUP and len(np.unique(groups)) * MIN_RECORDS_PER_GROUP > len(answered)):
            for entry in batch.entries():
                self._apply(worker, entry)
        elif len(records):
            self._apply_batch(worker, batch, kind, answered, groups)
        return len(records)

    def _apply_batch(self, worker: WorkerHandle, batch: RecordBatch, kind: np.ndarray, answered: np.ndarray, groups: np.ndarray) -> None:
        """What `_apply` does record by record, for a plain model's records taken together: a pass at
        tens of thousands of requests a second finds hundreds, and this supervisor shares the cores with
        the workers. Every check comes first (nothing of a pass is booked if one record is refused), and
        the books come out as record by record (tests/test_direct_books.py)."""
        records, clients = batch.records, batch.clients
        model = worker.model
        runs = records["run_size"][kind == RUN]
        if len(runs):
            batching = model.config.batching
            if batching is None or runs.min() < 1 or runs.max() > batching.max_batch_size:
                raise LedgerRejected(f"a run of {int(runs.max() if batching else runs[0])} for a model batching at most {batching.max_batch_size if batching else 1}")
        pending = worker.direct_pending
        opens = (kind == ADMITTED) | (kind == ANSWERED)
        # Clients come into the books in the order their records name them, as record by record (the
        # table is bounded: which keys get a row of their own must not depend on the path).
        named = records[(kind == ANSWERED) | (kind == REFUSED)]["slot"]
        first = np.unique(named, return_index=True)[1]
        for slot in named[np.sort(first)].tolist():
            self.accountant.client_usage(clients[slot])
        # Requests open and closed in record order (a serial may come back after it was answered).
        times = records["timing"][opens]
        for is_admitted, serial, slot, size, deadline_us, sent_us in zip(*(column.tolist() for column in (kind[opens] == ADMITTED, records["serial"][opens], records["slot"][opens], records["bytes_in"][opens], times[:, 0], times[:, 1]))):
            if is_admitted:
                _keep_open(pending, serial, _opened(clients[slot], size, deadline_us, sent_us))
            else:
                pending.pop(serial, None)
        if len(answered):
            self._account(worker, answered, groups, clients)
        if len(runs):
            for size, count in zip(*(column.tolist() for column in np.unique(runs, return_counts=True))):
                model.batch_sizes[size] = model.batch_sizes.get(size, 0) + count
        rest = (kind == REFUSED) | (kind == COUNTED)
        if rest.any():
            for entry in batch.entries(rest):
                self._apply(worker, entry)

    def _account(self, worker: WorkerHandle, answered: np.ndarray, groups: np.ndarray, clients: dict[int, str]) -> None:
        """ANSWERED records into the books, a (client, code) group at a time; the CPU sums in record order
        (a float sum depends on its order)."""
        model = worker.model
        accountant = self.accountant
        order = np.argsort(groups, kind="stable")
        keys, starts = np.unique(groups[order], return_index=True)
        for group, members in zip(keys.tolist(), np.split(answered[order], starts[1:])):
            slot, code_index = divmod(group, len(CODES))
            code = None if code_index == 0 else CODES[code_index]
            accountant.count_operation("infer", code, len(members))
            if code == LEASE_EXPIRED:  # sent back to be sent again: not a request of its own (ledger.LEASE_EXPIRED)
                accountant.count_resent(model.name, model.version, clients[slot], len(members))
                continue
            stages = {key: members["timing"][:, i] for i, key in enumerate(TIMING_KEYS) if key != "cpu_us"}
            accountant.record_many(model.name, model.version, clients[slot], code, stages, int(members["bytes_in"].sum()), int(members["bytes_out"].sum()))
            if code is None:
                model.consecutive_crashes = 0  # (not respawn_crashes: a ledger is its worker's word)
        cpu = answered["timing"][:, TIMING_KEYS.index("cpu_us")]
        accountant.add_cpu(model.name, model.version, [clients[slot] for slot in answered["slot"].tolist()], np.nan_to_num(cpu, nan=0.0).tolist())
        worker.tasks_served += len(answered)

    def read_all(self, workers: list[WorkerHandle], reject: Callable[[WorkerHandle, str], None], limit: int | None = None) -> None:
        found = 0
        behind = False
        for worker in workers:
            if worker.retired and worker.ledger is None:
                continue
            try:
                taken = self.read(worker, limit)
            except LedgerRejected as exc:
                worker.ledger = None
                reject(worker, f"ledger: {exc}")
                continue
            found += taken
            behind = behind or taken == limit
        self.active = found > 0
        self.behind = behind

    def _apply(self, worker: WorkerHandle, entry: Entry) -> None:
        model = worker.model
        accountant = self.accountant
        kind = entry.kind
        if kind == ANSWERED:
            stages, worker.stage_records = worker.stage_records, []
            if stages:  # a chain's: they count once they fit the answer they came before
                # Each member's time within the request's: members may run at the same time (a drive step's threads).
                if entry.code is not None or max(compute for _, _, compute in stages) > entry.timing.get("compute_us", 0.0) + 1.0:
                    raise LedgerRejected("stages that do not fit the request they came with (a failure, or more time in one of its models than it computed)")
                for member, runs, compute in stages:
                    model.count_stage(member, runs, compute)
            worker.direct_pending.pop(entry.serial, None)
            if entry.cache:
                if model.config.cache is None:
                    raise LedgerRejected("a cache outcome for a model without [cache]")
                model.count_cache(entry.cache == CACHE_HIT)
            accountant.count_operation("infer", entry.code)
            if entry.code == LEASE_EXPIRED:
                accountant.count_resent(model.name, model.version, entry.client, 1)
            else:
                accountant.record(model.name, model.version, entry.client, entry.code, entry.timing, entry.bytes_in, entry.bytes_out)
            worker.tasks_served += 1
            if entry.code is None:
                model.consecutive_crashes = 0  # (not respawn_crashes: a ledger is its worker's word)
            self.log_access(worker, entry)
        elif kind == ADMITTED:
            _keep_open(worker.direct_pending, entry.serial, _opened(entry.client, entry.bytes_in, entry.timing[ADMITTED_DEADLINE_US], entry.timing[ADMITTED_SENT_US]))
        elif kind == REFUSED:
            # An infer refused for want of a valid lease never reached the model: a refusal by access, booked
            # under `rejected` as the front door books one (attacker round 79: a uid with no grant on a model
            # sent it unleased infers by the thousand, each booked as that model's failed request).
            infer = entry.op == "infer" and entry.code != "PERMISSION_DENIED"
            if entry.code == LEASE_EXPIRED and not infer:
                raise LedgerRejected(f"a lease expiry booked for `{entry.op}` (only an infer is sent again)")
            if entry.code == LEASE_EXPIRED:
                accountant.count_resent(model.name if infer else None, model.version if infer else None, entry.client, 1)
            else:
                accountant.record(model.name if infer else None, model.version if infer else None, entry.client, entry.code, entry.timing)
            accountant.count_operation(entry.op, entry.code)
        elif kind == COUNTED:
            accountant.count_operation(entry.op, None)
        elif kind == RUN:
            batching = model.config.batching
            if batching is None or not 1 <= entry.run_size <= batching.max_batch_size:
                raise LedgerRejected(f"a run of {entry.run_size} for a model batching at most {batching.max_batch_size if batching else 1}")
            model.batch_sizes[entry.run_size] = model.batch_sizes.get(entry.run_size, 0) + 1
        elif kind == STAGE:
            chain = model.config.chain
            if chain is None or entry.run_size >= len(chain.models) or entry.bytes_in > MAX_MODEL_CALLS or "compute_us" not in entry.timing:
                raise LedgerRejected(f"a stage ({entry.run_size}, {entry.bytes_in} runs) for a model that is {'no chain' if chain is None else 'a chain of ' + str(len(chain.models))}")
            member = chain.models[entry.run_size]
            if any(seen == member for seen, _, _ in worker.stage_records):
                raise LedgerRejected(f"a stage for {member!r} twice before one answer")
            worker.stage_records.append((member, entry.bytes_in, entry.timing["compute_us"]))

    def lost(self, worker: WorkerHandle) -> int:
        """The worker is gone: its last records first, then each request it admitted and never answered
        counts as failed, with the code its client library answers it with (client/core.py link_lost):
        DEADLINE_EXCEEDED once its deadline, or max_compute_ms from when it was sent, has passed, else
        WORKER_CRASHED. Returns how many."""
        try:
            self.read(worker)
        except LedgerRejected:
            pass  # it was being retired anyway; what it admitted is still lost
        worker.ledger = None
        model = worker.model
        now = time.monotonic_ns()
        max_compute_ns = model.config.max_compute_ms * 1_000_000
        for client, bytes_in, deadline_ns, sent_ns in worker.direct_pending.values():
            code = "DEADLINE_EXCEEDED" if now >= deadline_ns or now >= sent_ns + max_compute_ns else "WORKER_CRASHED"
            self.accountant.record(model.name, model.version, client, code, {}, bytes_in, 0)
            self.accountant.count_operation("infer", code)
        lost = len(worker.direct_pending)
        worker.direct_pending.clear()
        return lost
