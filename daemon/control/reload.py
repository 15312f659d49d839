"""Keeping the served models in step with the repository: the initial load and every reload.

A reload scans the repository and compares it with what is served:
- a new (model, version) starts loading; it takes traffic once a worker is ready;
- a changed one (file or config.toml) is loaded *beside* the old one; when all the replacement's
  workers are ready, the registry switches to it in one step and the old one drains (finishes its
  queue and running tasks, then its workers exit);
- a removed one stops taking new requests and drains the same way;
- one that fails to load leaves the old one serving, with the reason in `status`.
A failed or crash-looped model is retried by a reload.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from openinfer.daemon.modelstore.models import FailedModel, ModelRegistry, ModelState, ServedModel
from openinfer.daemon.modelstore.modelconfig import ConfigError, ModelConfig
from openinfer.daemon.steps.sources import builtin_files as steps_files_of_builtin
from openinfer.daemon.workerpool.pool import WorkerPool
from openinfer.daemon.modelstore.repository import ModelEntry, ModelVersionEntry, scan_repository
from openinfer.daemon.config.settings import Settings
from openinfer.daemon.files.model_files import ModelFileError
from openinfer.daemon.workerpool.preparation import beside_stamps
from openinfer.daemon.scheduling.taskqueue import TaskQueue
from openinfer.daemon.workerpool.workers import WorkerState

log = logging.getLogger("openinfer.supervisor")


def on_disk(path: Path) -> bool:
    """Whether the daemon can still see `path`: a directory it may no longer enter (EACCES, which
    Path.exists() raises on Python 3.11) counts as gone. Raised, it stopped every reload of a daemon not run
    as root, half-way, once an old version directory was made 0700 (round 41)."""
    return os.path.exists(path)


def file_fingerprint(path: Path) -> tuple[int, int, int] | None:
    """None: gone since the scan saw it (renamed away meanwhile): the workers will say why they cannot load,
    and the next reload finds the file again. Raising here stopped a reload half-way, and a start
    (round 39: 5 reloads in 100, 4 starts in 20, beside a file renamed in and out)."""
    try:
        st = os.lstat(path)  # a symlink is never followed (and the next scan refuses it)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def beside_fingerprint(path: Path) -> tuple[Any, ...] | str:
    """The stamps of every entry beside the model file in its version directory (its external data among
    them; preparation.beside_stamps): a reload that finds one replaced replaces the workers. It did not:
    a new weights file, SIGHUP, and the old weights kept serving ("unchanged")."""
    try:
        return beside_stamps(str(path.parent.parent.parent), path)  # (<repository>/<model>/<version>/model.onnx)
    except (OSError, ModelFileError) as exc:
        return f"unreadable: {exc}"


def model_fingerprint(path: Path, config: ModelConfig, members: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """The model file's fingerprint and the files' beside it, and its steps' files' (beside config.toml):
    a reload that finds an edited steps.py or data file replaces the workers, as it does for a new model
    file. A chain's `path` is its config.toml; `members` are its members' fingerprints (a new member file
    replaces the chain)."""
    steps = config.steps
    if config.chain is None:
        model_print: tuple[Any, ...] = (file_fingerprint(path), beside_fingerprint(path))
    else:
        model_print = (file_fingerprint(path),)
    if steps is None:
        return model_print
    steps_dir = path.parent if config.chain is not None else path.parent.parent
    names = [*steps.files, *(steps_files_of_builtin(steps.builtin) if steps.builtin is not None else [steps.module])]
    step_prints = [file_fingerprint(steps_dir / name) for name in names]  # None: missing now
    return (*model_print, *step_prints, *members)


def _member_prints(entry: ModelEntry, entries: dict[str, ModelEntry]) -> tuple[Any, ...]:
    """A chain's members' newest model files, as this scan found them (None: not there, or broken)."""
    if entry.config.chain is None:
        return ()
    prints: list[Any] = []
    for name in entry.config.chain.models:
        member = entries.get(name)
        prints.append((name, model_fingerprint(member.versions[-1].path, member.config)) if member is not None and member.versions and member.error is None else None)
    return tuple(prints)


class RepositorySync:
    def __init__(self, settings: Settings, registry: ModelRegistry, pool: WorkerPool, quit_worker: Callable[..., None], move_queue: Callable[[ServedModel], None]) -> None:
        self.settings = settings
        self.registry = registry
        self.pool = pool
        self.quit_worker = quit_worker
        self.move_queue = move_queue  # a retiring version's queue, to the version now serving its model
        self.pending: dict[tuple[str, int], ServedModel] = {}  # replacements loading beside the served one
        self.retiring: list[ServedModel] = []
        # Versions the repository no longer lists (version_policy = "latest" moved on) kept serving until a
        # version it lists is ready: without them the model answered UNAVAILABLE "is loading" for as long
        # as the new version took to load (round 13: 1,052 failed requests of one client in 0.84 s).
        self.outgoing: dict[str, dict[int, ServedModel]] = {}
        # Which chains each model lets run it, as the last scan read its config.toml - not the config of
        # the version serving, which a failed replacement leaves stale (round 37: a withdrawn consent came
        # back every other reload while the member's replacement could not load). A model whose directory
        # is broken lets none: what it meant cannot be read.
        self.consents: dict[str, frozenset[str]] = {}

    def _new_model(self, entry: ModelEntry, version: ModelVersionEntry, repository: Path, members: tuple[Any, ...] = (), replacing: ServedModel | None = None) -> ServedModel:
        """A served version, its workers started (or its weights' preparation, or its chain's wait).
        `replacing`: the same version's served model, whose clients batched apart stay so - as their crash
        strikes do, kept by name:version (round 83: a reload dropped them)."""
        model = ServedModel(
            name=entry.name,
            version=version.version,
            path=version.path,
            config=entry.config,
            worker_count=entry.config.workers or self.settings.pool.workers,
            intra_op_threads=entry.config.intra_op_threads or self.settings.pool.intra_op_threads,
            repository=repository,
        )
        model.fingerprint = model_fingerprint(version.path, entry.config, members)
        model.queue = TaskQueue(self.settings.server.starvation_ms)
        if replacing is not None:
            model.batch_apart = replacing.batch_apart
        preparer = self.pool.preparer
        over = self._over_worker_cap(model, model.worker_count)
        if over is not None:  # (a reload retries it, when other models have left room)
            model.fail_to_load(over)
        elif entry.config.chain is not None:
            model.sharing = "its members' weights"
            model.reason = f"waiting for its models {', '.join(entry.config.chain.models)}"
            # started by start_chains once every member serves
        elif preparer is not None and preparer.wanted(model):
            preparer.start(model)  # its workers start when the shared weights are ready (it fails one over pool.max_model_bytes)
        else:
            self.start_workers(model)
        return model

    def _over_worker_cap(self, model: ServedModel, wanted: int) -> str | None:
        """Why `model` may not run `wanted` workers (None: it may). Each config.toml is bounded, but not
        how many models and versions a repository holds: without a daemon-wide cap, one holding 1,000
        models of 64 workers each would start 64,000 processes. What counts is processes: every worker
        alive now, of any model (a retiring version's included: a busy one runs on until its request
        ends, and reloads that left busy versions behind once added 2 workers each past the cap), plus
        the workers the models loading will still start (waiting for their shared weights)."""
        cap = self.settings.pool.max_workers
        others = self._processes_besides(model)
        if others + wanted <= cap:
            return None
        return f"{wanted} workers would make {others + wanted} worker processes, over the daemon's {cap} (pool.max_workers; the other models' take {others}, retiring ones included until they exit)"

    def _processes_besides(self, model: ServedModel) -> int:
        alive = sum(1 for worker in self.pool.all_workers() if worker.model is not model)
        coming = sum(max(0, m.worker_count - len(m.workers)) for m in (*self.registry.all(), *self.pending.values()) if m is not model and m.state is not ModelState.FAILED and not m.retiring)
        return alive + coming

    def start_workers(self, model: ServedModel) -> None:
        for _ in range(model.worker_count - len(model.workers)):
            self.pool.spawn(model)

    def sync(self) -> dict[str, list[str]]:
        """Bring the registry in line with the repository; returns what changed (for logs and the reply)."""
        changes: dict[str, list[str]] = {"added": [], "replaced": [], "removed": [], "unchanged": [], "failed": []}
        repository = Path(os.path.abspath(self.settings.server.models))  # workers run elsewhere: no relative paths
        try:
            entries = scan_repository(repository)
        except ConfigError as exc:
            log.error("reload failed: repository unreadable; keeping what is served", extra={"reason": str(exc)})
            changes["failed"].append(str(exc))
            return changes
        self.registry.failed = {}
        by_name = {entry.name: entry for entry in entries}
        self.consents = {entry.name: frozenset(entry.config.chains) for entry in entries if entry.error is None}
        # What left the repository goes first: its idle workers quit now (their room under
        # pool.max_workers is free once they have exited; a later reload starts what did not fit).
        self._remove_unseen(entries, changes)
        for entry in entries:
            try:
                self._sync_entry(entry, by_name, repository, changes)
            except Exception:  # noqa: BLE001  (one entry's surprise must not stop the others' reload, nor the start)
                log.exception("reload: a model could not be brought in line; the others were", extra={"model": entry.name})
                changes["failed"].append(entry.name)
        self._drop_chains_that_lost_a_model(changes)
        log.info("repository synced", extra=changes)
        self.start_chains()
        if self.pool.preparer is not None:  # what versions left behind in the weights cache, aside
            self.pool.preparer.retire_unused()
        return changes

    def _sync_entry(self, entry: ModelEntry, by_name: dict[str, ModelEntry], repository: Path, changes: dict[str, list[str]]) -> None:
        """One model directory of the scan: add, replace or keep each of its versions."""
        if entry.error is not None:
            if entry.name in self.registry.by_name:
                log.error("reload: model directory broken; keeping what is served", extra={"model": entry.name, "reason": entry.error})
                for model in self.registry.by_name[entry.name].values():
                    model.reason = f"reload failed: {entry.error}"
            else:
                self.registry.failed[entry.name] = FailedModel(entry.name, entry.error)
            changes["failed"].append(entry.name)
            return
        members = _member_prints(entry, by_name)
        for version in entry.versions:
            key = (entry.name, version.version)
            current = self.registry.by_name.get(entry.name, {}).get(version.version)
            if current is None:
                self.registry.add(self._new_model(entry, version, repository, members))
                changes["added"].append(f"{entry.name}:{version.version}")
            elif self._changed(current, entry, version, members):
                old_pending = self.pending.pop(key, None)
                if old_pending is not None:
                    self._retire(old_pending)
                if current.state in (ModelState.FAILED, ModelState.UNAVAILABLE, ModelState.LOADING):
                    self.registry.by_name[entry.name][version.version] = self._new_model(entry, version, repository, members, current)
                    self._retire(current)
                else:
                    replacement = self._new_model(entry, version, repository, members, current)
                    if replacement.state is ModelState.FAILED:  # over pool.max_workers or pool.max_model_bytes: the old one keeps serving
                        current.reason = f"reload failed, still serving the previous file: {replacement.reason}"
                        changes["failed"].append(f"{entry.name}:{version.version}")
                        continue
                    self.pending[key] = replacement
                changes["replaced"].append(f"{entry.name}:{version.version}")
            else:
                changes["unchanged"].append(f"{entry.name}:{version.version}")
                if self._resize(current, entry.config.workers or self.settings.pool.workers):
                    changes.setdefault("resized", []).append(f"{current.key}: {current.worker_count} workers")

    def _remove_unseen(self, entries: list[ModelEntry], changes: dict[str, list[str]]) -> None:
        """Retire every served version the scan no longer has (a broken directory keeps what it served). A
        version still on disk of a model the scan still has, none of whose listed versions serves yet,
        serves on until one does (on_model_ready retires it then)."""
        kept = {(entry.name, version.version) for entry in entries if entry.error is None for version in entry.versions}
        broken = {entry.name for entry in entries if entry.error is not None}
        listed = {entry.name for entry in entries if entry.error is None and entry.versions}
        for name, served in list(self.registry.by_name.items()):
            successor_ready = any((name, n) in kept and m.state is ModelState.READY for n, m in served.items())
            for number, model in list(served.items()):
                if name not in broken and (name, number) not in kept:
                    # Only a version the repository still holds (version_policy moved past it): one whose
                    # files were removed goes now (a chain must not run a removed version: test_chains).
                    if name in listed and not successor_ready and model.state is ModelState.READY and on_disk(model.path):
                        if number not in self.outgoing.get(name, {}):
                            self.outgoing.setdefault(name, {})[number] = model
                            changes["removed"].append(model.key)
                            log.info("version leaving: it serves until the newer one is ready", extra={"model": model.key})
                        continue
                    del served[number]
                    self.outgoing.get(name, {}).pop(number, None)
                    self._retire(model)
                    changes["removed"].append(model.key)
            if not served:
                del self.registry.by_name[name]

    def _drop_chains_that_lost_a_model(self, changes: dict[str, list[str]]) -> None:
        """A chain stops serving when one of its models leaves the repository, or no longer lists it in
        `chains`: an operator who removes a model (a licence, a compromise) must not find it still answering
        inside a chain (found by an attacker: the chain kept serving the removed model's weights, then
        crash-looped on respawn), nor a model its chain's consent withdrawn."""
        for name, served in list(self.registry.by_name.items()):
            for number, model in list(served.items()):
                # Only a chain that started (it has members): one still waiting fails in start_chains. A
                # member version that left the registry with its files still there was superseded (a
                # newer version serves), not removed: the chain runs it until its own replacement serves,
                # as a model serves its old version until the new one is ready (round 34's suspicion: the
                # next reload dropped such a chain "removed").
                gone = [member.key for member in model.chain_members if member.version not in self.registry.by_name.get(member.name, {}) and not on_disk(member.path)]
                refused = [member.name for member in model.chain_members if name not in self.consents.get(member.name, frozenset())]
                if not gone and not refused:
                    continue
                reason = f"its model {gone[0]} was removed from the repository" if gone else self._not_consented(name, refused[0])
                del served[number]
                self._retire(model)
                pending = self.pending.pop((name, number), None)
                if pending is not None:
                    self._retire(pending)
                self.registry.failed[name] = FailedModel(name, reason)
                changes["removed"].append(model.key)
                log.error("chain stopped: one of its models was removed or no longer lets it run it", extra={"model": model.key, "reason": reason})
            if not served:
                del self.registry.by_name[name]

    def start_chains(self) -> None:
        """A chain starts once each of its members serves - its newest version, ready, with no replacement
        loading - so that its workers load the members' shared weights; it fails, with the reason, when a
        member cannot serve (a reload retries it)."""
        for model in [*self.registry.all(), *self.pending.values()]:
            chain = model.config.chain
            if chain is None or model.retiring or model.state is not ModelState.LOADING or model.workers:
                continue
            members: list[ServedModel] = []
            problem: str | None = None
            for name in chain.models:
                served = self.registry.by_name.get(name)
                if not served:
                    failed = self.registry.failed.get(name)
                    problem = f"its model {name!r} cannot serve: {failed.reason}" if failed is not None else f"its model {name!r} is not in the repository"
                    break
                member = served[max(served)]
                if member.config.chain is not None:
                    problem = f"its model {name!r} is itself a chain; a chain's models are model files"
                    break
                if model.name not in self.consents.get(name, frozenset()):
                    problem = self._not_consented(model.name, name)
                    break
                if member.state in (ModelState.FAILED, ModelState.UNAVAILABLE):
                    problem = f"its model {member.key} cannot serve: {member.reason}"
                    break
                if member.state is not ModelState.READY or (member.name, member.version) in self.pending:
                    members = []
                    break  # still loading: started when it is ready (on_model_ready)
                members.append(member)
            if problem is not None:
                model.fail_to_load(problem)
                self.pool.on_model_failed(model)
            elif len(members) == len(chain.models):
                model.chain_members = members
                model.reason = None
                self.start_workers(model)

    def _not_consented(self, chain: str, member: str) -> str:
        """Why `chain` may not run `member`, and the fix: a chain's worker reads its models' files and
        weights and runs them as its own steps decide, so each model names the chains that may (round 35:
        any entry declaring `[chain] models = ["victim"]` read the victim's weights)."""
        if member not in self.consents:
            return f"its model {member!r} cannot be read from the repository (its own status says why): a chain runs it only while its config.toml lists the chain in `chains`"
        return f"its model {member!r} does not let it run it: add {chain!r} to `chains` in {member}/config.toml (each model names the chains that may read and run it)"

    def _resize(self, model: ServedModel, wanted: int) -> bool:
        """`pool.workers` is live: a served model gets more workers at once, or its idle extras quit."""
        if wanted == model.worker_count or model.retiring or model.state is not ModelState.READY:
            return False
        over = self._over_worker_cap(model, wanted) if wanted > model.worker_count else None  # (fewer always fit)
        if over is not None:
            log.error("workers not added", extra={"model": model.key, "reason": over})
            model.reason = f"runs {model.worker_count} workers, not {wanted}: {over}"
            return False
        model.worker_count = wanted
        self.start_workers(model)
        extra = len(model.workers) - wanted
        for worker in [w for w in model.workers if w.state is WorkerState.READY][: max(0, extra)]:
            self.quit_worker(worker)
        return True

    @staticmethod
    def _changed(current: ServedModel, entry: ModelEntry, version: ModelVersionEntry, members: tuple[Any, ...] = ()) -> bool:
        if current.state in (ModelState.FAILED, ModelState.UNAVAILABLE):
            return True  # a reload retries what could not serve
        return model_fingerprint(version.path, entry.config, members) != current.fingerprint or entry.config != current.config

    def on_model_ready(self, model: ServedModel) -> None:
        """A worker became ready: switch to a replacement once all its workers are ready; once a listed
        version serves, the versions that were leaving go."""
        key = (model.name, model.version)
        if self.pending.get(key) is model and model.ready_workers() >= model.worker_count:
            del self.pending[key]
            old = self.registry.by_name.get(model.name, {}).get(model.version)
            self.registry.add(model)
            log.info("switched to reloaded model", extra={"model": model.key})
            if old is not None:
                self._retire(old)
        leaving = self.outgoing.get(model.name)
        if leaving and model.state is ModelState.READY and model.version not in leaving and self.registry.by_name.get(model.name, {}).get(model.version) is model:
            served = self.registry.by_name[model.name]
            for number, old in self.outgoing.pop(model.name).items():
                if served.get(number) is old:
                    del served[number]
                    self._retire(old)
                    log.info("version left: the newer one serves", extra={"model": old.key, "successor": model.key})
        self.start_chains()  # a chain may have waited for this model

    def on_model_failed(self, model: ServedModel) -> None:
        key = (model.name, model.version)
        if self.pending.get(key) is model:
            del self.pending[key]
            served = self.registry.by_name.get(model.name, {}).get(model.version)
            if served is not None:
                served.reason = f"reload failed, still serving the previous file: {model.reason}"
            log.error("reload failed; previous model keeps serving", extra={"model": model.key, "reason": model.reason})
            self._retire(model)
        self.start_chains()  # a chain waiting for this model fails with it

    def _retire(self, model: ServedModel) -> None:
        model.retiring = True
        if model not in self.retiring:
            self.retiring.append(model)
        self.progress()

    def progress(self) -> None:
        """Quit idle workers of retiring models whose queues are empty; forget them once all exited."""
        for model in list(self.retiring):
            if not model.queue:
                for worker in list(model.workers):
                    if worker.state in (WorkerState.READY, WorkerState.SPAWNED, WorkerState.LOADED):
                        self.quit_worker(worker)
            if not model.workers:
                if model.queue:  # its last worker died (crashed, killed past max_compute_ms) with tasks queued behind it
                    self.move_queue(model)
                self.retiring.remove(model)
                log.info("retired model released", extra={"model": model.key})
                if model.prepared_dir is not None and self.pool.preparer is not None:
                    self.pool.preparer.retire_unused()  # its weights' entry, unless another version maps it

    def all_models(self) -> list[ServedModel]:
        return [*self.registry.all(), *self.pending.values(), *self.retiring]
