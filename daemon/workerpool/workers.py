"""Worker handles and their one state machine."""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openinfer.wire.zmtp import FrameStream

from .inflight import Inflight
from .spawner import SpawnedProcess

if TYPE_CHECKING:
    from openinfer.daemon.direct.deadline_page import DeadlinePage
    from openinfer.daemon.direct.ledger import LedgerReader
    from openinfer.daemon.modelstore.models import ServedModel
    from .worker_output import StderrRelay

log = logging.getLogger("openinfer.supervisor")


class WorkerState(enum.Enum):
    SPAWNED = "spawned"  # process started, loading its model inside the boot sandbox
    LOADED = "loaded"  # model loaded, channel proven (HELLO), entering the serve sandbox
    READY = "ready"  # idle, may receive a task
    BUSY = "busy"  # running exactly one task
    DRAINING = "draining"  # told to finish and exit (QUIT sent or about to be)
    EXITED = "exited"


_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.SPAWNED: frozenset({WorkerState.LOADED, WorkerState.DRAINING, WorkerState.EXITED}),
    WorkerState.LOADED: frozenset({WorkerState.READY, WorkerState.DRAINING, WorkerState.EXITED}),
    WorkerState.READY: frozenset({WorkerState.BUSY, WorkerState.DRAINING, WorkerState.EXITED}),
    WorkerState.BUSY: frozenset({WorkerState.READY, WorkerState.DRAINING, WorkerState.EXITED}),
    WorkerState.DRAINING: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
}


@dataclass(eq=False)
class WorkerHandle:
    worker_id: int
    model: "ServedModel"
    spawned: SpawnedProcess
    channel: FrameStream  # the supervisor's end of the worker's socketpair
    stderr: "StderrRelay | None" = None
    retired: bool = False  # being killed (bad message, deadline): nothing it sends counts any more
    direct_address: str | None = None  # its own endpoint for clients holding a lease (direct/endpoints.py)
    page: "DeadlinePage | None" = None  # when its direct run must be done (deadline_page.py)
    ledger: "LedgerReader | None" = None  # its records of direct requests (direct/ledger.py)
    direct_pending: dict[int, tuple[str, int, int, int]] = field(default_factory=dict)  # admitted there, not yet answered: (client, bytes in, deadline ns, sent ns) by serial
    stage_records: list[tuple[str, int, float]] = field(default_factory=list)  # a chain's STAGE records awaiting their ANSWERED
    ping_token: bytes = b"p"
    state: WorkerState = WorkerState.SPAWNED
    inflight: Inflight = field(default_factory=Inflight)  # sent, unanswered (inflight.py owns it)
    tasks_served: int = 0
    cache_held: tuple[int, int] | None = None  # with [cache]: (entries, bytes) its last PONG reported
    request_bytes: int = 0  # what its last PONG said it held for direct requests in flight (recycling.py)
    spawned_ns: int = field(default_factory=time.monotonic_ns)
    ready_ns: int | None = None
    ready_address_space: int | None = None  # its VmSize when it became ready (recycling.py)
    sandbox: dict[str, Any] = field(default_factory=dict)
    exit_reason: str | None = None
    expected_exit: bool = False  # killed by us (deadline) or drained to be recycled: respawn without counting a crash
    overran: bool = False  # killed for a run past max_compute_ms: replaced after a delay, as a crash is (pool._respawn_later)
    ping_sent_ns: int = 0  # outstanding liveness PING (0 = none)
    pings_owed: int = 0  # PINGs sent and not yet answered: a PONG beyond them was never asked for
    idle_since_ns: int = 0  # when it last became READY (batch wait is measured from here)
    last_send_ns: int = 0  # when the worker sent its previous result (the next task started then)

    @property
    def pid(self) -> int:
        return self.spawned.pid

    def ran_direct_within(self, now_ns: int, window_ns: int) -> bool:
        """Its deadline page says a direct run is in progress, or ended less than `window_ns` ago (the
        worker's word: callers bound how long they believe it)."""
        if self.page is None:
            return False
        since, deadline = self.page.read()
        return deadline != 0 or (since != 0 and now_ns - since < window_ns)

    def direct_run_overdue(self, now_ns: int) -> bool:
        """Its deadline page says it is still running a direct request past that request's deadline: it is
        stopping the run, or cannot stop it and runs on (until max_compute_ms, then it is killed), so work
        sent to it now waits behind a run of unknown length."""
        if self.page is None:
            return False
        deadline = self.page.read()[1]
        return bool(deadline) and now_ns > deadline

    def transition(self, new: WorkerState) -> None:
        """The only way a worker's state changes: checked, and logged for every change but READY<->BUSY."""
        old = self.state
        if new is old:
            return
        if new not in _ALLOWED[old]:
            raise RuntimeError(f"worker {self.worker_id}: illegal transition {old.value} -> {new.value}")
        self.state = new
        if not (old in (WorkerState.READY, WorkerState.BUSY) and new in (WorkerState.READY, WorkerState.BUSY)):
            log.info(
                "worker state",
                extra={"worker": self.worker_id, "pid": self.pid, "model": self.model.name, "version": self.model.version, "from": old.value, "to": new.value},
            )
