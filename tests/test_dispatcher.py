"""The dispatcher's rules, on a real socketpair standing in for a worker's channel (no daemon: the cases need the loop busy past a deadline or a worker mid-batch, which a live daemon cannot be
made to be on cue).

- A queued task's deadline timer is set at the loop's next idle moment (`arm_deadlines`), once
  UNTIMED_MAX tasks wait for one, or once the oldest has waited UNTIMED_MAX_AGE_NS; tasks that left the
  queue before then never get one.
- A task whose deadline passed before its timer was set is answered DEADLINE_EXCEEDED when it is taken
  from the queue and is never sent to a worker; the rest of its batch still runs.
- A full batch with no idle worker queues behind a worker's single running batch when the model's
  batches are short (pipelining), never behind two, never for long or not yet measured batches.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import select
import socket

import msgpack
import pytest

from daemon_harness import wait_for
from openinfer.wire.errors import OpenInferError
from openinfer.daemon.frontdoor.client_limits import ClientLimiter, ClientPolicy
from openinfer.daemon.frontdoor.access import Peer
from openinfer.daemon.scheduling.dispatch import UNTIMED_MAX, UNTIMED_MAX_AGE_NS, Dispatcher
from openinfer.daemon.frontdoor.connections import Connection, Route
from openinfer.daemon.modelstore.modelconfig import BatchingConfig, ModelConfig
from openinfer.daemon.modelstore.models import ServedModel
from openinfer.daemon.config.settings import Settings
from openinfer.daemon.scheduling.tasks import Task
from openinfer.daemon.loop.timers import TimerHeap
from openinfer.daemon.frontdoor.validation import check_infer
from openinfer.daemon.workerpool.workers import WorkerHandle, WorkerState
from openinfer.wire.zmtp import FrameStream, Limits

pytestmark = pytest.mark.unit

SPEC = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
CONNECTION = Connection(1, None, Peer(uid=0), "uid=0", 0)  # type: ignore[arg-type]  # replies are not sent here


class End:
    """One end of the channel: the supervisor's send, or the worker's poll/receive."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.stream = FrameStream(sock, Limits(frames=1 << 16, first_frame=1 << 30, message_bytes=1 << 40))
        self.pending: list[list[bytes]] = []
        self.open = True

    def send(self, worker: WorkerHandle, frames: list[Any]) -> bool:
        if not self.open:
            return False  # the worker's channel is gone (it exited)
        self.stream.send(frames)
        while self.stream.out_bytes:
            select.select([], [self.stream.sock], [])
            self.stream.flush()
        return True

    def poll(self, timeout_ms: int) -> bool:
        if not self.pending and select.select([self.stream.sock], [], [], timeout_ms / 1000)[0]:
            self.pending.extend([bytes(f) for f in event] for event in self.stream.read() if isinstance(event, list))
        return bool(self.pending)

    def recv_multipart(self) -> list[bytes]:
        assert self.poll(2000)
        return self.pending.pop(0)


@pytest.fixture()
def channel() -> Iterator[tuple[End, End]]:
    ours, theirs = socket.socketpair()
    supervisor, worker = End(ours), End(theirs)
    yield supervisor, worker
    supervisor.stream.close()
    worker.stream.close()


class Setup:
    def __init__(self, router: End, max_batch_size: int = 8, batching: bool = True) -> None:
        self.failed: list[tuple[Task, OpenInferError]] = []
        self.timers = TimerHeap()
        self.limiter = ClientLimiter(ClientPolicy())
        self.dispatcher = Dispatcher(Settings(), router.send, self.timers, self.limiter, lambda task, exc: self._fail(task, exc), lambda worker: None)
        config = ModelConfig(batching=BatchingConfig(max_batch_size=max_batch_size, max_queue_delay_us=500_000) if batching else None)
        self.model = ServedModel("m", 1, Path("/nonexistent"), config, 1, 1)
        self.model.set_metadata([SPEC], [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}])
        assert self.model.batchable is batching
        self.worker = WorkerHandle(1, self.model, None, None, state=WorkerState.READY)  # type: ignore[arg-type]
        self.model.workers.append(self.worker)
        self.next_id = 0

    def _fail(self, task: Task, exc: OpenInferError) -> None:
        task.done = True
        self.failed.append((task, exc))

    def admit(self, timeout_ns: int) -> Task:
        """A one-row request received now, due `timeout_ns` from now (negative: already past)."""
        self.next_id += 1
        now = time.monotonic_ns()
        header: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}
        nbytes, signature = check_infer(header, [b"\0" * 16], self.model, 1 << 20)
        task = Task(self.next_id, self.next_id, Route(CONNECTION, False), "uid=0", "c", self.model, b"", [b"\0" * 16], nbytes, now, now, now + timeout_ns, 0, signature)
        self.limiter.admit("uid=0", now, 0)
        self.dispatcher.admit(task, header)
        return task

    def flush_to_worker(self) -> None:
        """The batch delay is up and the worker is free: what the batch timer does."""
        self.model.idle.append(self.worker)
        self.model.batch_deadline_ns = 1
        self.dispatcher.maybe_flush(self.model)


def sent_plan(worker: End) -> dict[str, Any] | None:
    if not worker.poll(2000):
        return None
    frames = worker.recv_multipart()
    return msgpack.unpackb(frames[1])


def test_an_expired_member_is_answered_and_never_sent_while_the_rest_of_its_batch_runs(channel: Any) -> None:
    router, worker = channel
    setup = Setup(router)
    live = [setup.admit(10 * 10**9), setup.admit(10 * 10**9)]
    expired = setup.admit(-1)  # the loop was busy past its deadline: no timer was ever set for it
    setup.flush_to_worker()
    assert [(task.task_id, exc.code) for task, exc in setup.failed] == [(expired.task_id, "DEADLINE_EXCEEDED")]
    assert "never ran" in setup.failed[0][1].message
    plan = sent_plan(worker)
    assert plan is not None and plan["tasks"] == [task.task_id for task in live]
    assert expired.worker is None and setup.dispatcher.queued_bytes == 0


def test_a_member_that_cannot_last_the_batchs_usual_run_goes_back_to_run_alone(channel: Any) -> None:
    """Round 27's attacker: valid requests with a timeout shorter than a batch's run, in batch after batch
    (another uid's): the worker stopped each batch at the short deadline and every other member ran again.
    With the model's batches known to take 50 ms, a member due in 20 ms is left out: the batch runs
    without it, and it goes back to the front of the queue to run alone."""
    router, worker = channel
    setup = Setup(router)
    setup.model.batch_compute_ewma_us, setup.model.batch_ended_ns = 50_000.0, time.monotonic_ns()  # (a batch just ended: not forgotten)
    first = setup.admit(10 * 10**9)
    short = setup.admit(20 * 10**6)
    last = setup.admit(10 * 10**9)
    setup.flush_to_worker()
    plan = sent_plan(worker)
    assert plan is not None and plan["tasks"] == [first.task_id, last.task_id]
    assert list(setup.model.queue) == [short] and short.batch_key is None and not setup.failed


def test_a_task_that_only_runs_alone_leaves_no_batch_due_at_once_behind_it(channel: Any) -> None:
    """Round 28's residual of round 27: a task that cannot last a batch, left in the queue when a batch
    left, kept the model's batch due at once; another client's short timeouts, sent all the time, kept
    every batch after leaving with whoever had come (the victim's replies: {1: 284, 3: 285, 4: 8}). The
    task runs alone in its turn; the next request that can wait is held for company as usual."""
    router, worker = channel
    setup = Setup(router)
    setup.model.batch_compute_ewma_us, setup.model.batch_ended_ns = 50_000.0, time.monotonic_ns()  # (a batch just ended: not forgotten)
    first = setup.admit(10 * 10**9)
    short = setup.admit(20 * 10**6)  # no worker free when it came: it waits for its turn, alone
    assert short.batch_key is None and first.batch_key is not None
    setup.flush_to_worker()
    assert worker.poll(2000) and first.worker is setup.worker and short.worker is None  # first went alone
    assert list(setup.model.queue) == [short] and setup.model.batch_deadline_ns == 0
    later = setup.admit(10 * 10**9)
    assert setup.model.batch_deadline_ns > later.enqueued_ns + 100 * 10**6  # held for company (500 ms)


def test_a_task_that_runs_alone_leaves_every_list_as_it_leaves_the_queue(channel: Any) -> None:
    """Round 30's attacker: tasks queued to run alone (no worker free) that then expired stayed in the
    model's list of them, with their tensors - 16 MiB each, outside max_queued_bytes: 60 of them took the
    supervisor from 52 to 725 MiB, over its memory limit, and the guard cut an honest client's
    connection. Expired, cancelled or sent in a batch's turn, a task leaves that list with the queue."""
    router, worker = channel
    setup = Setup(router)
    setup.model.batch_compute_ewma_us, setup.model.batch_ended_ns = 50_000.0, time.monotonic_ns()  # (a batch just ended: not forgotten)
    expired, cancelled, taken = (setup.admit(20 * 10**6) for _ in range(3))
    assert len(setup.model.alone) == 3
    setup.dispatcher.expire_queued(expired)
    setup.dispatcher.remove_queued(cancelled)
    setup.flush_to_worker()  # due: the batch loop takes the last in its turn
    assert worker.poll(2000) and taken.worker is setup.worker
    assert not setup.model.alone and setup.dispatcher.queued_bytes == 0


def test_a_batch_of_expired_tasks_sends_nothing_and_leaves_the_worker_free(channel: Any) -> None:
    router, worker = channel
    setup = Setup(router)
    tasks = [setup.admit(-1) for _ in range(3)]
    setup.flush_to_worker()
    assert sorted(task.task_id for task, _ in setup.failed) == [task.task_id for task in tasks]
    assert not worker.poll(200)  # no batch message at all
    assert setup.model.idle == [setup.worker] and not setup.model.queue


def test_deadline_timers_are_set_when_idle_only_for_tasks_still_queued(channel: Any) -> None:
    router, _ = channel
    setup = Setup(router)
    queued = [setup.admit(10 * 10**9) for _ in range(3)]
    assert all(task.deadline_timer is None for task in queued)  # nothing set while busy
    setup.dispatcher.remove_queued(queued[0])  # e.g. cancelled by its client
    setup.dispatcher.arm_deadlines()  # the loop is about to sleep
    assert queued[0].deadline_timer is None
    assert all(task.deadline_timer is not None for task in queued[1:])
    assert len(setup.timers) >= 2


def test_timers_are_set_without_an_idle_moment_once_enough_tasks_wait(channel: Any) -> None:
    router, _ = channel
    setup = Setup(router, max_batch_size=UNTIMED_MAX * 4)
    tasks = [setup.admit(10 * 10**9) for _ in range(UNTIMED_MAX)]
    assert all(task.deadline_timer is not None for task in tasks)


def test_timers_are_set_in_a_loop_that_is_never_idle_once_the_oldest_task_waited_long_enough(channel: Any) -> None:
    router, _ = channel
    setup = Setup(router)
    tasks = [setup.admit(10 * 10**9) for _ in range(2)]
    enqueued = tasks[0].enqueued_ns
    setup.dispatcher.arm_overdue_deadlines(enqueued + UNTIMED_MAX_AGE_NS - 1)
    assert all(task.deadline_timer is None for task in tasks)
    setup.dispatcher.arm_overdue_deadlines(enqueued + UNTIMED_MAX_AGE_NS)
    assert all(task.deadline_timer is not None for task in tasks)


def test_an_armed_deadline_answers_the_queued_task_from_its_timer(channel: Any) -> None:
    router, worker = channel
    setup = Setup(router)
    task = setup.admit(1_000_000)  # 1 ms
    setup.dispatcher.arm_deadlines()
    def timer_answered() -> bool:
        setup.timers.run_due()  # what the loop does after every pass
        return bool(setup.failed)

    wait_for(timer_answered, 5, "the deadline timer to fire")
    assert [(t.task_id, exc.code) for t, exc in setup.failed] == [(task.task_id, "DEADLINE_EXCEEDED")]
    assert not setup.model.queue and setup.dispatcher.queued_bytes == 0
    assert not worker.poll(100)  # it never reached the worker


def test_an_unbatched_task_that_expired_in_the_queue_is_not_given_to_the_freed_worker(channel: Any) -> None:
    router, worker = channel
    setup = Setup(router)
    setup.model.batchable = False  # one task per dispatch
    setup.worker.state = WorkerState.BUSY  # busy: admit queues
    expired, live = setup.admit(-1), setup.admit(10 * 10**9)
    setup.dispatcher.next_for(setup.worker)  # the worker finished its task
    assert [(task.task_id, exc.code) for task, exc in setup.failed] == [(expired.task_id, "DEADLINE_EXCEEDED")]
    assert live.worker is setup.worker and list(setup.worker.inflight) == [live]
    frames = worker.recv_multipart() if worker.poll(2000) else []
    assert len(frames) == 3 and frames[1] == b"" and frames[2] == b"\0" * 16  # the live task's header and data


def test_a_batch_is_held_by_its_worker_and_out_of_the_queue_once_sent(channel: Any) -> None:
    router, worker = channel
    setup = Setup(router)
    tasks = [setup.admit(10 * 10**9) for _ in range(3)]
    setup.flush_to_worker()
    plan = sent_plan(worker)
    assert plan is not None and plan["tasks"] == [task.task_id for task in tasks]
    assert list(setup.worker.inflight) == tasks and setup.worker.state is WorkerState.BUSY
    assert all(task.worker is setup.worker and task.batched and task.dispatched_ns for task in tasks)
    assert setup.dispatcher.queued_bytes == 0 and not setup.dispatcher.queued_by_request


def test_a_batch_whose_send_fails_goes_back_to_the_queue_and_its_worker_gets_nothing_more(channel: Any) -> None:
    router, _ = channel
    setup = Setup(router)
    router.open = False  # the worker exited: its channel is closed (its exit is reaped later)
    tasks = [setup.admit(10 * 10**9) for _ in range(2)]
    setup.flush_to_worker()
    # The tasks never reached it: each waits in the queue to run alone elsewhere; nothing is lost or doubled.
    assert not setup.worker.inflight and setup.worker.retired and all(task.worker is None for task in tasks)
    assert sorted(t.task_id for t in setup.model.queue) == sorted(t.task_id for t in tasks)
    assert setup.dispatcher.queued_bytes == sum(t.nbytes for t in tasks) and len(setup.dispatcher.queued_by_request) == 2


def test_a_task_sent_to_a_worker_already_gone_goes_back_to_the_front_of_its_queue(channel: Any) -> None:
    """A worker that died between its last result and its reaping: the next task for it never reached
    it. It must not raise (admit would answer INTERNAL; on_result, which dispatches before replying,
    would lose the finished task's reply), nor wait with the dead worker to fail WORKER_CRASHED."""
    router, _ = channel
    setup = Setup(router, batching=False)
    waiting = setup.admit(10 * 10**9)  # the worker is not idle yet: this one queues
    router.open = False
    setup.dispatcher.next_for(setup.worker)
    assert not setup.worker.inflight and waiting.worker is None and not waiting.done
    assert list(setup.model.queue) == [waiting] and setup.dispatcher.queued_for(waiting.route.conn.conn_id, waiting.request_id) is waiting
    assert setup.dispatcher.queued_bytes == waiting.nbytes and setup.failed == []
    assert setup.worker.retired and setup.worker not in setup.model.idle  # it is handed nothing more


def run_one_batch(setup: Setup, worker: End, size: int) -> list[Task]:
    tasks = [setup.admit(10 * 10**9) for _ in range(size)]
    setup.flush_to_worker()
    assert sent_plan(worker) is not None
    return tasks


def test_a_full_batch_queues_behind_the_short_batch_a_busy_worker_runs(channel: Any) -> None:
    router, worker = channel
    setup = Setup(router, max_batch_size=4)
    running = run_one_batch(setup, worker, 2)
    deadline_ns = setup.worker.inflight.deadline_ns
    setup.model.batch_compute_ewma_us = 50.0  # short batches: a round trip through the loop costs more
    behind = [setup.admit(10 * 10**9) for _ in range(4)]  # the fourth fills a batch: no idle worker
    plan = sent_plan(worker)
    assert plan is not None and plan["tasks"] == [task.task_id for task in behind]
    assert list(setup.worker.inflight) == running + behind
    assert setup.worker.inflight.deadline_ns == deadline_ns  # the earliest held: the running batch's (the rest came later)
    assert all(task.batch_wait_ns == 0 for task in behind)  # no worker was free while they waited
    third = [setup.admit(10 * 10**9) for _ in range(4)]
    assert not worker.poll(200)  # two dispatches in a worker at most
    assert len(setup.model.queue) == 4 and all(task.worker is None for task in third)


@pytest.mark.parametrize("ewma_us", [None, 5000.0])
def test_no_batch_queues_behind_a_long_or_unmeasured_one(channel: Any, ewma_us: float | None) -> None:
    router, worker = channel
    setup = Setup(router, max_batch_size=4)
    run_one_batch(setup, worker, 2)
    setup.model.batch_compute_ewma_us = ewma_us
    waiting = [setup.admit(10 * 10**9) for _ in range(4)]
    assert not worker.poll(200)
    assert len(setup.model.queue) == 4 and all(task.worker is None for task in waiting)


def test_a_worker_counts_every_deadline_it_holds_and_a_stalled_one_takes_nothing_more(channel: Any) -> None:
    """Every unanswered task a worker holds is due by its own deadline - a batch pipelined behind the run
    too, which cannot start before the run ends (it is answered then, not when the run ends). A running
    batch that cannot be stopped past a member's deadline: that member was answered (the supervisor's
    _answer_overdue) and the worker stalls: nothing more is pipelined there, and once all are answered
    only max_compute_ms is left."""
    router, worker = channel
    setup = Setup(router, max_batch_size=4)
    first, second = run_one_batch(setup, worker, 2)
    setup.model.batch_compute_ewma_us = 50.0
    behind = [setup.admit(5 * 10**9) for _ in range(4)]  # due before the running batch's second member
    assert sent_plan(worker) is not None and len(setup.worker.inflight) == 6
    inflight = setup.worker.inflight
    assert inflight.deadline_ns == min(task.deadline_ns for task in behind) < first.deadline_ns
    first.done = True  # answered overdue
    inflight.stall()
    assert inflight.stalled and inflight.deadline_ns == min(task.deadline_ns for task in behind) < second.deadline_ns
    assert list(inflight) == [first, second, *behind]  # the worker holds them: they stay in its books
    more = [setup.admit(10 * 10**9) for _ in range(4)]
    assert not worker.poll(200)  # a stalled worker is no pipelining target
    assert len(setup.model.queue) == 4 and all(task.worker is None for task in more)
    for task in [second, *behind]:
        task.done = True
    inflight.stall()
    assert inflight.deadline_ns == inflight.limit_ns  # all answered: only max_compute_ms is left
