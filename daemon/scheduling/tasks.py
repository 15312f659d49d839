"""One accepted request on its way through the supervisor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openinfer.daemon.frontdoor.connections import Route
    from openinfer.daemon.modelstore.models import ServedModel
    from openinfer.daemon.frontdoor.validation import InputSignature
    from openinfer.daemon.workerpool.workers import WorkerHandle


@dataclass(slots=True, eq=False)
class Task:
    # FrontDoorRequests._accept_infer (frontdoor/requests.py) builds tasks positionally: keep the order of the fields up to `signature`.
    task_id: int
    request_id: int
    route: "Route"  # where the reply goes: the connection object itself, and its envelope
    identity: str  # the kernel-proven peer ("uid=N", "curve=<key>"): limits, quotas and turns key on it
    client: str  # accounting key: the identity, or "<name>@<identity>" when the request names itself
    model: "ServedModel"
    header_frame: Any  # the client's header frame, forwarded to the worker untouched
    data_frames: list[Any]
    nbytes: int
    received_ns: int
    decoded_ns: int
    deadline_ns: int
    priority: int = 0
    signature: "InputSignature | None" = None  # what its inputs passed (check_infer)
    enqueued_ns: int = 0
    dispatched_ns: int = 0
    worker: "WorkerHandle | None" = None
    done: bool = False
    batch_key: Any = None  # tasks with equal keys may run as one batch (same shapes but dim 0, same outputs)
    rows: int = 0
    batched: bool = False  # dispatched as a member of a batch of two or more
    batch_wait_ns: int = 0
    deadline_timer: Any = None  # the queued-deadline timer, cancelled when the task leaves the queue
    wanted: tuple[str, ...] = ()  # the outputs it returns, in order (the request's `outputs`, else the model's)
    # Moved off a worker killed for a direct request's overstay (it waited behind that run): at most once.
    # The deadline page that says so is the worker's own word: a hostile step that fakes it on every
    # worker would otherwise bounce its own request from worker to worker, each killed, until its deadline.
    moved: bool = False
    # Answered DEADLINE_EXCEEDED while its run went on (ReplySender.fail with keep_slot): its client's in-flight
    # slot is released when the run ends (Dispatcher.settle), not when the client was answered.
    holds_slot: bool = False
    rebatched: bool = False  # sent back to batch again once, after another member's inputs failed its batch
