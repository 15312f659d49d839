"""Answers to clients: the one place that sends a reply frame sequence on the public socket, and that
closes a task's books (client limit released, accounting, sampled access log) once it is answered."""
from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from openinfer.client.errors import OpenInferError
from openinfer.client.protocol import PROTOCOL_VERSION, pack

from .accounting import MEMBER_STAGES, Accountant
from .client_limits import ClientLimiter
from .settings import Settings
from .tasks import Task

log = logging.getLogger("openinfer.supervisor")
access_log = logging.getLogger("openinfer.access")

_NOBLOCK = int(zmq.NOBLOCK)  # pyzmq flag enums cost microseconds per call on this path; ints do not
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK


class ReplySender:
    def __init__(self, settings: Settings, frontend: zmq.Socket, accountant: Accountant, limiter: ClientLimiter) -> None:  # type: ignore[type-arg]
        self.settings = settings
        self.frontend = frontend
        self.accountant = accountant
        self.limiter = limiter
        # (routing id, request id) of every accepted infer not yet answered: a duplicate id is refused
        # (it would make `cancel` and the client's reply matching ambiguous).
        self.open_requests: set[tuple[bytes, int]] = set()

    def send(self, route: list[Any], header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        self.send_packed(route, pack(header), payloads, header.get("id"))

    def send_packed(self, route: list[Any], header: bytes, payloads: list[Any] | None = None, request_id: int | None = None) -> None:
        """Send a reply whose header is already msgpack bytes (reply_headers.py packs a batch's)."""
        send = self.frontend.send
        try:
            # With ROUTER_MANDATORY an unroutable peer fails on the first frame, before anything is queued.
            for frame in route:
                send(frame, _SNDMORE_NOBLOCK, copy=False)
            if payloads:
                send(header, _SNDMORE_NOBLOCK)
                last = len(payloads) - 1
                for index, frame in enumerate(payloads):
                    send(frame, _NOBLOCK if index == last else _SNDMORE_NOBLOCK, copy=False)
            else:
                send(header, _NOBLOCK)
        except zmq.ZMQError as exc:  # client gone (EHOSTUNREACH) or not reading (EAGAIN): drop, never block
            log.info("reply dropped", extra={"id": request_id, "reason": exc.strerror})

    def error(self, route: list[Any], request_id: int | None, exc: OpenInferError, timing: dict[str, float] | None = None) -> None:
        reply: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "error": exc.to_wire()}
        if timing:
            reply["timing"] = timing
        self.send(route, reply)

    def finish(self, task: Task, code: str | None, timing: dict[str, float], bytes_out: int = 0) -> None:
        self._close(task)
        self.accountant.record(task.model.name, task.model.version, task.client, code, timing, task.nbytes, bytes_out)
        if self._sampled(task):
            self._log_access(task, code, timing)

    def finish_batch(self, batch: list[Task], shared: dict[str, float], own: list[tuple[float, float, float, float]], bytes_out: list[int]) -> None:
        """`finish` for every member of a batch that succeeded; own[i] = member i's MEMBER_STAGES values."""
        for task in batch:
            self._close(task)
        model = batch[0].model
        self.accountant.record_batch_later(model.name, model.version, shared, [task.client for task in batch], own, [task.nbytes for task in batch], bytes_out)
        if self.settings.log.access_log_sample <= 0:  # the default: no per-member look at all
            return
        for task, values in zip(batch, own):
            if self._sampled(task):
                self._log_access(task, None, {**dict(zip(MEMBER_STAGES, values)), **shared})

    def _close(self, task: Task) -> None:
        """The task is answered: its id may be reused and its client's in-flight slot is free."""
        task.done = True
        self.open_requests.discard((task.route_id, task.request_id))
        self.limiter.release(task.client)

    def _sampled(self, task: Task) -> bool:
        """Whether the access log keeps this task (log.access_log_sample, by a hash of the task id)."""
        sample = self.settings.log.access_log_sample
        return sample > 0 and (sample >= 1 or (task.task_id * 2654435761 % 2**32) / 2**32 < sample)

    @staticmethod
    def _log_access(task: Task, code: str | None, timing: dict[str, float]) -> None:
        model = task.model
        access_log.info("task", extra={"task": task.task_id, "request": task.request_id, "model": model.name, "version": model.version, "client": task.client, "code": code or "OK", "timing": timing})

    def fail(self, task: Task, exc: OpenInferError) -> None:
        timing = {"total_us": (time.monotonic_ns() - task.received_ns) / 1000}
        self.error(task.route, task.request_id, exc, timing)
        self.finish(task, exc.code, timing)
