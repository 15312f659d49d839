"""Runs past a deadline that their worker did not stop (PROTOCOL.md 10.1): the supervisor's side.

A worker stops a run at its deadline itself. A run it cannot stop (a kernel that never checks the stop
flag, a step's own loop) has its overdue tasks answered here, half a second later, and goes on; only the
operator's bound, max_compute_ms, gets the worker killed. The supervisor's housekeeping decides which
applies (supervisor._expire_running); this module carries it out."""
from __future__ import annotations

import logging
import time

from openinfer.wire.errors import DeadlineExceeded

from openinfer.daemon.direct.endpoints import OVERDUE_GRACE_NS
from openinfer.daemon.frontdoor.replies import ReplySender
from openinfer.daemon.scheduling.dispatch import Dispatcher
from openinfer.daemon.workerpool.pool import WorkerPool
from openinfer.daemon.workerpool.workers import WorkerHandle

log = logging.getLogger("openinfer.supervisor")


class OverdueRuns:
    def __init__(self, dispatcher: Dispatcher, replies: ReplySender, pool: WorkerPool) -> None:
        self.dispatcher = dispatcher
        self.replies = replies
        self.pool = pool

    def answer(self, worker: WorkerHandle, now: int) -> None:
        """Answer every task the worker holds that is half a second past its deadline, and let its run go
        on. A single task that runs keeps its client's in-flight slot until the run ends (else short
        timeouts would let a client keep more workers busy than its max_in_flight). A batch member's slot
        is freed: the run is shared, and its length may be another client's doing. A task that waits
        behind the run - pipelined, or sent while the worker ran a direct request the supervisor cannot
        see - never starts (the worker skips a task whose deadline has passed: channel_tasks.stopped_run),
        so its slot is free at once too."""
        inflight = worker.inflight
        page = worker.page
        running = [] if page is not None and page.read()[1] else inflight.running_unit()  # a direct run holds it
        cutoff = now - OVERDUE_GRACE_NS
        max_compute_ms = worker.model.config.max_compute_ms
        unstoppable = False
        for task in list(inflight):
            if task.done or task.deadline_ns > cutoff:
                continue
            waited_ms = (now - task.dispatched_ns) / 1e6
            if task in running:
                unstoppable = True
                self.replies.fail(task, DeadlineExceeded(f"still running after {waited_ms:.0f} ms, past its deadline, in a run its worker cannot stop; the run goes on (its worker is killed only past max_compute_ms = {max_compute_ms})"), keep_slot=not task.batched)
            else:
                self.replies.fail(task, DeadlineExceeded(f"its deadline passed after {waited_ms:.0f} ms in a worker, waiting behind a run that has not ended; it never started"))
        if unstoppable and not inflight.stalled:
            log.warning("a run could not be stopped at its deadline; the tasks past theirs were answered and the run goes on", extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model.key, "max_compute_ms": max_compute_ms})
        inflight.stall()

    @staticmethod
    def limit_ns(worker: WorkerHandle) -> int:
        """When the running unit passes max_compute_ms: counted from when it was sent, or from when the
        direct run it waited behind ended (PROTOCOL.md 17.4: the supervisor does not see those runs; the
        worker's deadline page does) - a unit still waiting is not running (round 16: a front-door task
        sent while a 1.5 s direct run went on was killed, with its worker, at 2 s of max_compute_ms it had
        not used). At most a max_compute_ms and its grace later - the longest a direct run lasts before
        the worker is killed for it - so a page that lies delays this by no more."""
        inflight = worker.inflight
        page = worker.page
        if page is None:
            return inflight.limit_ns
        max_compute_ns = worker.model.config.max_compute_ms * 1_000_000
        sent_ns = inflight.limit_ns - max_compute_ns
        since_ns, direct_deadline_ns = page.read()
        started_ns = time.monotonic_ns() if direct_deadline_ns else since_ns  # a direct run now: not started yet
        return min(max(started_ns, sent_ns), sent_ns + max_compute_ns + OVERDUE_GRACE_NS) + max_compute_ns

    def kill(self, worker: WorkerHandle, now: int) -> None:
        """The run passed its model's max_compute_ms and did not stop: the worker is killed."""
        running = worker.inflight.take_running()  # a single task, or the whole batch
        late = [t for t in running if t.deadline_ns <= now] if len(running) > 1 else running
        worker.inflight.put_back([t for t in running if t not in late])  # ran too long together with others: retried alone
        self.dispatcher.requeue_unstarted(worker)
        for task in late:
            if task.done:
                self.dispatcher.settle(task)
                continue
            ran_ms = (now - task.dispatched_ns) / 1e6
            self.replies.fail(task, DeadlineExceeded(f"task still running after {ran_ms:.0f} ms, past its model's max_compute_ms = {worker.model.config.max_compute_ms}; its worker was killed and is being replaced"))
        log.error("a run went past max_compute_ms and could not be stopped; killing the worker", extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model.key})
        worker.exit_reason = "killed: a run exceeded max_compute_ms"
        worker.expected_exit = worker.overran = True
        worker.retired = True  # a result it sends before it dies no longer counts
        if worker in worker.model.idle:
            worker.model.idle.remove(worker)
        self.pool.kill(worker)
