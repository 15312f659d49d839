"""Putting the worker's direct endpoint together at boot, before the serve policy (which forbids
creating anything): the listening socket and the deadline page the supervisor passed at spawn, the door
and the queue (worker/direct.py, worker/direct_queue.py)."""
from __future__ import annotations

import socket
from typing import Any

from openinfer.daemon.direct.deadline_page import DeadlinePage
from openinfer.daemon.direct.ledger import LedgerWriter
from openinfer.daemon.modelstore.modelconfig import BatchingConfig

from .bootconfig import WorkerBootConfig
from .direct import LISTEN_FD, DirectDoor, DirectLimits
from .direct_queue import DirectQueue, ModelView
from .serve import DirectServing
from .run_watch import RunWatch
from .session import Runner
from .verdict_cache import VerdictCache

DEADLINE_PAGE_FD = 6  # spawner.DEADLINE_FD


def direct_serving(config: WorkerBootConfig, description: dict[str, Any], runner: Runner, poller: Any, lease_key: bytes, watch: RunWatch, cache: VerdictCache | None = None) -> DirectServing:
    direct = config.direct
    assert direct is not None
    listener = socket.socket(fileno=LISTEN_FD)
    listener.setblocking(False)
    batching = BatchingConfig(**{**direct.batching, "preferred_batch_sizes": tuple(direct.batching.get("preferred_batch_sizes", ()))}) if direct.batching else None
    model = ModelView(config.model, config.version, description["inputs"], description["outputs"], direct.timeout_ms, direct.max_compute_ms, direct.max_request_bytes, direct.starvation_ms, batching)
    limits = DirectLimits(direct.max_connections, direct.max_connections_per_identity, direct.max_request_bytes, direct.max_reply_backlog_bytes, direct.strike_limit)
    page = DeadlinePage(DEADLINE_PAGE_FD)
    page.idle()
    queue_box: list[DirectQueue] = []
    door = DirectDoor(
        listener, poller, limits, config.model, config.version, config.worker_id,
        on_request=lambda *args: queue_box[0].admit(*args),
        on_cancel=lambda conn, target: queue_box[0].cancel(conn, target),
        on_outcome=lambda conn, client, op, request_id, exc, received_ns: queue_box[0].outcome(client, op, request_id, exc, received_ns),
    )
    door.key = lease_key
    queue = DirectQueue(door, runner, model, page, LedgerWriter(DEADLINE_PAGE_FD), watch, cache)
    queue_box.append(queue)
    _warm(lease_key)
    return DirectServing(door, queue, direct.spin_us)


def _warm(key: bytes) -> None:
    """hmac/hashlib and msgpack paths used per attach: taken once now, while imports still work."""
    from openinfer.daemon.direct.lease import LeaseRefused, issue, verify

    token, _ = issue(key or b"\0" * 32, "uid=0", "warm", 0, 1_000_000_000, 0, 1, 9)
    try:
        verify(key or b"\0" * 32, token, "uid=0", "warm", 0, 0)
    except LeaseRefused:
        pass
