"""Requests clients sent straight to this worker: admission, their queue, batching, the run, the reply.

Order, as the supervisor's queue (daemon/scheduling/taskqueue.py): higher `priority` first; among equals, arrival;
a request that has waited `starvation_ms` goes first whatever its priority. A request whose deadline
passes while it waits is answered DEADLINE_EXCEEDED and never runs. With `[batching]`, requests of the
same shapes (but dimension 0) and outputs run as one batch, held at most `max_queue_delay_us` to fill
up. Everything a request costs is tallied (daemon/observability/accounting.py) and handed to the supervisor off the
request path (serve.py), so `stats` stays complete.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openinfer.daemon.observability.accounting import Accountant
from openinfer.daemon.direct.deadline_page import DeadlinePage
from openinfer.daemon.modelstore.modelconfig import BatchingConfig
from openinfer.daemon.frontdoor.validation import InputSignature, check_infer
from openinfer.wire.errors import DeadlineExceeded, InvalidArgument, OpenInferError
from openinfer.wire.protocol import PROTOCOL_VERSION
from openinfer.wire.tensors import BF16Array, decode_array
from openinfer.wire.zmtp import Buffer

from .compute import encode_outputs, feed_from, for_onnxruntime, plain
from .direct import DirectConnection, DirectDoor, reject_busy
from .session import Runner, task_error


@dataclass
class ModelView:
    """What this worker knows of the model it serves: enough to check a request as the supervisor does."""

    name: str
    version: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    timeout_ms: int
    max_compute_ms: int
    max_request_bytes: int
    starvation_ms: int
    batching: BatchingConfig | None
    input_by_name: dict[str, dict[str, Any]] = field(init=False)
    output_names: frozenset[str] = field(init=False)
    output_order: list[str] = field(init=False)
    input_signatures: list[InputSignature] = field(default_factory=list)
    batchable: bool = field(init=False)

    def __post_init__(self) -> None:
        self.input_by_name = {spec["name"]: spec for spec in self.inputs}
        self.output_names = frozenset(spec["name"] for spec in self.outputs)
        self.output_order = [spec["name"] for spec in self.outputs]
        self.batchable = self.batching is not None and all(len(s["shape"]) >= 1 and s["shape"][0] == -1 for s in [*self.inputs, *self.outputs])


@dataclass(eq=False, slots=True)
class DirectRequest:
    conn: DirectConnection
    delimited: bool
    request_id: int
    client: str  # accounting key: the identity, or "<name>@<identity>"
    specs: list[dict[str, Any]]
    data: list[Buffer]
    wanted: list[str]
    nbytes: int
    priority: int
    received_ns: int
    decoded_ns: int
    deadline_ns: int
    seq: int
    batch_key: Any = None
    rows: int = 0


class DirectQueue:
    def __init__(self, door: DirectDoor, runner: Runner, model: ModelView, page: DeadlinePage | None) -> None:
        self.door = door
        self.runner = runner
        self.model = model
        self.page = page
        self.tally = Accountant()
        # Answered requests not yet counted: folded into the tally when the loop is idle (count_answered),
        # off the path from a request to its reply.
        self.answered: list[tuple[str, str | None, dict[str, float], int, int]] = []
        self.waiting: list[DirectRequest] = []
        self.in_flight: dict[str, int] = {}  # by identity: accepted here, not yet answered
        self._seq = 0
        self.last_request_ns = 0

    # -- admission ------------------------------------------------------------------------------------
    def admit(self, conn: DirectConnection, delimited: bool, request_id: int, header: dict[str, Any], data: list[Buffer], received_ns: int) -> None:
        """Check an `infer` (the lease was checked by the door) and queue it; raises the typed error."""
        model = self.model
        for key, mine in (("model", model.name), ("version", model.version)):
            given = header.get(key)
            if given is not None and given != mine:
                raise InvalidArgument(f"this worker serves {model.name}:{model.version}; the request names {key} {given!r}")
        nbytes, signature = check_infer(header, data, model, model.max_request_bytes)
        if request_id in conn.open_ids:
            raise InvalidArgument(f"id {request_id} is already in flight on this connection; ids must be unique among a connection's outstanding requests")
        lease = conn.lease
        assert lease is not None
        held = self.in_flight.get(conn.identity, 0)
        if held >= lease.max_in_flight:
            raise reject_busy(conn.identity, held, lease.max_in_flight)
        decoded_ns = time.monotonic_ns()
        timeout_ms = header.get("timeout_ms") or model.timeout_ms
        name = header.get("client")
        outputs = header.get("outputs")
        self._seq += 1
        request = DirectRequest(
            conn, delimited, request_id, f"{name}@{conn.identity}" if name else conn.identity, signature.inputs, data,
            list(outputs) if outputs else model.output_order, nbytes, header.get("priority") or 0, received_ns, decoded_ns,
            received_ns + timeout_ms * 1_000_000, self._seq,
        )
        if model.batchable and signature.rows is not None and model.batching is not None and signature.rows <= model.batching.max_batch_size:
            request.batch_key = (signature.batch_specs, tuple(request.wanted))
            request.rows = signature.rows
        conn.open_ids.add(request_id)
        self.in_flight[conn.identity] = held + 1
        self.waiting.append(request)
        self.last_request_ns = received_ns

    def cancel(self, conn: DirectConnection, target: int) -> bool:
        for request in self.waiting:
            if request.conn is conn and request.request_id == target:
                self.waiting.remove(request)
                self._fail(request, DeadlineExceeded("cancelled by the client before it ran"))
                return True
        return False

    # -- running ---------------------------------------------------------------------------------------
    def run_ready(self) -> float | None:
        """Run what can run now; returns how long until a held batch is due (seconds), else None."""
        while self.waiting:
            now = time.monotonic_ns()
            head = self._pick(now)
            if head.deadline_ns <= now:
                self.waiting.remove(head)
                self._fail(head, DeadlineExceeded(f"deadline passed after {(now - head.received_ns) / 1e6:.1f} ms waiting in the queue; the request never ran"))
                continue
            if head.batch_key is None:
                self.waiting.remove(head)
                self._run_one(head, now)
                continue
            batch, rows = self._gather(head)
            batching = self.model.batching
            assert batching is not None
            due_ns = head.decoded_ns + batching.max_queue_delay_us * 1000
            if rows < batching.max_batch_size and now < due_ns:
                return (due_ns - now) / 1e9  # hold it for more arrivals (max_queue_delay_us)
            for member in batch:
                self.waiting.remove(member)
            if len(batch) == 1:
                self._run_one(head, now)
            else:
                self._run_batch(batch, rows, now)
        return None

    def _pick(self, now: int) -> DirectRequest:
        waiting = self.waiting
        if len(waiting) == 1:
            return waiting[0]
        oldest = min(waiting, key=lambda r: r.seq)
        if now - oldest.decoded_ns >= self.model.starvation_ms * 1_000_000:
            return oldest  # aging: delayed, never starved
        return min(waiting, key=lambda r: (-r.priority, r.seq))

    def _gather(self, head: DirectRequest) -> tuple[list[DirectRequest], int]:
        batching = self.model.batching
        assert batching is not None
        batch, rows = [head], head.rows
        for request in sorted(self.waiting, key=lambda r: (-r.priority, r.seq)):
            if request is not head and request.batch_key == head.batch_key and rows + request.rows <= batching.max_batch_size:
                batch.append(request)
                rows += request.rows
        return batch, rows

    def _deadline_of(self, requests: list[DirectRequest], now: int) -> int:
        return min(min(r.deadline_ns for r in requests), now + self.model.max_compute_ms * 1_000_000)

    def _run_one(self, request: DirectRequest, started_ns: int) -> None:
        cpu_start = time.process_time_ns()
        page = self.page
        try:
            feed = feed_from({"inputs": request.specs}, request.data)
            prepared_ns = time.monotonic_ns()
            if page is not None:
                page.running(prepared_ns, self._deadline_of([request], prepared_ns))
            results = self.runner.run(request.wanted, feed)
            computed_ns = time.monotonic_ns()
            if page is not None:
                page.idle()
            specs, payloads = encode_outputs(request.wanted, results)
        except Exception as exc:
            if page is not None:
                page.idle()
            error = task_error(exc, request.specs, self.runner.dynamic_inputs)
            self._answer_error(request, error["code"], error["message"], started_ns, cpu_start)
            return
        encoded_ns = time.monotonic_ns()
        timing = {
            "decode_us": (request.decoded_ns - request.received_ns) / 1000,
            "queue_us": (started_ns - request.decoded_ns) / 1000,
            "prep_us": (prepared_ns - started_ns) / 1000,
            "compute_us": (computed_ns - prepared_ns) / 1000,
            "encode_us": (encoded_ns - computed_ns) / 1000,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000,
            "total_us": (encoded_ns - request.received_ns) / 1000,
        }
        reply = {"v": PROTOCOL_VERSION, "id": request.request_id, "model": self.model.name, "version": self.model.version, "outputs": specs, "timing": timing}
        if self.model.batchable:
            reply["batch_size"] = 1
            timing["batch_wait_us"] = 0.0
        self._answer(request, reply, payloads, None, timing)

    def _run_batch(self, batch: list[DirectRequest], rows: int, started_ns: int) -> None:
        """The members' rows joined along dimension 0, run once, each member's rows cut out of the
        outputs; if the batch fails, each member runs alone (only the guilty one fails)."""
        cpu_start = time.process_time_ns()
        page = self.page
        head = batch[0]
        try:
            feed = {}
            for index, spec in enumerate(head.specs):
                parts = [decode_array(spec["datatype"], [m.rows, *spec["shape"][1:]], m.data[index]) for m in batch]
                feed[spec["name"]] = for_onnxruntime(spec["datatype"], np.concatenate(parts, axis=0))
            prepared_ns = time.monotonic_ns()
            if page is not None:
                page.running(prepared_ns, self._deadline_of(batch, prepared_ns))
            results = [plain(value) for value in self.runner.run(head.wanted, feed)]
            computed_ns = time.monotonic_ns()
            if page is not None:
                page.idle()
        except Exception:
            if page is not None:
                page.idle()
            for member in batch:
                self._run_one(member, time.monotonic_ns())
            return
        cpu_each = (time.process_time_ns() - cpu_start) / 1000 / len(batch)
        start = 0
        for member in batch:
            parts = [value[start : start + member.rows] for value in results]
            start += member.rows
            specs, payloads = encode_outputs(member.wanted, [part if isinstance(part, BF16Array) else np.ascontiguousarray(part) for part in parts])
            now = time.monotonic_ns()
            timing = {
                "decode_us": (member.decoded_ns - member.received_ns) / 1000,
                "queue_us": (started_ns - member.decoded_ns) / 1000,
                "batch_wait_us": (started_ns - member.decoded_ns) / 1000,
                "prep_us": (prepared_ns - started_ns) / 1000,
                "compute_us": (computed_ns - prepared_ns) / 1000,
                "encode_us": (now - computed_ns) / 1000,
                "cpu_us": cpu_each,
                "total_us": (now - member.received_ns) / 1000,
            }
            reply = {"v": PROTOCOL_VERSION, "id": member.request_id, "model": self.model.name, "version": self.model.version, "outputs": specs, "timing": timing, "batch_size": len(batch)}
            self._answer(member, reply, payloads, None, timing)

    # -- answers ---------------------------------------------------------------------------------------
    def _answer(self, request: DirectRequest, reply: dict[str, Any], payloads: list[Any], code: str | None, timing: dict[str, float]) -> None:
        self.door.reply(request.conn, request.delimited, reply, payloads)
        self._close(request)
        bytes_out = 0
        for payload in payloads:
            bytes_out += len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        self.answered.append((request.client, code, timing, request.nbytes, bytes_out))

    def count_answered(self) -> None:
        """Add the requests answered since the last call to the tally (the loop calls this when idle, and
        before the tally is handed over)."""
        answered, self.answered = self.answered, []
        tally = self.tally
        name, version = self.model.name, self.model.version
        for client, code, timing, nbytes, bytes_out in answered:
            tally.record(name, version, client, code, timing, nbytes, bytes_out)
            tally.count_operation("infer", code)

    def _answer_error(self, request: DirectRequest, code: str, message: str, started_ns: int, cpu_start: int) -> None:
        timing = {"total_us": (time.monotonic_ns() - request.received_ns) / 1000, "cpu_us": (time.process_time_ns() - cpu_start) / 1000}
        self._answer(request, {"v": PROTOCOL_VERSION, "id": request.request_id, "error": {"code": code, "message": message}, "timing": timing}, [], code, timing)

    def _fail(self, request: DirectRequest, exc: OpenInferError) -> None:
        timing = {"total_us": (time.monotonic_ns() - request.received_ns) / 1000}
        self._answer(request, {"v": PROTOCOL_VERSION, "id": request.request_id, "error": exc.to_wire(), "timing": timing}, [], exc.code, timing)

    def _close(self, request: DirectRequest) -> None:
        request.conn.open_ids.discard(request.request_id)
        identity = request.conn.identity
        left = self.in_flight.get(identity, 0) - 1
        if left > 0:
            self.in_flight[identity] = left
        else:
            self.in_flight.pop(identity, None)

    def refused(self, conn: DirectConnection, exc: OpenInferError, received_ns: int) -> None:
        """Count a request the door or admission refused (it was answered there)."""
        self.tally.record(None, None, conn.identity, exc.code, {"total_us": (time.monotonic_ns() - received_ns) / 1000})
        self.tally.count_operation("infer", exc.code)

    def take_tally(self) -> dict[str, Any] | None:
        """What was counted since the last call (None when nothing), for the supervisor."""
        self.count_answered()
        tally = self.tally
        if not tally.by_client and not tally.operations:
            return None
        self.tally = Accountant()
        return tally.export()

