"""Running the sandboxed prepare helper for a model version, then starting its workers on the result.

Paths and keys are chosen here, never taken from the helper (it parses the untrusted model; issue #16):
before any helper starts, the supervisor opens the source beneath the repository (daemon/files/model_files.py)
and measures it, on the loop: a file over pool.max_model_bytes fails its model there, unread, and one below
pool.share_min_bytes starts its workers at once, so neither waits for the one off-loop thread (attacker
round 5: a sparse 64 GiB file was hashed for 100 s, and every model queued behind it waited, the smallest
too). The rest are hashed off the loop, smallest first, for the cache key (daemon/files/cache_key.py), and
a valid `<cache>/<key>` is reused without starting a helper at all. A helper's report is one
exact line, `{"result": "prepared"}`, and its output directory is checked before it is renamed into place
(daemon/files/prepared.py). Whatever fails, the model loads unshared, with the reason in `openinfer status`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from openinfer.daemon.files.cache_key import VersionFiles, cache_key, cpu_fingerprint, fd_sha256, onnxruntime_version, owner_prefix, version_files
from openinfer.daemon.files.model_files import ModelFileError, ModelTooLarge, check_model_size, describe_user, open_model, open_version_dir
from openinfer.daemon.modelstore.models import ModelState, ServedModel
from openinfer.daemon.loop.offloop import OffLoopRunner
from openinfer.daemon.files.prepared import Expectation, PreparedRejected, PreparedStore
from openinfer.daemon.files.prepared_layout import REPORT, output_limit_bytes
from .spawner import SpawnedProcess, spawn_worker
from .worker_output import StderrRelay

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("openinfer.supervisor")
MAX_PREPARE_ATTEMPTS = 2


@dataclass(frozen=True)
class Plan:
    """What the supervisor decided before any helper runs."""

    key: str
    expected: Expectation
    not_reusable: str | None  # None: `<cache>/<key>` is valid and is used as it is
    files: VersionFiles  # the rest of the version directory, as hashed for the key


@dataclass
class PrepareJob:
    model: ServedModel
    plan: Plan
    spawned: SpawnedProcess
    tmp_dir: Path
    started_ns: int


@dataclass(frozen=True)
class Source:
    """A model file the supervisor opened and measured on its loop; the off-loop job that hashes it closes it."""

    version_dir: int
    fd: int
    size: int
    name: str  # the model file's name in its version directory

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.version_dir)


def open_source(model: ServedModel, max_bytes: int) -> Source:
    """On the loop (an open and an fstat, no read). Raises ModelTooLarge over `max_bytes`, ModelFileError when
    the file cannot be opened safely."""
    repository = str(model.repository or model.path.parent)
    version_dir, fd = open_model(repository, str(model.path), describe_user(os.geteuid()))
    try:
        return Source(version_dir, fd, check_model_size(fd, str(model.path), max_bytes), model.path.name)
    except BaseException:
        os.close(fd)
        os.close(version_dir)
        raise


def plan_preparation(source: Source, store: PreparedStore, beside_bytes: int, owner: str) -> Plan:
    """Off the loop: the key from the bytes of the source and of the files beside it (its external data
    among them), and whether the cache already holds it. Closes `source`. Raises OSError when the file grew
    past its checked size meanwhile, or the files beside it past `beside_bytes` (what they came to when
    they were sized), or they are too many to hash. `owner`: the model version's, in the key (cache_key)."""
    try:
        source_sha256 = fd_sha256(source.fd, source.size)
        try:
            files = version_files(source.version_dir, source.name, beside_bytes)
        except OSError as exc:  # (its bound is what they came to when they were sized, moments ago)
            raise OSError(exc.errno, f"the files beside the model changed after they were sized: {exc.strerror or exc}") from None
    finally:
        source.close()
    expected = Expectation(source_sha256, onnxruntime_version(), cpu_fingerprint(), output_limit_bytes(source.size))
    key = cache_key(source_sha256, files.sha256, owner)
    return Plan(key, expected, store.holds(key, expected), files)


def beside_stamps(repository: str, model_path: Path) -> tuple[tuple[str, int, int, int, int, int], ...]:
    """The stamps of every entry beside the model file (version_files, no byte read), its version directory
    opened beneath the repository as every model file is. Raises OSError or ModelFileError."""
    version_dir = open_version_dir(repository, str(model_path), describe_user(os.geteuid()))
    try:
        return version_files(version_dir, model_path.name, None, hash_bytes=False).stamps
    finally:
        os.close(version_dir)


def files_changed(model: ServedModel, files: VersionFiles) -> str | None:
    """Why the version directory is no longer what `files` hashed (an entry added, removed, or written:
    its ctime moves whatever else is set back), else None. After a helper ran: the weights it prepared may
    be from other bytes than the key names. Stamps only, no hashing, off the loop."""
    try:
        now = beside_stamps(str(model.repository or model.path.parent), model.path)
    except (OSError, ModelFileError) as exc:
        return f"the version directory cannot be read again: {exc}"
    if now != files.stamps:
        return "the files beside the model changed while its weights were prepared"
    return None


class WeightPreparer:
    def __init__(self, pool: "WorkerPool", store: PreparedStore, on_done: Callable[[ServedModel], None], live_models: Callable[[], list[ServedModel]]) -> None:
        self.pool = pool
        self.store = store
        self.on_done = on_done  # start the model's workers (with or without shared weights)
        self.live_models = live_models  # every model version served, pending or retiring (what may map an entry)
        self.jobs: dict[int, PrepareJob] = {}  # by pidfd
        self.relays: dict[int, StderrRelay] = {}  # by pidfd
        self.offloop = OffLoopRunner()
        pool.reactor.add(self.offloop.fd, lambda mask: self.offloop.collect())

    def close(self) -> None:
        self.pool.reactor.remove(self.offloop.fd)
        self.offloop.close()
        self.store.close()

    def wanted(self, model: ServedModel) -> bool:
        if not self.pool.settings.pool.share_weights:
            model.sharing = "off: pool.share_weights = false"
            return False
        return True

    def start(self, model: ServedModel) -> None:
        """Decide on the loop what needs no hashing: a model over pool.max_model_bytes fails here (FAILED, with
        the reason; the caller answers its queue if it has one), one below pool.share_min_bytes, or one the
        supervisor cannot open, starts its workers now. Only the rest waits for the off-loop thread."""
        model.prepare_attempts += 1
        settings = self.pool.settings.pool
        # What the files beside the model may come to: the operator's settings alone, never the model's own
        # config.toml (round 29: memory_limit_mb = 1048576 there let a sparse 1 TiB file beside the model
        # hold the one hashing thread for an hour, every other model waiting).
        max_beside = max(settings.max_model_bytes, self.pool.settings.sandbox.memory_limit_mb << 20)
        try:
            source = open_source(model, settings.max_model_bytes)
        except ModelTooLarge as exc:
            self._fail(model, str(exc))
            return
        except ModelFileError as exc:  # its workers, opening it as the worker user, say why they cannot
            self._off(model, str(exc))
            self.on_done(model)
            return
        if source.size < settings.share_min_bytes:
            source.close()
            model.sharing = f"off: {source.size} bytes < pool.share_min_bytes"
            self.on_done(model)
            return
        model.sharing = "preparing"
        started_ns = time.monotonic_ns()
        # First what the files beside the model come to, off the loop too (it never walks a repository's
        # directories: round 30's attacker found emptied ext4 directories cost ms each), ahead of any hash:
        # stamps only, no byte read, at most MAX_VERSION_ENTRIES stats.
        sizing = lambda: version_files(source.version_dir, source.name, max_beside, hash_bytes=False)  # noqa: E731
        self.offloop.submit(sizing, lambda beside: self._sized(model, source, beside, started_ns), cost=0)

    def _sized(self, model: ServedModel, source: Source, beside: Any, started_ns: int) -> None:
        """The files beside the model were stat'ed: hash them with the model, smallest job first by all it
        reads (round 29: only model.onnx counted), and no more bytes than they came to then (round 30: a
        job stat'ed small and grown after ran first all the same, 16 s of hashing each)."""
        if model.state is ModelState.FAILED or model.retiring:
            source.close()
            return
        if not isinstance(beside, VersionFiles):
            source.close()
            reason = (beside.strerror or str(beside)) if isinstance(beside, OSError) else f"{type(beside).__name__}: {beside}"
            self._off(model, f"the files beside the model are not hashed: {reason}")
            self.on_done(model)
            return
        owner = _owner(model)
        planning = lambda: plan_preparation(source, self.store, beside.total_bytes, owner)  # noqa: E731
        self.offloop.submit(planning, lambda result: self._planned(model, result, started_ns), cost=source.size + beside.total_bytes)

    def _planned(self, model: ServedModel, result: Any, started_ns: int) -> None:
        if model.state is ModelState.FAILED or model.retiring:
            return
        if isinstance(result, Plan) and result.not_reusable is None:
            self._use(model, result.key, True, started_ns)
        elif isinstance(result, Plan):
            self._start_helper(model, result, started_ns)
            return
        else:
            reason = str(result) if isinstance(result, ModelFileError) else result.strerror if isinstance(result, OSError) and result.strerror else f"{type(result).__name__}: {result}"
            self._off(model, reason)
        self.on_done(model)

    def _start_helper(self, model: ServedModel, plan: Plan, started_ns: int) -> None:
        tmp = self.store.new_tmp_dir()
        config = self.pool.boot_config(model, 0)
        config = type(config)(**{**config.__dict__, "prepare_into": str(tmp), "prepare_limit_bytes": plan.expected.max_file_bytes, "prepared_dir": None})
        spawned = spawn_worker(config, with_channel=False)  # it reports through its status pipe only
        job = PrepareJob(model, plan, spawned, tmp, started_ns)
        self.jobs[spawned.pidfd] = job
        relay = self.relays[spawned.pidfd] = StderrRelay(spawned.stderr_fd, {"helper": "prepare", "pid": spawned.pid, "model": model.key}, self.pool.output_budget(model), self.pool.timers.call_at)
        self.pool.reactor.add(spawned.pidfd, lambda mask: self.on_exit(spawned.pidfd))
        self.pool.reactor.add(spawned.stderr_fd, lambda mask: self._pump(relay))
        # A helper is held to a worker's boot deadline (round 66: one that never exited kept its model
        # loading, UNAVAILABLE, until a restart); killed, its model's workers load their own copies.
        deadline_ns = time.monotonic_ns() + int(self.pool.settings.pool.ready_timeout_s * 1e9)
        self.pool.timers.call_at(deadline_ns, lambda: self._overdue(job))
        log.info("preparing shared weights", extra={"model": model.key, "pid": spawned.pid, "key": plan.key, "why": plan.not_reusable})

    def _overdue(self, job: PrepareJob) -> None:
        if self.jobs.get(job.spawned.pidfd) is job:  # (still running: on_exit forgets it, and closes its pidfd)
            log.error("prepare helper not done in time; killing it", extra={"model": job.model.key, "pid": job.spawned.pid, "ready_timeout_s": self.pool.settings.pool.ready_timeout_s})
            job.spawned.kill()

    def _pump(self, relay: StderrRelay) -> None:
        if not relay.pump():
            self.pool.reactor.remove(relay.fd)  # the pipe is closed; the fd itself is closed at exit

    def on_exit(self, fd: int) -> None:
        """A helper's pidfd is readable: it exited."""
        job = self.jobs.get(fd)
        if job is None or job.spawned.process.poll() is None:
            return  # stale event for a reused fd number
        del self.jobs[fd]
        self.pool.reactor.remove(fd)
        self.pool.reactor.remove(job.spawned.stderr_fd)
        self.relays.pop(fd).pump(final=True)
        report = job.spawned.read_report()
        job.spawned.close()
        self._helper_done(job, job.spawned.process.returncode, report)

    def _helper_done(self, job: PrepareJob, returncode: int, report: dict[str, Any] | None) -> None:
        if returncode == 0 and report == REPORT:  # first: the files it read are still those hashed (off the loop)
            self.offloop.submit(lambda: files_changed(job.model, job.plan.files), lambda changed: self._finish(job, changed), cost=0)
            return
        self.store.remove_tmp(job.tmp_dir)
        self._off(job.model, _helper_failure(returncode, report))
        if job.model.state is not ModelState.FAILED and not job.model.retiring:
            self.on_done(job.model)

    def _finish(self, job: PrepareJob, changed: Any) -> None:
        """A helper succeeded: its directory goes into the cache, unless the files it read changed after they
        were hashed (`changed`: why, else None)."""
        model = job.model
        if changed is not None:
            self.store.remove_tmp(job.tmp_dir)
            self._off(model, str(changed))
        else:
            try:
                self.store.finalize(job.tmp_dir, job.plan.key, job.plan.expected)
            except PreparedRejected as exc:
                self._off(model, f"the prepare helper's output was refused: {exc}")
            except OSError as exc:  # renaming into place failed: the model still loads, unshared
                self.store.remove_tmp(job.tmp_dir)
                self._off(model, f"cannot put the prepared weights in place: {exc}")
            else:
                self._use(model, job.plan.key, False, job.started_ns)
        if model.state is not ModelState.FAILED and not model.retiring:
            self.on_done(model)

    def _use(self, model: ServedModel, key: str, reused: bool, started_ns: int) -> None:
        try:
            model.shared_bytes = self.store.weights_bytes(key)
        except OSError as exc:  # retired meanwhile (another model with the same source failed to verify it)
            self._off(model, f"the prepared weights went away: {exc}")
            return
        model.prepared_dir = self.store.path(key)
        model.sharing = "shared"
        self.retire_unused()  # (the entry this version used before, if its files changed)
        elapsed_ms = round((time.monotonic_ns() - started_ns) / 1e6, 1)
        log.info("shared weights ready", extra={"model": model.key, "reused": reused, "ms": elapsed_ms, "shared_bytes": model.shared_bytes, "dir": str(model.prepared_dir)})

    def retire_unused(self) -> None:
        """Entries no live model version maps go aside (removed at the next start: a worker may still map
        one), but those of a version still preparing. After each repository sync and each entry taken."""
        models = self.live_models()
        # What each version maps, and what each chain's workers map: its members' entries, which may be of
        # versions no longer served (round 33: a chain still serving on a replaced member's weights lost
        # them, and its next worker could not start).
        keep = {member.prepared_dir.name for model in models for member in (model, *model.chain_members) if member.prepared_dir is not None}
        preparing = {owner_prefix(_owner(model)) for model in models if model.sharing == "preparing"}
        try:
            retired = self.store.retire_unused(keep, preparing)
        except OSError as exc:
            log.warning("cannot tidy the prepared-weights cache", extra={"reason": str(exc)})
            return
        if retired:
            log.info("prepared weights no model uses retired", extra={"keys": retired})

    @staticmethod
    def _fail(model: ServedModel, reason: str) -> None:
        model.sharing = "off"
        model.fail_to_load(reason)

    def _off(self, model: ServedModel, reason: str) -> None:
        model.prepared_dir = None
        model.sharing = f"off: {reason}"
        log.warning("weights not shared: every worker loads its own copy", extra={"model": model.key, "reason": reason})

    def on_mismatch(self, model: ServedModel) -> None:
        """A worker found the prepared weights give wrong numbers: retire them and prepare again (once)."""
        if model.prepared_dir is not None:
            self.store.discard(model.prepared_dir.name)
        model.prepared_dir = None
        if model.prepare_attempts < MAX_PREPARE_ATTEMPTS:
            self.start(model)
            if model.state is ModelState.FAILED:  # its file grew past pool.max_model_bytes meanwhile
                self.pool.on_model_failed(model)
        else:
            model.sharing = "off: prepared weights failed verification twice"
            self.on_done(model)


def _owner(model: ServedModel) -> str:
    """Whose a cache entry is (cache_key): the model version's repository, name and version."""
    return f"{model.repository or model.path.parent}\0{model.name}\0{model.version}"


def _helper_failure(returncode: int, report: dict[str, Any] | None) -> str:
    """Why a helper failed, from its report when that is a plain error message (it is untrusted text:
    shown, never interpreted)."""
    error = report.get("error") if report is not None else None
    if isinstance(error, str):
        return error[:1000]
    if returncode == 0:
        return f"the prepare helper's report did not fit (expected {REPORT})"
    return f"prepare helper exited with {returncode}"
