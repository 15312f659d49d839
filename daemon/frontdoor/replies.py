"""Answers to clients: the one place that sends a reply on a client connection, and that closes a
task's books (client limit released, accounting, sampled access log) once it is answered."""
from __future__ import annotations

import logging
import time
from typing import Any

from openinfer.wire.errors import OpenInferError
from openinfer.wire.protocol import PROTOCOL_VERSION, pack

from openinfer.daemon.observability.accounting import MEMBER_STAGES, Accountant
from .client_limits import ClientLimiter
from .connections import ConnectionTable, Route
from openinfer.daemon.config.settings import Settings
from openinfer.daemon.scheduling.tasks import Task

log = logging.getLogger("openinfer.supervisor")
access_log = logging.getLogger("openinfer.access")

_DELIMITER = b""


class ReplySender:
    def __init__(self, settings: Settings, connections: ConnectionTable, accountant: Accountant, limiter: ClientLimiter) -> None:
        self.settings = settings
        self.connections = connections
        self.accountant = accountant
        self.limiter = limiter
        # (connection id, request id) of every accepted infer not yet answered: a duplicate id is refused
        # (it would make `cancel` and the client's reply matching ambiguous).

    def send(self, route: Route, header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        self.send_packed(route, pack(header), payloads)

    def send_packed(self, route: Route, header: bytes, payloads: list[Any] | None = None) -> None:
        """Send a reply whose header is already msgpack bytes (reply_headers.py packs a batch's). A
        reply for a connection that is gone is dropped (and counted): connection ids are never reused."""
        frames: list[Any] = [_DELIMITER, header] if route.delimited else [header]
        if payloads:
            frames.extend(payloads)
        self.connections.send(route.conn, frames)

    def error(self, route: Route, request_id: int | None, exc: OpenInferError, timing: dict[str, float] | None = None) -> None:
        reply: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "error": exc.to_wire()}
        if timing:
            reply["timing"] = timing
        self.send(route, reply)

    def finish(self, task: Task, code: str | None, timing: dict[str, float], bytes_out: int = 0) -> None:
        self._close(task)
        self._account(task, code, timing, bytes_out)

    def _account(self, task: Task, code: str | None, timing: dict[str, float], bytes_out: int) -> None:
        self.accountant.record(task.model.name, task.model.version, task.client, code, timing, task.nbytes, bytes_out)
        self.accountant.count_operation("infer", code)
        if self._sampled(task):
            self._log_access(task, code, timing)

    def finish_batch(self, batch: list[Task], shared: dict[str, float], own: list[tuple[float, float, float, float]], bytes_out: list[int]) -> None:
        """`finish` for every member of a batch that succeeded; own[i] = member i's MEMBER_STAGES values."""
        for task in batch:
            self._close(task)
        model = batch[0].model
        self.accountant.count_operation("infer", None, len(batch))
        self.accountant.record_batch_later(model.name, model.version, shared, [task.client for task in batch], own, [task.nbytes for task in batch], bytes_out)
        if self.settings.log.access_log_sample <= 0:  # the default: no per-member look at all
            return
        for task, values in zip(batch, own):
            if self._sampled(task):
                self._log_access(task, None, {**dict(zip(MEMBER_STAGES, values)), **shared})

    def _close(self, task: Task, keep_slot: bool = False) -> None:
        """The task is answered: its id may be reused and its client's in-flight slot is free (unless its
        run goes on: fail's keep_slot)."""
        task.done = True
        task.route.conn.open_ids.discard(task.request_id)
        if keep_slot:
            task.holds_slot = True
        else:
            self.limiter.release(task.identity)

    def _sampled(self, task: Task) -> bool:
        return self.access_sampled(task.task_id)

    def access_sampled(self, task_id: int) -> bool:
        """Whether the access log keeps this task (log.access_log_sample, by a hash of the task id)."""
        sample = self.settings.log.access_log_sample
        return sample > 0 and (sample >= 1 or (task_id * 2654435761 % 2**32) / 2**32 < sample)

    @staticmethod
    def _log_access(task: Task, code: str | None, timing: dict[str, float]) -> None:
        model = task.model
        access_log.info("task", extra={"task": task.task_id, "request": task.request_id, "model": model.name, "version": model.version, "client": task.client, "code": code or "OK", "timing": timing})

    def log_direct_access(self, task_id: int, worker: int, model: str, version: int, request_id: int, client: str, code: str, timing: dict[str, float]) -> None:
        """An access record a worker sent for a request it answered on the direct path (checked on
        arrival, direct/endpoints.py); `task` is numbered here, as the front door's tasks are."""
        access_log.info("task", extra={"task": task_id, "request": request_id, "model": model, "version": version, "client": client, "code": code, "timing": timing, "worker": worker, "path": "direct"})

    def fail(self, task: Task, exc: OpenInferError, keep_slot: bool = False) -> None:
        """Answer `task` with `exc`. With `keep_slot` (a run that goes on past its deadline: the client hears
        now) its client's in-flight slot stays taken until the run ends (Dispatcher.settle), or a client
        could keep more workers busy than its max_in_flight by giving each request a short timeout."""
        timing = {"total_us": (time.monotonic_ns() - task.received_ns) / 1000}
        self.error(task.route, task.request_id, exc, timing)
        self._close(task, keep_slot)
        self._account(task, exc.code, timing, 0)
