"""Answers to the non-inference operations: models, metadata, health, status, stats."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from openinfer.wire.errors import InvalidArgument
from openinfer.wire.protocol import MAX_FRAMES, MAX_HEADER_BYTES

from openinfer.daemon.modelstore.models import ModelState

from .scoped_views import covered

if TYPE_CHECKING:
    from openinfer.daemon.supervisor import Supervisor


def models_result(sup: "Supervisor") -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for name in sorted(set(sup.registry.by_name) | set(sup.registry.failed)):
        versions = sup.registry.by_name.get(name, {})
        if not versions:
            rows.append({"name": name, "version": None, "state": ModelState.FAILED.value, "reason": sup.registry.failed[name].reason, "workers": 0, "ready_workers": 0})
        for version, model in sorted(versions.items()):
            rows.append(
                {
                    "name": name,
                    "version": version,
                    "state": model.state.value,
                    "reason": model.reason,
                    "workers": len(model.workers),
                    "ready_workers": model.ready_workers(),
                    "queued": len(model.queue),
                    "path": str(model.path),
                    "sharing": model.sharing,
                    "shared_bytes": model.shared_bytes,
                    **({"chain": [member.key for member in model.chain_members] or list(model.config.chain.models)} if model.config.chain is not None else {}),
                }
            )
    return {"models": rows}


def metadata_result(sup: "Supervisor", header: dict[str, Any]) -> dict[str, Any]:
    name = header.get("model")
    if not isinstance(name, str):
        raise InvalidArgument("`model` must be a string")
    model = sup.registry.lookup(name, header.get("version"))
    return model.metadata(sup.registry.versions(name))


def health_result(sup: "Supervisor", scope: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Ready only when at least one model serves, every model that loaded has a ready worker, and the
    daemon is not draining. Models that failed to load are listed but do not hold readiness back.
    `scope`: the model patterns a peer's grants of `health` name (scoped_views.py): readiness of those
    models alone (round 38: a scoped peer saw `ready` turn false when a model it cannot see went down)."""
    not_ready = []
    failed = []
    for model in sup.registry.all():
        if scope is not None and not covered(model.name, scope):
            continue
        if model.state is ModelState.FAILED:
            failed.append({"model": model.key, "reason": model.reason})
        elif model.ready_workers() == 0 or model.state is not ModelState.READY:
            not_ready.append({"model": model.key, "state": model.state.value, "reason": model.reason})
    for name, entry in sup.registry.failed.items():
        if scope is None or covered(name, scope):
            failed.append({"model": name, "reason": entry.reason})
    serving = any(m.state is ModelState.READY for m in sup.registry.all() if scope is None or covered(m.name, scope))
    ready = serving and not not_ready and not sup.draining
    # What one request may carry at this socket (PROTOCOL.md 9): a client refuses a larger one itself
    # instead of sending bytes the daemon skips. A model's own max_request_bytes may be lower (`metadata`).
    limits = {"max_request_bytes": sup.settings.server.max_request_bytes, "max_header_bytes": MAX_HEADER_BYTES, "max_frames": MAX_FRAMES}
    return {"ready": ready, "draining": sup.draining, "not_ready": not_ready, "failed": failed, "limits": limits}


MEMORY_READ_NS = 1_000_000_000


class MemoryReadings:
    """Each process's memory as `status` shows it, read from /proc at most once a second (the figures are
    that old at most). A worker's smaps costs ~0.3-0.7 ms to read (onnxruntime maps much): a `status` of
    10 workers cost 2-7 ms of the supervisor's loop, which any local peer the shipped policy grants
    `status` could make it spend again and again."""

    def __init__(self) -> None:
        self._read: dict[int, tuple[int, dict[str, int]]] = {}  # pid -> (when read, figures)

    def of(self, pids: list[int], now_ns: int) -> dict[int, dict[str, int]]:
        kept = {}
        for pid in pids:
            read = self._read.get(pid)
            if read is None or now_ns - read[0] >= MEMORY_READ_NS:
                read = (now_ns, _memory(pid))
            kept[pid] = read
        self._read = kept  # (only the processes asked about now: a pid gone is forgotten)
        return {pid: figures for pid, (_, figures) in kept.items()}


_readings = MemoryReadings()


def _memory(pid: int) -> dict[str, int]:
    try:
        info = psutil.Process(pid).memory_full_info()
        return {"rss": info.rss, "uss": info.uss, "pss": getattr(info, "pss", 0)}
    except (psutil.Error, OSError):
        return {}


def status_result(sup: "Supervisor") -> dict[str, Any]:
    now = time.monotonic_ns()
    ordered = sorted(sup.pool.all_workers(), key=lambda w: w.worker_id)
    memory = _readings.of([w.pid for w in ordered] + [os.getpid()], now)
    workers = []
    for worker in ordered:
        workers.append(
            {
                "id": worker.worker_id,
                "pid": worker.pid,
                "model": worker.model.name,
                "version": worker.model.version,
                "state": worker.state.value,
                "tasks_served": worker.tasks_served,
                "restarts": worker.model.restarts,
                "uptime_s": round((now - worker.spawned_ns) / 1e9, 3),
                "sandbox": worker.sandbox,
                "memory": memory[worker.pid],
                # Running on past its tasks' deadline, answered already (a run it cannot stop): killed at max_compute_ms.
                **({"stalled": True} if worker.inflight.stalled else {}),
                **({"cache": {"entries": worker.cache_held[0], "bytes": worker.cache_held[1]}} if worker.cache_held is not None else {}),
                # What its last PONG said it holds for direct requests in flight and unread replies (recycling.py).
                **({"request_bytes": worker.request_bytes} if worker.page is not None else {}),
                # Ledger records the worker could not write (the supervisor had not caught up): requests the
                # books miss. The worker's own word, like the rest of its ledger; an honest one writes 0.
                **({"ledger_dropped": worker.ledger.dropped()} if worker.ledger is not None else {}),
                # Direct requests its ledger says it took and has not answered yet (queued or running).
                **({"direct_requests": len(worker.direct_pending)} if worker.ledger is not None else {}),
            }
        )
    return {
        "pid": os.getpid(),
        "address": sup.address,
        "connections": sup.connections.describe(),
        "uptime_s": round((now - sup.started_ns) / 1e9, 3),
        "draining": sup.draining,
        "sandbox": sup.settings.sandbox.enabled,
        "models": models_result(sup)["models"],
        "workers": workers,
        "queued": sum(len(m.queue) for m in sup.sync.all_models()),
        "reloading": sorted(m.key for m in sup.sync.pending.values()),
        "retiring": sorted(m.key for m in sup.sync.retiring),
        "in_flight": sum(len(w.inflight) for w in sup.pool.all_workers()),
        "supervisor_memory": memory[os.getpid()],
    }


def stats_result(sup: "Supervisor") -> dict[str, Any]:
    restarts = {(m.name, m.version): m.restarts for m in sup.registry.all()}
    snap = sup.accountant.snapshot(restarts)
    for model in sup.registry.all():
        entry = snap["models"].setdefault(model.name, {"requests": 0, "success": 0, "failures": {}, "versions": {}})
        entry.setdefault("versions", {}).setdefault(str(model.version), {"requests": 0, "success": 0, "failures": {}, "worker_restarts": model.restarts})
        entry["queue_depth"] = entry.get("queue_depth", 0) + len(model.queue)
        entry.setdefault("queue_by_priority", {})[str(model.version)] = model.queue.depth_by_priority()
        if model.batch_sizes:
            entry.setdefault("batch_sizes", {})[str(model.version)] = {str(k): v for k, v in sorted(model.batch_sizes.items())}
        if model.stage_totals:  # a chain: per member, how many of its requests ran it, how often, how long
            entry.setdefault("chain", {})[str(model.version)] = {
                member: {"requests": int(requests), "runs": int(runs), "compute_ms": round(compute_us / 1000, 3), "mean_compute_us": round(compute_us / requests, 1) if requests else None}
                for member, (requests, runs, compute_us) in model.stage_totals.items()
            }
        if model.config.cache is not None:
            held = [w.cache_held[1] for w in model.workers if w.cache_held is not None]
            entry.setdefault("cache", {})[str(model.version)] = {
                "lookups": model.cache_lookups, "hits": model.cache_hits,
                "hit_ratio": round(model.cache_hits / model.cache_lookups, 4) if model.cache_lookups else None,
                "bytes": sum(held), "max_bytes_per_worker": model.config.cache.max_bytes,
            }
    snap["admission"] = {"rejected": dict(sup.limiter.rejected), "in_flight_by_client": dict(sup.limiter.in_flight), "policy": sup.limiter.policy.source}
    return snap
