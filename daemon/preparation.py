"""Running the sandboxed prepare helper for a model version, then starting its workers on the result."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .models import ModelState, ServedModel
from .prepared import PreparedStore
from .spawner import SpawnedProcess, spawn_worker
from .worker_output import StderrRelay

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("openinfer.supervisor")
MAX_PREPARE_ATTEMPTS = 2


@dataclass
class PrepareJob:
    model: ServedModel
    spawned: SpawnedProcess
    tmp_dir: Path
    started_ns: int


class WeightPreparer:
    def __init__(self, pool: "WorkerPool", store: PreparedStore, on_done: Callable[[ServedModel], None]) -> None:
        self.pool = pool
        self.store = store
        self.on_done = on_done  # start the model's workers (with or without shared weights)
        self.jobs: dict[int, PrepareJob] = {}  # by pidfd
        self.relays: dict[int, StderrRelay] = {}  # by pidfd

    def wanted(self, model: ServedModel) -> bool:
        settings = self.pool.settings.pool
        if not settings.share_weights:
            model.sharing = "off: pool.share_weights = false"
            return False
        try:
            size = model.path.stat().st_size
        except OSError:
            return False
        if size < settings.share_min_bytes:
            model.sharing = f"off: {size} bytes < pool.share_min_bytes"
            return False
        return True

    def start(self, model: ServedModel) -> None:
        model.prepare_attempts += 1
        model.sharing = "preparing"
        tmp = self.store.new_tmp_dir()
        config = self.pool.boot_config(model, 0)
        config = type(config)(**{**config.__dict__, "prepare_into": str(tmp), "cache_dir": str(self.store.base), "prepared_dir": None})
        spawned = spawn_worker(config, with_channel=False)  # it reports through its status pipe only
        job = PrepareJob(model, spawned, tmp, time.monotonic_ns())
        self.jobs[spawned.pidfd] = job
        relay = self.relays[spawned.pidfd] = StderrRelay(spawned.stderr_fd, {"helper": "prepare", "pid": spawned.pid, "model": model.key})
        self.pool.reactor.add(spawned.pidfd, lambda mask: self.on_fd_ready(spawned.pidfd))
        self.pool.reactor.add(spawned.stderr_fd, lambda mask: self._pump(relay))
        log.info("preparing shared weights", extra={"model": model.key, "pid": spawned.pid})

    def _pump(self, relay: StderrRelay) -> None:
        if not relay.pump():
            self.pool.reactor.remove(relay.fd)

    def on_fd_ready(self, fd: int) -> bool:
        """The helper's pidfd is readable: it exited. True when `fd` was one of ours."""
        job = self.jobs.get(fd)
        if job is None:
            return False
        if job.spawned.process.poll() is None:
            return True  # stale event for a reused fd number
        del self.jobs[fd]
        self.pool.reactor.remove(fd)
        self.pool.reactor.remove(job.spawned.stderr_fd)
        self.relays.pop(fd).pump(final=True)
        report = job.spawned.read_report() or {}
        job.spawned.close()
        model = job.model
        elapsed_ms = round((time.monotonic_ns() - job.started_ns) / 1e6, 1)
        result = report.get("result")
        if job.spawned.process.returncode == 0 and isinstance(result, dict):
            model.prepared_dir = self.store.finalize(job.tmp_dir, str(result["key"]), bool(result.get("reused")))
            model.shared_bytes = (model.prepared_dir / "weights.bin").stat().st_size
            model.sharing = "shared"
            log.info("shared weights ready", extra={"model": model.key, "reused": result.get("reused"), "ms": elapsed_ms, "shared_bytes": model.shared_bytes, "dir": str(model.prepared_dir)})
        else:
            import shutil

            shutil.rmtree(job.tmp_dir, ignore_errors=True)
            reason = report.get("error") or f"prepare helper exited with {job.spawned.process.returncode}"
            model.prepared_dir = None
            model.sharing = f"off: {reason}"
            log.warning("weights not shared: every worker loads its own copy", extra={"model": model.key, "reason": reason})
        if model.state is not ModelState.FAILED and not model.retiring:
            self.on_done(model)
        return True

    def on_mismatch(self, model: ServedModel) -> None:
        """A worker found the prepared weights give wrong numbers: retire them and prepare again (once)."""
        if model.prepared_dir is not None:
            self.store.discard(model.prepared_dir.name)
        model.prepared_dir = None
        if model.prepare_attempts < MAX_PREPARE_ATTEMPTS:
            self.start(model)
        else:
            model.sharing = "off: prepared weights failed verification twice"
            self.on_done(model)
