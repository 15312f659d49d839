"""The work the supervisor sends a worker over its channel: one TASK, or one BATCH of tasks (layouts in
messages.py), each answered with exactly one RESULT(S) message, whatever onnxruntime raised.

A run is stopped at its deadline (the earliest of its tasks', and at most max_compute_ms after it
starts) by the worker's run watch, as a direct request's is (run_watch.py): the tasks are answered
DEADLINE_EXCEEDED and the worker lives on. The supervisor kills it only if the run does not end a grace
period after that (a single kernel that never returns, a step's own loop): a client's short timeout
alone never costs a worker."""
from __future__ import annotations

import time
from typing import Any

from openinfer.wire.errors import DeadlineExceeded
from openinfer.wire.protocol import pack, unpack
from openinfer.wire.tensors import ELEMENTS_DEADLINE_NS
from openinfer.wire.zmtp import Buffer, FrameStream

from . import messages
from .compute import BadMembers, batch_feed, encode_outputs, feed_from, plain, split_outputs
from .run_watch import RunStopped, RunWatch
from .session import task_error
from .verdict_cache import VerdictCache


def run_task(channel: FrameStream, session: Any, output_names: list[str], frames: list[Buffer], watch: RunWatch, cache: VerdictCache | None = None) -> None:
    received_ns = time.monotonic_ns()
    cpu_start = time.process_time_ns()
    result_kind = messages.RESULT + bytes(frames[0][1:9])  # echoes the task id
    header: dict[str, Any] = {}
    key = None
    try:
        header = unpack(frames[1])
        wanted = header.get("outputs") or output_names
        if cache is not None:
            identity = bytes(frames[0][messages.TASK_HEAD_BYTES:]).decode()  # the one the supervisor appended
            key = cache.key(header["inputs"], frames[2:], wanted, identity)
            hit = cache.get(key, received_ns)
            if hit is not None:  # answered again without running anything
                meta = {"outputs": hit.specs(), "cache": "hit", "recv_ns": received_ns, "prep_us": 0.0, "compute_us": 0.0, "encode_us": 0.0,
                        "cpu_us": (time.process_time_ns() - cpu_start) / 1000, "send_ns": time.monotonic_ns()}
                channel.send([result_kind, pack(meta), *hit.payloads])
                return
        deadline_ns, max_compute_ns = messages.unpack_stop(frames[0])
        # max_compute_ms counts from the task's arrival, as the supervisor's kill does (round 16: from
        # its inputs' preparation on, a long preparation got the worker killed before the run was stopped)
        stop_at_ns = min(deadline_ns, received_ns + max_compute_ns)
        ELEMENTS_DEADLINE_NS.set(stop_at_ns)  # BYTES conversions stop there too (wire/tensors.py)
        feed = feed_from(header, frames[2:], session.raw_inputs)
        prepared_ns = time.monotonic_ns()
        results = stopped_run(session, watch, wanted, feed, stop_at_ns)
        computed_ns = time.monotonic_ns()
        specs, payloads = encode_outputs(wanted, results)
        encoded_ns = time.monotonic_ns()
        meta = {
            "outputs": specs,
            "recv_ns": received_ns,
            "prep_us": (prepared_ns - received_ns) / 1000,
            "compute_us": (computed_ns - prepared_ns) / 1000,
            "encode_us": (encoded_ns - computed_ns) / 1000,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000,
            "send_ns": time.monotonic_ns(),
        }
        if session.last_stages is not None:  # a chain: how long each of its models ran
            meta["stages"] = session.last_stages
        if cache is not None and key is not None:
            cache.put(key, identity, specs, payloads, encoded_ns)
            meta["cache"] = "miss"
        channel.send([result_kind, pack(meta), *payloads])
    except Exception as exc:  # every task gets exactly one answer, whatever onnxruntime raised
        meta = {
            "error": task_error(exc, header.get("inputs") or [], session.dynamic_inputs),
            "recv_ns": received_ns,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000,
            "send_ns": time.monotonic_ns(),
        }
        if key is not None:  # looked up and missed before it failed: counted as a lookup (round 24)
            meta["cache"] = "miss"
        channel.send([result_kind, pack(meta)])
    finally:
        ELEMENTS_DEADLINE_NS.set(0)


def stopped_run(session: Any, watch: RunWatch, wanted: list[str], feed: dict[str, Any], stop_at_ns: int) -> list[Any]:
    """session.run, stopped at stop_at_ns: DeadlineExceeded if the watch stopped it, or at once if the
    deadline passed before it started (it waited behind a run that overstayed: the supervisor has
    answered it already, and a step's own loop would not be stopped by the watch)."""
    started_ns = time.monotonic_ns()
    if started_ns >= stop_at_ns:
        raise DeadlineExceeded(f"its deadline passed {(started_ns - stop_at_ns) / 1e6:.0f} ms before it could start, while it waited in the worker; it never ran")
    try:
        return watch.run(lambda options: session.run(wanted, feed, options), stop_at_ns)
    except RunStopped:
        raise DeadlineExceeded(f"stopped after {(time.monotonic_ns() - started_ns) / 1e6:.0f} ms of running: past its deadline (the request's timeout, or the model's max_compute_ms); the worker was kept") from None


def run_batch(channel: FrameStream, session: Any, output_names: list[str], frames: list[Buffer], watch: RunWatch) -> None:
    """Several compatible tasks run once as one batch (rows concatenated along axis 0), answered in one
    message. Results equal running each task alone (the batch dimension is row-independent).

    In:  [b"B", plan {tasks, rows, inputs (the batch's specs), outputs, joined}, input frames] where
         joined = one frame per input holding every member's rows, else per member its input frames.
    Out: [b"S", meta, output frames] in meta["layout"]: "rows" = one frame per output for the whole
         batch, or "members" = per member its output frames (see _split_outputs).
    One message per batch, not per task: the supervisor's per-message cost is the throughput ceiling,
    and batching exists to cut it.
    """
    received_ns = time.monotonic_ns()
    cpu_start = time.process_time_ns()
    plan = unpack(frames[1])
    task_ids: list[int] = plan["tasks"]
    try:
        stop_at_ns = min(plan["deadline_ns"], received_ns + plan["max_compute_ns"])  # as run_task's
        ELEMENTS_DEADLINE_NS.set(stop_at_ns)
        merged = batch_feed(plan, frames[2:])
        wanted = plan["outputs"] or output_names
        prepared_ns = time.monotonic_ns()
        results = [plain(value) for value in stopped_run(session, watch, wanted, merged, stop_at_ns)]
        computed_ns = time.monotonic_ns()
        meta, payloads = split_outputs(results, wanted, plan["rows"])
        meta.update(
            tasks=task_ids,
            recv_ns=received_ns,
            prep_us=(prepared_ns - received_ns) / 1000,
            compute_us=(computed_ns - prepared_ns) / 1000,
            encode_us=(time.monotonic_ns() - computed_ns) / 1000,
            cpu_us=(time.process_time_ns() - cpu_start) / 1000 / len(task_ids),
            send_ns=time.monotonic_ns(),
        )
        channel.send([messages.RESULTS, pack(meta), *payloads])
    except Exception as exc:  # every task of the batch gets an answer (the supervisor retries each alone)
        meta = {
            "tasks": task_ids,
            "error": task_error(exc, plan["inputs"], session.dynamic_inputs),
            "recv_ns": received_ns,
            "cpu_us": 0.0,
            "send_ns": time.monotonic_ns(),
        }
        if isinstance(exc, BadMembers):  # members whose own inputs failed it: they fail, the rest batch again
            meta["bad"] = [[member, task_error(cause, plan["inputs"], session.dynamic_inputs)] for member, cause in exc.bad]
        channel.send([messages.RESULTS, pack(meta)])
    finally:
        ELEMENTS_DEADLINE_NS.set(0)
