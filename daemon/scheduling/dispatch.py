"""Where accepted tasks go: the per-model queues, the dispatch of single tasks and batches to workers,
and putting tasks back when a worker is lost before they ran.

The supervisor owns the sockets' receive side and the replies; this module owns the decisions of which
task runs on which worker and when, and the bookkeeping that must stay exact for that (queued bytes,
the (route, request id) index used by `cancel`, deadline timers of queued tasks).
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

from openinfer.wire.errors import DeadlineExceeded, OpenInferError, ResourceExhausted
from openinfer.wire.protocol import pack
from openinfer.wire.zmtp import Buffer

from openinfer.daemon.frontdoor.client_limits import ClientLimiter
from openinfer.daemon.modelstore.models import ServedModel
from openinfer.daemon.config.settings import Settings
from .batch_rules import batch_size_now, latest_hold_ns, usual_batch
from .tasks import Task
from openinfer.daemon.loop.timers import TimerHeap
from openinfer.daemon.worker import messages
from openinfer.daemon.workerpool.workers import WorkerHandle, WorkerState

# Pipelining: a worker may hold a second task while it computes the first, so it never waits for the two
# ZeroMQ hops between tasks. Only for models whose compute is short: a long task would hold the second
# one (and its deadline) hostage.
PIPELINE_DEPTH = 2
PIPELINE_MAX_COMPUTE_US = 2000.0
# A batch carrying at most this many tensor bytes is sent with its members' rows joined into one frame
# per input: one copy here instead of one in the worker, and far fewer frames. Above it, zero-copy.
JOIN_MAX_BYTES = 256 * 1024
# A queued task's deadline timer is set when the loop is next about to sleep (arm_deadlines), once this
# many tasks wait for one, or once the oldest has waited UNTIMED_MAX_AGE_NS (a loop kept busy by other
# messages): most tasks of a batching model leave the queue before that, and a timer set and cancelled
# per request was ~4 % of the supervisor's work per request at c = 16. A task whose deadline has passed
# is never dispatched either way (_expired_out).
UNTIMED_MAX = 64
UNTIMED_MAX_AGE_NS = 1_000_000

FailTask = Callable[[Task, OpenInferError], None]
SendToWorker = Callable[[WorkerHandle, list[Buffer]], bool]


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        send: SendToWorker,
        timers: TimerHeap,
        limiter: ClientLimiter,
        fail_task: FailTask,
        retire_worker: Callable[[WorkerHandle], None],
    ) -> None:
        self.settings = settings
        self.send = send  # False: the worker's channel is gone (it is exiting)
        self.timers = timers
        self.limiter = limiter
        self.fail_task = fail_task
        self.retire_worker = retire_worker  # an idle worker of a retiring model: quit it
        self.queued_bytes = 0
        self.queued_by_request: dict[tuple[int, int], Task] = {}  # (connection id, request id)
        self.wakeup_lateness_ns = 0  # how late batch timers run their callback, recently (EWMA)
        self._untimed: list[Task] = []  # queued since the last arm_deadlines, no deadline timer yet

    # -- admission ----------------------------------------------------------------------------------
    def admit(self, task: Task, header: dict[str, Any], release_on_error: bool = True) -> None:
        """Run `task` now if a worker can take it, else queue it (RESOURCE_EXHAUSTED when full: its client's
        in-flight slot released, unless `release_on_error` is False - the caller answers it)."""
        model = task.model
        try:
            if model.batchable:
                self._admit_for_batching(task, header)
                return
            if model.idle:
                worker = _take_idle(model)
                if worker is not None:
                    self.dispatch(worker, task)
                    return
            ewma = model.compute_ewma_us
            if ewma is not None and ewma < PIPELINE_MAX_COMPUTE_US and not model.queue and _usual_size(task, model):
                for worker in model.workers:
                    head = worker.inflight.head  # None: killed or retired with nothing left in flight
                    if worker.state is WorkerState.BUSY and not worker.retired and head is not None and len(worker.inflight) < PIPELINE_DEPTH and not worker.inflight.stalled and _usual_size(head, model):
                        self.dispatch(worker, task)
                        return
            self.enqueue(task)
        except OpenInferError:
            if release_on_error:
                self.limiter.release(task.identity)
            raise

    def _admit_for_batching(self, task: Task, header: dict[str, Any]) -> None:
        signature = task.signature
        assert signature is not None  # set by check_infer for every infer task
        rows = signature.rows
        batching = task.model.config.batching
        assert batching is not None
        if rows is not None and rows <= batching.max_batch_size and not task.model.batch_stoppers.alone(task.identity, task.deadline_ns - task.received_ns, task.decoded_ns):
            task.rows = rows
            # Inputs in the request's own order: members of one batch then list their frames alike (a
            # client that reorders them just batches separately).
            task.batch_key = (signature.batch_specs, tuple(header.get("outputs") or ()))
        self.enqueue(task)
        model = task.model
        if _cannot_last_a_batch(task, task.enqueued_ns):
            # It would be left out of any batch (_take_batch): it runs alone, on a worker free now if there
            # is one, else in its turn, and leaves the batch waiting as it is. Cutting that batch's hold
            # for it sent other clients' batches out half empty (round 27's attacker after its fix:
            # 100 req/s for the victim, 141 beside the same load with long timeouts).
            task.batch_key = None
            model.alone[task.task_id] = task
            if model.idle:
                self._send_alone(model)
            return
        self._shorten_hold(task)
        # Most arrivals only join a batch that is already waiting: nothing to decide before its timer
        # (maybe_flush's own test, without the call: this runs for every request).
        deadline = model.batch_deadline_ns
        if deadline and len(model.queue) < batching.max_batch_size and (not model.idle or (task.enqueued_ns < deadline and not batching.preferred_batch_sizes)):
            return
        self.maybe_flush(model)

    def enqueue(self, task: Task) -> None:
        model = task.model
        if len(model.queue) >= model.config.max_queue:
            self.limiter.count_rejection("max_queue")
            raise ResourceExhausted(f"model {model.key} has {len(model.queue)} requests queued (max_queue)")
        if self.queued_bytes + task.nbytes > self.settings.server.max_queued_bytes:
            self.limiter.count_rejection("max_queued_bytes")
            raise ResourceExhausted(f"daemon holds {self.queued_bytes} queued bytes (server.max_queued_bytes)")
        task.enqueued_ns = time.monotonic_ns()
        self._track(task)
        model.queue.append(task)

    def _track(self, task: Task) -> None:
        self.queued_bytes += task.nbytes
        self.queued_by_request[(task.route.conn.conn_id, task.request_id)] = task
        untimed = self._untimed
        untimed.append(task)
        if len(untimed) >= UNTIMED_MAX:
            self.arm_deadlines()

    def arm_overdue_deadlines(self, now_ns: int) -> None:
        """arm_deadlines, if the oldest task without a timer has waited UNTIMED_MAX_AGE_NS (called every
        loop pass: a loop that is never idle still answers a queued deadline within ~1 ms of it)."""
        untimed = self._untimed
        if untimed and now_ns - untimed[0].enqueued_ns >= UNTIMED_MAX_AGE_NS:
            self.arm_deadlines()

    def arm_deadlines(self) -> None:
        """Set the deadline timers of the tasks queued since the last call that are still queued. The
        supervisor calls this before its loop sleeps, so a deadline is never slept through."""
        untimed = self._untimed
        if not untimed:
            return
        self._untimed = []
        call_at = self.timers.call_at
        queued = self.queued_by_request
        for task in untimed:
            if task.deadline_timer is None and queued.get((task.route.conn.conn_id, task.request_id)) is task:
                task.deadline_timer = call_at(task.deadline_ns, partial(self.expire_queued, task))

    def dequeue(self, task: Task) -> None:
        """Forget a task that left its model's queue (the caller removed it from the queue itself)."""
        self.queued_bytes -= task.nbytes
        alone = task.model.alone
        if alone:
            alone.pop(task.task_id, None)
        if task.deadline_timer is not None:  # else the timer would hold the task (and its tensors)
            self.timers.cancel(task.deadline_timer)
            task.deadline_timer = None
        key = (task.route.conn.conn_id, task.request_id)
        if self.queued_by_request.get(key) is task:
            del self.queued_by_request[key]

    def queued_for(self, conn_id: int, request_id: int) -> Task | None:
        return self.queued_by_request.get((conn_id, request_id))

    def remove_queued(self, task: Task) -> None:
        try:
            task.model.queue.remove(task)
        except ValueError:
            pass
        self.dequeue(task)

    # -- single tasks -------------------------------------------------------------------------------
    def dispatch(self, worker: WorkerHandle, task: Task) -> None:
        now = time.monotonic_ns()
        max_compute_ns = task.model.config.max_compute_ms * 1_000_000
        # The message first: a value that does not pack then fails this request alone, before the worker
        # holds a task it will never get (a timeout_ms beyond the clock once did: PROTOCOL.md 8.2, check 34).
        kind = messages.TASK + messages.pack_task_id(task.task_id) + messages.pack_stop(task.deadline_ns, max_compute_ns)
        task.dispatched_ns = now
        task.worker = worker
        worker.inflight.add(task, now, max_compute_ns)
        worker.transition(WorkerState.BUSY)
        cache = task.model.config.cache
        if cache is not None and not cache.shared:  # the worker keeps each identity's answers apart
            kind += task.identity.encode()
        if not self.send(worker, [kind, task.header_frame, *task.data_frames]):
            self._unsent(worker, [task])

    def _unsent(self, worker: WorkerHandle, tasks: list[Task]) -> None:
        """The worker's channel closed under us (it is exiting; its exit is reaped soon): the tasks never
        reached it and go back to the front of the queue; the worker gets nothing more."""
        worker.retired = True
        for task in tasks:
            worker.inflight.withdraw(task)
            self.retry_alone(task)

    def next_for(self, worker: WorkerHandle) -> None:
        """The worker finished a task: give it the next queued one, or park it idle if it holds none."""
        if worker.retired or worker.state is not WorkerState.BUSY and worker.state is not WorkerState.READY:
            return  # draining or being killed: it gets nothing more
        model = worker.model
        if model.batchable:
            if not worker.inflight:
                self._park(worker)
            self.maybe_flush(model)  # also when it runs a pipelined batch: one more may queue behind it
            return
        queue = model.queue
        if worker.inflight:
            if queue and len(worker.inflight) < PIPELINE_DEPTH and not worker.inflight.stalled:
                task = queue.popleft()
                if not _usual_size(task, model):
                    queue.appendleft(task)  # a big one waits for a free worker, cancellable meanwhile
                elif not task.done:
                    self.dequeue(task)
                    if not self._expired_out(task, time.monotonic_ns()):
                        self.dispatch(worker, task)
            return
        while queue:
            task = queue.popleft()
            if task.done:
                continue
            self.dequeue(task)
            if self._expired_out(task, time.monotonic_ns()):
                continue
            self.dispatch(worker, task)
            return
        if model.retiring:
            self.retire_worker(worker)
            return
        self._park(worker)

    @staticmethod
    def _park(worker: WorkerHandle) -> None:
        if worker.retired or worker.state is not WorkerState.BUSY and worker.state is not WorkerState.READY:
            return  # exiting: never handed work again
        worker.transition(WorkerState.READY)
        worker.idle_since_ns = time.monotonic_ns()
        worker.model.idle.append(worker)

    # -- batches ------------------------------------------------------------------------------------
    def maybe_flush(self, model: ServedModel) -> None:
        """Send queued tasks to idle workers as batches: at once when the queue holds a full batch (or a
        preferred size), else when the oldest queued task has waited max_queue_delay_us (a timer fires
        then, to the microsecond). A full or due batch with no idle worker goes to a worker running a
        single batch, when the model's batches are short (_pipeline_target)."""
        batching = model.config.batching
        if not model.queue or batching is None:
            self._clear_batch_deadline(model)
            return
        now = time.monotonic_ns()
        if model.batch_deadline_ns == 0:
            self._set_batch_deadline(model, self._batch_due_ns(model, now) or now)
        due = now >= model.batch_deadline_ns
        if not due and len(model.queue) < batching.max_batch_size and not (model.idle and batching.preferred_batch_sizes):
            if model.alone and model.idle:
                self._send_alone(model)
            return
        while model.idle and model.queue:
            size = batching.max_batch_size if due else batch_size_now(len(model.queue), batching.max_batch_size, batching.preferred_batch_sizes)
            if size == 0:
                break
            place = _idle_place(model)
            if place is None:
                break
            batch = self._take_batch(model, size)
            if batch:  # else every member it took had expired
                self.dispatch_batch(model.idle.pop(place), batch)
        while model.queue and (due or len(model.queue) >= batching.max_batch_size):
            worker = self._pipeline_target(model)
            if worker is None:
                break
            batch = self._take_batch(model, batching.max_batch_size)
            if batch:
                self.dispatch_batch(worker, batch)
        if not model.queue:
            self._clear_batch_deadline(model)
        elif due:
            # Leftovers that waited as long as the batch that just left are due at once; tasks that only
            # run alone hold no deadline: one set for them made every batch after leave at once, for as
            # long as they kept coming (round 27's short timeouts, kept in the queue by an attacker).
            due_ns = self._batch_due_ns(model, now)
            if due_ns > now:
                self._set_batch_deadline(model, due_ns)
            elif due_ns:
                model.batch_deadline_ns = due_ns
            else:
                self._clear_batch_deadline(model)

    def _send_alone(self, model: ServedModel) -> None:
        """Queued tasks that run alone, to the workers free now while the batch waiting is held for company
        (round 29: one queued while every worker was busy waited out another client's hold, a worker
        idle, and expired). When the batch is due they take their turns with the rest (_take_batch)."""
        alone = model.alone
        while alone and model.idle:
            place = _idle_place(model)
            if place is None:
                return
            _, task = alone.popitem(last=False)
            model.queue.remove(task)
            if task.done or task.deadline_ns <= time.monotonic_ns():
                self.dequeue(task)
                if not task.done:
                    self._answer_expired(task)
                continue
            self.dispatch_batch(model.idle.pop(place), [task])

    def _batch_due_ns(self, model: ServedModel, now: int) -> int:
        """When the batch of the queued tasks that wait for company is due: when the oldest has waited
        max_queue_delay_us, or sooner if one could not wait that long and still run before its deadline;
        0 if none waits for company (each queued task runs alone: _cannot_last_a_batch, no batch key).
        The timer goes off early by the usual wake-up lateness (at most a quarter of the delay), so that
        the batch leaves by the deadline rather than a wake-up later: the delay is a bound."""
        batching = model.config.batching
        assert batching is not None
        delay_ns = batching.max_queue_delay_us * 1000
        wait_ns = delay_ns - min(delay_ns // 4, 2 * self.wakeup_lateness_ns)
        due_ns = 0
        for task in model.queue:
            if task.batch_key is None or _cannot_last_a_batch(task, now):
                continue
            at_ns = min(task.enqueued_ns + wait_ns, _latest_hold(task))
            if at_ns <= now:
                return at_ns  # due already: under a backlog the first one looked at usually is
            if due_ns == 0 or at_ns < due_ns:
                due_ns = at_ns
        return due_ns

    @staticmethod
    def _pipeline_target(model: ServedModel) -> WorkerHandle | None:
        """A worker that may take a batch now although busy: one running a single dispatch of a model
        whose batches are short (compute EWMA < PIPELINE_MAX_COMPUTE_US). The batch waits in its inbox
        and starts the moment the running one is sent back, instead of a round trip through this loop
        later (~150-250 us here, several times a short batch's compute)."""
        ewma = model.batch_compute_ewma_us
        if ewma is None or ewma >= PIPELINE_MAX_COMPUTE_US:
            return None
        for worker in model.workers:
            if worker.state is WorkerState.BUSY and not worker.retired and worker.inflight.one_unit() and not worker.inflight.stalled:
                return worker
        return None

    def _set_batch_deadline(self, model: ServedModel, at_ns: int) -> None:
        if model.batch_timer is not None:
            self.timers.cancel(model.batch_timer)
        model.batch_deadline_ns = at_ns
        model.batch_timer = self.timers.call_at(at_ns, lambda: self._batch_timer(model, at_ns))

    def _shorten_hold(self, task: Task) -> None:
        """A task just queued that cannot wait out the delay of the batch waiting: that batch leaves by
        the task's latest hold instead (the first task of a batch sets its deadline in maybe_flush)."""
        model = task.model
        if model.batch_deadline_ns:
            at_ns = _latest_hold(task)
            if at_ns < model.batch_deadline_ns:
                self._set_batch_deadline(model, at_ns)

    def _clear_batch_deadline(self, model: ServedModel) -> None:
        """No batch waiting: its timer goes too (a batch that filled up before its delay must not leave a
        wake-up behind: setting the timerfd costs ~18 us here, one per batch at high load)."""
        model.batch_deadline_ns = 0
        if model.batch_timer is not None:
            self.timers.cancel(model.batch_timer)
            model.batch_timer = None

    def _batch_timer(self, model: ServedModel, armed_ns: int) -> None:
        model.batch_timer = None
        late = time.monotonic_ns() - armed_ns
        self.wakeup_lateness_ns += (late - self.wakeup_lateness_ns) // 8  # EWMA over ~8 wake-ups
        self.maybe_flush(model)

    def _take_batch(self, model: ServedModel, max_rows: int) -> list[Task]:
        """Tasks taken from the queue for one batch, less those whose deadline has passed (answered
        here), and less those whose deadline falls before the model's batches usually end: those go back
        to the front of the queue to run alone. In the batch, the run stopped at their deadline and the
        others ran again: a client's valid requests with a timeout shorter than a batch's run, in batch
        after batch, cost every other member that run (round 27). The members' queue bookkeeping
        (`dequeue`) is left to dispatch_batch, after the send."""
        now = time.monotonic_ns()
        batch = model.queue.take_batch(max_rows, model.batch_apart.now(now))
        ewma = usual_batch(model.batch_compute_ewma_us, model.batch_ended_ns, now, 1000)
        cutoff = now + int(ewma * 1000) if ewma is not None and len(batch) > 1 else now
        for task in batch:
            if task.deadline_ns <= cutoff:
                break
        else:
            return batch
        live, short = [], []
        for task in batch:
            if task.deadline_ns <= now:
                self.dequeue(task)
                self._answer_expired(task)
            elif task.deadline_ns <= cutoff:
                short.append(task)
            else:
                live.append(task)
        if not live:
            return short
        for task in reversed(short):
            task.batch_key = None
            model.queue.put_back(task)
        return live

    def dispatch_batch(self, worker: WorkerHandle, batch: list[Task]) -> None:
        """Send tasks just taken from the queue (_take_batch) to `worker` as one batch."""
        model = batch[0].model
        model.batch_sizes[len(batch)] = model.batch_sizes.get(len(batch), 0) + 1  # size 1 counts too
        now = time.monotonic_ns()
        pipelined = bool(worker.inflight)  # queued behind the batch it runs: no worker was free to wait for
        idle_since = now if pipelined else worker.idle_since_ns
        dequeue = self.dequeue
        if len(batch) == 1:
            task = batch[0]
            dequeue(task)
            task.batch_wait_ns = max(0, now - max(task.enqueued_ns, idle_since))
            self.dispatch(worker, task)
            return
        worker.inflight.add_batch(batch, now, model.config.max_compute_ms * 1_000_000)
        worker.transition(WorkerState.BUSY)
        try:
            sent = self.send(worker, self._batch_message(batch, [task.rows for task in batch]))
        finally:
            # The per-member bookkeeping after the send: the worker starts on the batch meanwhile (this
            # was ~15 us per batch of 16 on the path from the last arrival to the worker).
            for task in batch:
                dequeue(task)
                task.dispatched_ns = now
                task.worker = worker
                task.batched = True
                # Waiting for the batch = waiting while a worker was free to run the task.
                task.batch_wait_ns = max(0, now - max(task.enqueued_ns, idle_since))
        if not sent:
            self._unsent(worker, batch)

    def _batch_message(self, batch: list[Task], rows: list[int]) -> list[Buffer]:
        """[b"B", plan, data]: the members' shapes were checked on admission and share a batch key, so
        the plan carries one input spec list for the whole batch (no per-member header). Small batches
        go as one frame per input, the members' rows already concatenated (the worker's input is then a
        view of the frame, and ZeroMQ moves 1 frame instead of one per member); large ones keep each
        member's frames (zero-copy here, concatenated by the worker)."""
        (specs, outputs) = batch[0].batch_key
        total = sum(rows)
        nbytes = sum(task.nbytes for task in batch)
        # BYTES elements have no fixed size: a worker reads a joined frame by the batch's total count, so
        # only each member's own frames let it hold every member to its own rows (compute.member_part).
        joined = nbytes <= JOIN_MAX_BYTES and all(datatype != "BYTES" for _, datatype, _ in specs)
        plan = {
            "tasks": [t.task_id for t in batch],
            "rows": rows,
            "inputs": [{"name": name, "datatype": datatype, "shape": [total, *rest]} for name, datatype, rest in specs],
            "outputs": list(outputs),
            "joined": joined,
            "deadline_ns": min(task.deadline_ns for task in batch),
            "max_compute_ns": batch[0].model.config.max_compute_ms * 1_000_000,
        }
        if joined:
            return [messages.BATCH, pack(plan), *[b"".join([task.data_frames[index] for task in batch]) for index in range(len(specs))]]
        return [messages.BATCH, pack(plan), *[frame for task in batch for frame in task.data_frames]]

    # -- losing workers and deadlines ----------------------------------------------------------------
    def retry_alone(self, task: Task) -> None:
        """A member of a batch that failed or crashed as a whole: which member caused it is unknown, so
        each one runs again alone (at the front of the queue) and exactly the guilty task fails."""
        task.batch_key = None
        self.retry_together(task)

    def retry_together(self, task: Task) -> None:
        """Back at the front of the queue with its batch key, to batch again. It waited for company once:
        the next batch is due at once, not held max_queue_delay_us more (a test's 10 s delay held it 10 s)."""
        self._taken_back(task)
        model = task.model
        model.queue.appendleft(task)
        if model.config.batching is not None:
            model.batch_deadline_ns = time.monotonic_ns()

    def send_again_together(self, worker: WorkerHandle, members: list[Task]) -> None:
        """What a failed batch left once the members whose own inputs failed it were answered: straight
        back to its worker as one batch, taking no new company from the queue. Queued again, they took
        more of an attacker's requests that are not UTF-8, which failed them again, and then ran alone:
        every other client's requests of the model lost batching (round 26: 260 -> 57 req/s). One past its
        deadline is answered; with the worker not free, they queue to batch again."""
        now = time.monotonic_ns()
        live = [task for task in members if not self._expired_out(task, now)]
        if not live:
            return
        if worker.retired or worker.inflight or worker.state is not WorkerState.BUSY and worker.state is not WorkerState.READY:
            for task in reversed(live):
                self.retry_together(task)
            return
        for task in live:  # as if taken from the queue: dispatch_batch dequeues each
            self._taken_back(task)
        self.dispatch_batch(worker, live)

    def _taken_back(self, task: Task) -> None:
        """A task a worker held and did not answer, known to the queue's bookkeeping again."""
        task.worker = None
        task.batched = False
        task.done = False
        self._track(task)

    def requeue_unstarted(self, worker: WorkerHandle, moved_again: OpenInferError | None = None) -> None:
        """Put the tasks a lost worker held but had not answered back at the front of their queue. With
        `moved_again` (the worker was killed on its own word that it overstayed a direct run) each task
        moves at most once: one that comes back from a second such worker fails with that error."""
        for task in reversed(worker.inflight.take_all()):  # each goes to the front: the first ends first
            if task.done:
                self.settle(task)
                continue
            if moved_again is not None:
                if task.moved:
                    self.fail_task(task, moved_again)
                    continue
                task.moved = True
            self.retry_alone(task)
        self.serve_idle(worker.model)

    def settle(self, task: Task) -> None:
        """A task answered while its run went on has left its worker (the run ended, or the worker is
        gone): its client's in-flight slot is free again."""
        if task.holds_slot:
            task.holds_slot = False
            self.limiter.release(task.identity)

    def serve_idle(self, model: ServedModel) -> None:
        if model.batchable:
            self.maybe_flush(model)
            return
        while model.queue and model.idle:
            worker = _take_idle(model)
            if worker is None:
                return
            self.next_for(worker)

    def serve_parked(self, models: list[ServedModel]) -> None:
        """Tasks left queued beside idle workers (each held by a direct run past its deadline, while a busy
        worker was healthy: _idle_place): sent on as soon as one of those runs has ended."""
        for model in models:
            if model.queue and model.idle:
                self.serve_idle(model)

    def expire_queued(self, task: Task) -> None:
        if task.done or task.worker is not None:
            return
        self.remove_queued(task)
        self._answer_expired(task)

    def _expired_out(self, task: Task, now_ns: int) -> bool:
        """A task just taken from the queue whose deadline passed before its timer was set: answered
        DEADLINE_EXCEEDED here (True), never dispatched."""
        if task.deadline_ns > now_ns:
            return False
        self._answer_expired(task)
        return True

    def _answer_expired(self, task: Task) -> None:
        waited_ms = (time.monotonic_ns() - task.received_ns) / 1e6
        self.fail_task(task, DeadlineExceeded(f"deadline passed after {waited_ms:.1f} ms waiting in the queue; the task never ran"))

    def fail_queued_by(self, model: ServedModel, identity: str, error: Callable[[], OpenInferError]) -> int:
        """Answer `identity`'s tasks queued for `model` with `error()`; returns how many."""
        tasks = list(model.queue.queued_by(identity))
        for task in tasks:
            model.queue.remove(task)
            self.dequeue(task)
            if not task.done:
                self.fail_task(task, error())
        return len(tasks)

    def fail_queue(self, model: ServedModel, error: Callable[[], OpenInferError]) -> int:
        """Answer every task still queued for `model` with `error()`; returns how many."""
        failed = 0
        while model.queue:
            task = model.queue.popleft()
            self.dequeue(task)
            if not task.done:
                self.fail_task(task, error())
                failed += 1
        return failed


def _take_idle(model: ServedModel) -> WorkerHandle | None:
    """An idle worker off the model's list (see _idle_place), or None: the task waits in the queue."""
    place = _idle_place(model)
    return None if place is None else model.idle.pop(place)


def _idle_place(model: ServedModel) -> int | None:
    """Which idle worker gets the next task: the last parked (it is the likeliest awake), unless its
    deadline page shows a client's direct run past its deadline - idle to the supervisor, that worker is
    busy with a run that may go on until max_compute_ms, and a task sent there would wait behind it - when
    another idle worker has none. If every idle worker has one, None while a busy worker of the model is
    healthy (no run past a deadline, nothing stalled): the task waits in the queue for that worker, or
    for an idle one whose run ended (Supervisor's housekeeping looks again, Dispatcher.serve_parked).
    With no such worker either, the last parked all the same: the task is then answered at its own
    deadline, never later (channel_tasks.stopped_run)."""
    idle = model.idle
    last = len(idle) - 1
    if idle[last].page is None:
        return last
    now = time.monotonic_ns()
    for place in range(last, -1, -1):
        if not idle[place].direct_run_overdue(now):
            return place
    for worker in model.workers:
        if worker.state is WorkerState.BUSY and not worker.retired and not worker.inflight.stalled and not worker.direct_run_overdue(now):
            return None
    return last


def _cannot_last_a_batch(task: Task, now_ns: int) -> bool:
    """Whether the task's deadline falls before a batch leaving at `now_ns` would usually end (the model's
    recent batch compute): _take_batch leaves such a task out of the batch, so it runs alone and holds no
    batch back (nor sends one out early)."""
    model = task.model
    ewma = usual_batch(model.batch_compute_ewma_us, model.batch_ended_ns, now_ns, 1000)
    return ewma is not None and task.deadline_ns <= now_ns + int(ewma * 1000)


def _latest_hold(task: Task) -> int:
    """The latest a queued task may wait for company (batch_rules.latest_hold_ns), given its model's
    recent compute time (of batches, else of single tasks)."""
    model = task.model
    compute_us = model.batch_compute_ewma_us or model.compute_ewma_us or 0.0
    return latest_hold_ns(task.enqueued_ns, task.deadline_ns, int(compute_us * 1000))


def _usual_size(task: Task, model: ServedModel) -> bool:
    """Pipelining trusts the recent compute time only for requests of about the size it was measured at:
    a model with dynamic shapes may take 100x longer on a 100x larger input, and a task pipelined behind
    it could then neither be cancelled nor expire in the queue."""
    return task.nbytes <= 2 * model.nbytes_ewma + 4096

