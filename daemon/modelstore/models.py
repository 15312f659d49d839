"""The served models: one `ServedModel` per (name, version), with its workers, idle set and queue."""
from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openinfer.wire.errors import InvalidArgument, NotFound, Unavailable

from .modelconfig import ModelConfig
from openinfer.daemon.scheduling.taskqueue import TaskQueue
from openinfer.daemon.direct.batch_apart import BatchApart
from openinfer.daemon.scheduling.batch_rules import BatchStoppers

log = logging.getLogger("openinfer.supervisor")

if TYPE_CHECKING:
    from openinfer.daemon.scheduling.tasks import Task
    from openinfer.daemon.frontdoor.validation import InputSignature
    from openinfer.daemon.workerpool.workers import WorkerHandle


class ModelState(enum.Enum):
    LOADING = "loading"  # no worker has loaded it yet
    READY = "ready"  # metadata known; at least one worker loaded it
    FAILED = "failed"  # it cannot be loaded (reason says why); not retried until a reload
    UNAVAILABLE = "unavailable"  # workers crash-looped; requests get UNAVAILABLE until a reload


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int
    path: Path
    config: ModelConfig
    worker_count: int
    intra_op_threads: int
    state: ModelState = ModelState.LOADING
    reason: str | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    input_by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_names: frozenset[str] = frozenset()
    output_order: tuple[str, ...] = ()  # every output, in model order: what a request without `outputs` gets
    input_signatures: list["InputSignature"] = field(default_factory=list)  # newest first (check_infer)
    workers: list["WorkerHandle"] = field(default_factory=list)
    idle: list["WorkerHandle"] = field(default_factory=list)
    queue: "TaskQueue[Task]" = field(default_factory=TaskQueue)
    consecutive_crashes: int = 0
    # What the respawn delay doubles on (pool._respawn_later): reset by a result the supervisor itself received,
    # not by a success a worker books in its ledger (round 74: a step booked one and exited, in every worker,
    # and the delay stayed 100 ms for good; consecutive_crashes, the crash loop's count, takes both).
    respawn_crashes: int = 0
    replaced_ns: int = 0  # when the last crashed or overrun worker's replacement was due to start
    batch_apart: BatchApart = field(default_factory=BatchApart)  # whose direct requests batch only with their own (crash_blame.py)
    restarts: int = 0
    load_ms: float | None = None
    prepared_dir: Path | None = None  # shared, pre-packed weights the workers map
    sharing: str = "off"  # "preparing", "shared", "off: <why>" (shown in status)
    shared_bytes: int = 0
    prepare_attempts: int = 0
    batchable: bool = False  # [batching] configured and every input and output has a dynamic first dimension
    batch_deadline_ns: int = 0  # when the queued tasks must be flushed to a worker, batch full or not
    batch_timer: Any = None  # the timer set for batch_deadline_ns (cancelled when no batch waits)
    # Queued tasks that run alone (Dispatcher._admit_for_batching), by task id in arrival order, for the next
    # worker free while a batch is held for company. A task leaves it as it leaves the queue (dequeue):
    # round 30's attacker had expired ones kept here, 16 MiB each, past every memory limit.
    alone: "OrderedDict[int, Task]" = field(default_factory=OrderedDict)
    batch_sizes: dict[int, int] = field(default_factory=dict)
    cache_lookups: int = 0  # with [cache]: answers looked up in a worker's verdict cache, and found
    cache_hits: int = 0
    compute_ewma_us: float | None = None  # recent compute time; short models get pipelined dispatch
    batch_compute_ewma_us: float | None = None  # the same for batches of two or more
    batch_ended_ns: int = 0  # when the last batch's result came (scheduling/batch_rules.usual_batch)
    batch_stoppers: BatchStoppers = field(default_factory=BatchStoppers)  # clients whose request stopped a batch: such requests of theirs run alone a while
    nbytes_ewma: float = 0.0  # recent request size, the size compute_ewma_us was measured at
    fingerprint: tuple[Any, ...] | None = None  # (size, mtime_ns, inode) of the model file, and of its steps' files
    retiring: bool = False  # replaced or removed: finishes its queue, takes no new work
    repository: Path | None = None  # the repository `path` was found in: its files are opened beneath it
    chain_members: list["ServedModel"] = field(default_factory=list)  # a chain's: the members its workers load
    stage_totals: dict[str, list[float]] = field(default_factory=dict)  # a chain's: member -> [requests, runs, compute_us]
    # Identities ("uid=N") the front door gave a lease for this model version: the only ones its workers'
    # ledgers may book a request to (DirectBooks). As many as the uids its access policy lets lease it.
    lessees: set[str] = field(default_factory=set)

    @property
    def steps_dir(self) -> Path:
        """Where config.toml and the steps' files are: beside a chain's config.toml (its `path`), two
        levels above a model's file."""
        return self.path.parent if self.config.chain is not None else self.path.parent.parent

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def count_stage(self, member: str, runs: int, compute_us: float) -> None:
        """One chain request's time in one of its members (from the reply's `stages`, checked)."""
        totals = self.stage_totals.setdefault(member, [0, 0, 0.0])
        totals[0] += runs > 0  # requests that ran it
        totals[1] += runs
        totals[2] += compute_us

    def count_cache(self, hit: bool) -> None:
        self.cache_lookups += 1
        self.cache_hits += hit

    def set_metadata(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.input_by_name = {spec["name"]: spec for spec in inputs}
        self.output_names = frozenset(spec["name"] for spec in outputs)
        self.output_order = tuple(spec["name"] for spec in outputs)
        self.input_signatures = []  # checked against the metadata they replace
        # Batching needs a batch dimension everywhere: rows of one request never mix with another's.
        self.batchable = self.config.batching is not None and all(
            len(spec["shape"]) >= 1 and spec["shape"][0] == -1 for spec in [*inputs, *outputs]
        )

    def fail_to_load(self, reason: str) -> None:
        """It cannot be loaded (FAILED, with the reason `status` shows), logged once here; whoever answers
        its queued requests is the caller's concern."""
        self.state = ModelState.FAILED
        self.reason = reason
        log.error("model failed to load", extra={"model": self.name, "version": self.version, "reason": reason})

    def ready_workers(self) -> int:
        from openinfer.daemon.workerpool.workers import WorkerState

        return sum(1 for w in self.workers if w.state in (WorkerState.READY, WorkerState.BUSY))

    def metadata(self, versions: list[int]) -> dict[str, Any]:
        """Model metadata in the Open Inference Protocol's shape."""
        return {
            "name": self.name,
            "versions": versions,
            "version": self.version,
            "platform": "onnxruntime_onnx",
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


@dataclass
class FailedModel:
    """A model directory that could not even be scanned (bad config, no versions)."""

    name: str
    reason: str


class ModelRegistry:
    """name -> version -> ServedModel; answers lookups the way the protocol specifies."""

    def __init__(self) -> None:
        self.by_name: dict[str, dict[int, ServedModel]] = {}
        self.failed: dict[str, FailedModel] = {}

    def add(self, model: ServedModel) -> None:
        self.by_name.setdefault(model.name, {})[model.version] = model

    def all(self) -> list[ServedModel]:
        return [m for versions in self.by_name.values() for m in versions.values()]

    def versions(self, name: str) -> list[int]:
        return sorted(self.by_name.get(name, {}))

    def lookup(self, name: Any, version: Any) -> ServedModel:
        """The model to serve: the named version, else the newest version that can serve."""
        versions = self.by_name.get(name) if isinstance(name, str) else None
        if not versions:
            if isinstance(name, str) and name in self.failed:
                raise Unavailable(f"model {name!r} failed to load: {self.failed[name].reason}")
            raise NotFound(f"unknown model {name!r}", {"models": sorted(self.by_name)})
        if version is not None:
            if not isinstance(version, int) or isinstance(version, bool):
                raise InvalidArgument("`version` must be an integer")
            model = versions.get(version)
            if model is None:
                raise NotFound(f"model {name!r} has no version {version!r}", {"versions": sorted(versions)})
            return model
        if len(versions) == 1:  # the usual case, on every request: no list to build
            return next(iter(versions.values()))
        serving = [m for m in versions.values() if m.state is ModelState.READY]
        if serving:
            return max(serving, key=lambda m: m.version)
        return versions[max(versions)]
