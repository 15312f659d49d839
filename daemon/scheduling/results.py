"""What workers send back: one task's RESULT, or a whole batch's RESULTS. Each message is checked first
(worker_inbound.py: what the worker was given, sizes, types); a message that does not fit retires the
worker. Then the worker's timestamps become each reply's `timing`, the worker gets its next task before
the reply is written, and the client is answered."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from openinfer.wire.errors import error_from_wire
from openinfer.wire.protocol import PROTOCOL_VERSION, pack
from openinfer.wire.zmtp import Buffer

from .batch_rules import after_batch, usual_batch
from .dispatch import Dispatcher
from openinfer.daemon.frontdoor.replies import ReplySender
from .reply_headers import BatchReplyHeaders
from .tasks import Task
from openinfer.daemon.workerpool.worker_inbound import BadWorkerMessage, parse_batch, parse_result, task_id_of
from openinfer.daemon.workerpool.workers import WorkerHandle, WorkerState


class WorkerResults:
    def __init__(self, dispatcher: Dispatcher, replies: ReplySender, reject_worker: Callable[[WorkerHandle, str], None]) -> None:
        self.dispatcher = dispatcher
        self.replies = replies
        self.reject_worker = reject_worker  # a worker that sent what it was not asked for: retire it

    def on_result(self, worker: WorkerHandle, frames: list[Buffer]) -> None:
        inflight = worker.inflight
        try:
            task = inflight.head
            if task is None or task.batched:
                raise BadWorkerMessage("RESULT while it holds no single task")
            if task_id_of(frames[0]) != task.task_id:
                raise BadWorkerMessage("RESULT for a task it is not running")
            chain = task.model.config.chain
            result = parse_result(frames, task.dispatched_ns, task.wanted or task.model.output_order, chain.models if chain is not None else ())
            if result.cache is not None and task.model.config.cache is None:
                raise BadWorkerMessage("a cache outcome for a model without [cache]")
        except BadWorkerMessage as exc:
            self.reject_worker(worker, str(exc))
            return
        now = time.monotonic_ns()
        worker.ping_sent_ns = 0  # any message proves the worker's loop is alive
        inflight.finish_head(now, task.model.config.max_compute_ms * 1_000_000)
        worker.tasks_served += 1
        if task.done:  # answered DEADLINE_EXCEEDED while this run went on: the late answer goes nowhere
            worker.last_send_ns = result.timing.send_ns
            self.dispatcher.settle(task)
            self.dispatcher.next_for(worker)
            return
        model = task.model
        task.done = True
        timing_in = result.timing
        # A pipelined task waited in the worker until the previous one was sent: that wait is queueing.
        started_ns = task.dispatched_ns if task.dispatched_ns > worker.last_send_ns else worker.last_send_ns
        worker.last_send_ns = timing_in.send_ns
        timing = {
            "decode_us": (task.decoded_ns - task.received_ns) / 1000,
            "queue_us": (started_ns - task.decoded_ns) / 1000,
            "dispatch_us": max(0.0, (timing_in.recv_ns - started_ns) / 1000),
        }
        error = result.error
        if error is None and result.cache == "hit":  # nothing ran: no run stages, and no run to learn from
            model.consecutive_crashes = model.respawn_crashes = 0
        elif error is None:
            compute_us = timing_in.compute_us
            timing["prep_us"] = timing_in.prep_us
            timing["compute_us"] = compute_us
            timing["encode_us"] = timing_in.encode_us
            model.consecutive_crashes = model.respawn_crashes = 0
            ewma = model.compute_ewma_us
            model.compute_ewma_us = compute_us if ewma is None else 0.9 * ewma + 0.1 * compute_us
            model.nbytes_ewma = task.nbytes if ewma is None else 0.9 * model.nbytes_ewma + 0.1 * task.nbytes
        timing["return_us"] = (now - timing_in.send_ns) / 1000
        timing["cpu_us"] = timing_in.cpu_us
        if inflight:  # the next pipelined task started when this result was sent
            if worker.state is WorkerState.BUSY:
                self.dispatcher.next_for(worker)  # keep the pipeline full before spending time on the reply
        outputs = result.frames
        timing["total_us"] = (time.monotonic_ns() - task.received_ns) / 1000
        if error is None:
            reply = {"v": PROTOCOL_VERSION, "id": task.request_id, "model": model.name, "version": model.version, "outputs": result.outputs, "timing": timing}
            if model.batchable:  # a batching model's task that ran alone
                reply["batch_size"] = 1
                timing["batch_wait_us"] = task.batch_wait_ns / 1000  # part of queue_us, not an extra stage
            if result.cache is not None:
                reply["cache"] = result.cache
                model.count_cache(result.cache == "hit")
            if result.stages is not None:
                reply["stages"] = result.stages
                for member, stage in result.stages.items():
                    model.count_stage(member, stage["runs"], stage["compute_us"])
            self.replies.send(task.route, reply, outputs)
            code = None
        else:
            self.replies.send(task.route, {"v": PROTOCOL_VERSION, "id": task.request_id, "error": error, "timing": timing})
            code = error["code"]
            if result.cache is not None:  # looked up, missed, then failed: a lookup all the same
                model.count_cache(False)
        bytes_out = 0
        for frame in outputs:
            bytes_out += len(frame)
        self.replies.finish(task, code, timing, bytes_out)
        if worker.state is WorkerState.BUSY and not worker.inflight:
            self.dispatcher.next_for(worker)

    def _run_the_rest_again_together(self, worker: WorkerHandle, batch: list[Task]) -> None:
        """The members a failed batch left, once those it failed for are answered: one batch again, to the
        same worker, without new company (round 26). Once: a member sent again whose batch fails again
        runs alone, so a worker that keeps naming members cannot loop."""
        left = [task for task in batch if not task.done]
        for task in reversed(left):  # (each goes to the front of the queue: the last first keeps their order)
            if task.rebatched:
                self.dispatcher.retry_alone(task)
        again = [task for task in left if not task.rebatched]
        for task in again:
            task.rebatched = True
        if again:
            self.dispatcher.send_again_together(worker, again)

    def on_batch(self, worker: WorkerHandle, frames: list[Buffer]) -> None:
        """One message answers a whole batch: per task, its own timing and output frames."""
        inflight = worker.inflight
        try:
            batch = inflight.running_batch()
            if not batch:
                raise BadWorkerMessage("RESULTS while it holds no batch")
            head = batch[0]
            wanted = head.batch_key[1] or head.model.output_order
            result = parse_batch(frames, [t.task_id for t in batch], [t.rows for t in batch], wanted, head.dispatched_ns)
        except BadWorkerMessage as exc:
            self.reject_worker(worker, str(exc))
            return
        now = time.monotonic_ns()
        worker.ping_sent_ns = 0
        inflight.finish_batch(len(batch), now, head.model.config.max_compute_ms * 1_000_000)
        worker.tasks_served += len(batch)
        model = head.model
        # A pipelined batch waited in the worker until the previous one was sent: that wait is queueing.
        dispatched_ns = head.dispatched_ns
        started_ns = dispatched_ns if dispatched_ns > worker.last_send_ns else worker.last_send_ns
        timing_in = result.timing
        worker.last_send_ns = timing_in.send_ns
        # Members answered DEADLINE_EXCEEDED while the run went on (supervisor._expire_running) get nothing
        # more; they stay in `batch`, whose order the outputs are cut in.
        answered = [task for task in batch if task.done]
        for task in answered:
            self.dispatcher.settle(task)
        if result.failed or len(answered) == len(batch):
            bad = result.bad_members
            if bad is not None:  # those members' own inputs did not decode: they fail (round 23)
                for index, error in bad.items():
                    if not batch[index].done:
                        self.replies.fail(batch[index], error_from_wire(error))
            stopped = bad is None and _stopped_at_a_members_deadline(result.error, batch, now)
            if stopped:  # those whose deadline it was: such requests of theirs run alone a while (batch_rules.BatchStoppers)
                for task in batch:
                    if task.deadline_ns <= now:
                        model.batch_stoppers.stopped(task.identity, task.deadline_ns - task.received_ns, now)
            if bad is not None or stopped:
                self._run_the_rest_again_together(worker, batch)
            else:
                for task in batch:  # one member's input may have failed the whole batch: each runs alone
                    if not task.done:
                        self.dispatcher.retry_alone(task)
            self.dispatcher.next_for(worker)
            return
        model.consecutive_crashes = model.respawn_crashes = 0
        # (the estimate as it stood when the batch began: one slow batch must not have it forgotten by its own length)
        model.batch_compute_ewma_us = after_batch(usual_batch(model.batch_compute_ewma_us, model.batch_ended_ns, started_ns, 1000), timing_in.compute_us)
        model.batch_ended_ns = now
        self.dispatcher.next_for(worker)  # the worker is free: the next batch leaves before the replies
        shared = {
            "dispatch_us": max(0.0, (timing_in.recv_ns - started_ns) / 1000),
            "prep_us": timing_in.prep_us,
            "compute_us": timing_in.compute_us,
            "return_us": (now - timing_in.send_ns) / 1000,
            "encode_us": timing_in.encode_us,
            "cpu_us": timing_in.cpu_us,
        }
        rows_layout = result.rows_layout
        if rows_layout:  # fixed-size outputs: headers from prepared pieces (reply_headers.py)
            headers = BatchReplyHeaders(model.name, model.version, len(batch), result.outputs, shared)
            members: Iterator[Any] = _rows_outputs(result.outputs, result.frames, batch)
        else:
            header = {"v": PROTOCOL_VERSION, "id": 0, "model": model.name, "version": model.version, "outputs": None, "timing": None, "batch_size": len(batch)}
            members = _member_outputs(result.outputs, result.frames)
        own_timings: list[tuple[float, float, float, float]] = []
        bytes_out: list[int] = []
        send_packed = self.replies.send_packed
        monotonic_ns = time.monotonic_ns
        with self.replies.connections.held():  # one write per client connection for the whole batch
            for task, member in zip(batch, members):
                if task.done:
                    continue
                received_ns = task.received_ns
                decoded_ns = task.decoded_ns
                own = (  # accounting.MEMBER_STAGES; the rest of the timing is shared by the batch
                    (decoded_ns - received_ns) / 1000,
                    (started_ns - decoded_ns) / 1000,
                    task.batch_wait_ns / 1000,  # part of queue_us, not an extra stage
                    (monotonic_ns() - received_ns) / 1000,
                )
                if rows_layout:
                    outputs = member
                    packed = headers.render(task.request_id, task.rows, own)
                else:
                    specs, outputs = member
                    header["id"], header["outputs"] = task.request_id, specs
                    header["timing"] = {"decode_us": own[0], "queue_us": own[1], **shared, "batch_wait_us": own[2], "total_us": own[3]}
                    packed = pack(header)
                send_packed(task.route, packed, outputs)
                own_timings.append(own)
                size = 0
                for frame in outputs:
                    size += len(frame)
                bytes_out.append(size)
        self.replies.finish_batch([task for task in batch if not task.done] if answered else batch, shared, own_timings, bytes_out)


def _rows_outputs(specs: list[dict[str, Any]], frames: list[Buffer], batch: list[Task]) -> Iterator[list[Any]]:
    """Layout "rows" (worker/serve.py: _split_outputs): one frame per output for the whole batch, each
    member's rows cut out by byte offset (views: sendmsg writes them without a copy)."""
    views = [memoryview(frame) for frame in frames]
    total = specs[0]["shape"][0] if specs else 0
    row_bytes = [len(view) // total if total else 0 for view in views]
    start = 0
    for task in batch:
        rows = task.rows
        yield [view[start * size : (start + rows) * size] for view, size in zip(views, row_bytes)]
        start += rows


def _member_outputs(per_member: list[list[dict[str, Any]]], frames: list[Buffer]) -> Iterator[tuple[list[dict[str, Any]], list[Any]]]:
    """Layout "members": per member its output specs and frames."""
    offset = 0
    for specs in per_member:
        count = len(specs)
        yield specs, frames[offset : offset + count]
        offset += count


def _stopped_at_a_members_deadline(error: dict[str, str] | None, batch: list[Task], now_ns: int) -> bool:
    """The worker stopped the batch at its earliest deadline, a member's that has passed: that member (the
    supervisor has answered it) is why, not the others' inputs. Round 27: a client's valid requests with a
    timeout shorter than a batch's run, in batch after batch, made every other member run alone."""
    return error is not None and error["code"] == "DEADLINE_EXCEEDED" and any(task.deadline_ns <= now_ns for task in batch)
