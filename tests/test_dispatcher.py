"""The dispatcher's rules, on a real ZeroMQ ROUTER/DEALER pair standing in for the worker channel (no
daemon: the cases need the loop busy past a deadline or a worker mid-batch, which a live daemon cannot be
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

import msgpack
import pytest
import zmq

from daemon_harness import wait_for
from openinfer.client.errors import OpenInferError
from openinfer.daemon.client_limits import ClientLimiter, ClientPolicy
from openinfer.daemon.dispatch import UNTIMED_MAX, UNTIMED_MAX_AGE_NS, Dispatcher
from openinfer.daemon.modelconfig import BatchingConfig, ModelConfig
from openinfer.daemon.models import ServedModel
from openinfer.daemon.settings import Settings
from openinfer.daemon.tasks import Task
from openinfer.daemon.timers import TimerHeap
from openinfer.daemon.validation import check_infer
from openinfer.daemon.workers import WorkerHandle, WorkerState

pytestmark = pytest.mark.unit

SPEC = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}


@pytest.fixture()
def channel() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:  # type: ignore[type-arg]
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://workers")
    worker = context.socket(zmq.DEALER)
    worker.setsockopt(zmq.IDENTITY, b"w1")
    worker.connect("inproc://workers")
    yield router, worker
    router.close(linger=0)
    worker.close(linger=0)
    context.term()


class Setup:
    def __init__(self, router: zmq.Socket, max_batch_size: int = 8, batching: bool = True) -> None:  # type: ignore[type-arg]
        self.failed: list[tuple[Task, OpenInferError]] = []
        self.timers = TimerHeap()
        self.limiter = ClientLimiter(ClientPolicy())
        self.dispatcher = Dispatcher(Settings(), router, self.timers, self.limiter, lambda task, exc: self._fail(task, exc), lambda worker: None)
        config = ModelConfig(batching=BatchingConfig(max_batch_size=max_batch_size, max_queue_delay_us=500_000) if batching else None)
        self.model = ServedModel("m", 1, Path("/nonexistent"), config, 1, 1)
        self.model.set_metadata([SPEC], [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}])
        assert self.model.batchable is batching
        self.worker = WorkerHandle(1, b"w1", self.model, None, state=WorkerState.READY)  # type: ignore[arg-type]
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
        task = Task(self.next_id, self.next_id, [b"client"], b"client", "c", self.model, b"", [b"\0" * 16], nbytes, now, now, now + timeout_ns, 0, signature)
        self.limiter.admit("c", None, now)
        self.dispatcher.admit(task, header)
        return task

    def flush_to_worker(self) -> None:
        """The batch delay is up and the worker is free: what the batch timer does."""
        self.model.idle.append(self.worker)
        self.model.batch_deadline_ns = 1
        self.dispatcher.maybe_flush(self.model)


def sent_plan(worker: zmq.Socket) -> dict[str, Any] | None:  # type: ignore[type-arg]
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


def test_a_batch_whose_send_fails_stays_with_its_worker_to_be_answered_when_it_is_replaced(channel: Any) -> None:
    router, _ = channel
    setup = Setup(router)
    setup.worker.identity = b"gone"  # killed, not reaped yet: ROUTER_MANDATORY refuses the send
    tasks = [setup.admit(10 * 10**9) for _ in range(2)]
    setup.flush_to_worker()  # no exception: the caller may still owe replies (results.py)
    # What the pool's exit handling requeues (requeue_unstarted) or answers: nothing is lost or queued twice.
    assert list(setup.worker.inflight) == tasks and all(task.worker is setup.worker for task in tasks)
    assert not setup.model.queue and setup.dispatcher.queued_bytes == 0 and not setup.dispatcher.queued_by_request


def test_a_task_sent_to_a_worker_already_gone_goes_back_to_the_front_of_its_queue(channel: Any) -> None:
    """A worker SIGKILLed between its last result and its reaping: the next task for it never reached
    it. It must not raise (admit would answer INTERNAL; on_result, which dispatches before replying,
    would lose the finished task's reply), nor wait with the dead worker to fail WORKER_CRASHED."""
    router, _ = channel
    setup = Setup(router, batching=False)
    waiting = setup.admit(10 * 10**9)  # the worker is not idle yet: this one queues
    setup.worker.identity = b"gone"
    setup.dispatcher.next_for(setup.worker)
    assert not setup.worker.inflight and waiting.worker is None and not waiting.done
    assert list(setup.model.queue) == [waiting] and setup.dispatcher.queued_for(waiting.route_id, waiting.request_id) is waiting
    assert setup.dispatcher.queued_bytes == waiting.nbytes and setup.failed == []
    setup.model.idle.append(setup.worker)
    arriving = setup.admit(10 * 10**9)  # admitted straight to the idle (dead) worker
    assert list(setup.model.queue) == [arriving, waiting] and not setup.worker.inflight


def run_one_batch(setup: Setup, worker: zmq.Socket, size: int) -> list[Task]:  # type: ignore[type-arg]
    tasks = [setup.admit(10 * 10**9) for _ in range(size)]
    setup.flush_to_worker()
    assert sent_plan(worker) is not None
    return tasks


def test_a_full_batch_queues_behind_the_short_batch_a_busy_worker_runs(channel: Any) -> None:
    router, worker = channel
    setup = Setup(router, max_batch_size=4)
    running = run_one_batch(setup, worker, 2)
    deadline_ns = setup.worker.deadline_ns
    setup.model.batch_compute_ewma_us = 50.0  # short batches: a round trip through the loop costs more
    behind = [setup.admit(10 * 10**9) for _ in range(4)]  # the fourth fills a batch: no idle worker
    plan = sent_plan(worker)
    assert plan is not None and plan["tasks"] == [task.task_id for task in behind]
    assert list(setup.worker.inflight) == running + behind
    assert setup.worker.deadline_ns == deadline_ns  # still the running batch's; on_batch moves it on
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
