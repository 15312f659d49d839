"""One accepted request on its way through the supervisor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import ServedModel
    from .validation import InputSignature
    from .workers import WorkerHandle


@dataclass(slots=True, eq=False)
class Task:
    # Supervisor._accept_infer builds tasks positionally: keep the order of the fields up to `signature`.
    task_id: int
    request_id: int
    route: list[Any]  # frames to put before the reply header (client identity [+ empty delimiter])
    route_id: bytes  # the client's routing id (route[0]'s bytes, taken once)
    client: str  # accounting key: "<routing id hex>" or "<name>@<routing id hex>"
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
    deadline_timer: Any = None  # the queued-deadline timer, cancelled when the task leaves the queue  # part of the queue time spent waiting for a batch while a worker was free
