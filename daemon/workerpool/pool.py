"""Spawning, watching and replacing workers. The supervisor loop feeds it events; it never blocks.

Each worker gets its channel at spawn (a socketpair: daemon/workerpool/spawner.py), so the supervisor knows which
process is on which channel and no other process can join it. What arrives on a channel goes to
`on_message(worker, frames)`; a channel that breaks the framing or its limits retires the worker."""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import sysconfig
import time
import weakref
from dataclasses import replace
from collections.abc import Sequence, Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from openinfer.wire.zmtp import Buffer, FrameStream, Limits, Oversized, PeerClosed, ProtocolError

from openinfer.daemon.modelstore.models import ModelState, ServedModel
from openinfer.daemon.loop.reactor import READABLE, WRITABLE, Reactor
from openinfer.daemon.files.runtime_dir import WORK_DIR
from openinfer.daemon.config.settings import SandboxSettings, Settings
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.worker_user import resolve_worker_user, shared_ids_warning
from .crash_blame import WINDOW_NS, CrashStrikes, blamed, ended_itself
from .recycling import RECYCLE_SPACING_NS, address_space, enforced_memory_limit, memory_limit_bytes, overgrown
from .spawner import spawn_worker
from openinfer.daemon.loop.timers import TimerHeap
from openinfer.daemon.worker import messages
from openinfer.daemon.worker.bootconfig import WorkerBootConfig, WorkerSandboxConfig
from openinfer.daemon.worker.boot import PREPARED_MISMATCH
from .worker_inbound import Hello
from .worker_output import OutputBudget, StderrRelay
from .workers import WorkerHandle, WorkerState

if TYPE_CHECKING:
    from openinfer.daemon.direct.endpoints import DirectPath
    from .preparation import WeightPreparer

log = logging.getLogger("openinfer.supervisor")
QUIET_NS = 60_000_000_000  # a model none of whose workers crashed or overran this long starts the respawn delay again


# What the system's dynamic linker and the CPU probes of onnxruntime/OpenBLAS read.
_SYSTEM_READ_PATHS = ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/etc/ld.so.cache", "/sys/devices/system/cpu", "/dev/null", "/dev/urandom")
_PACKAGES = ("openinfer.daemon", "openinfer.sandbox", "openinfer.client", "openinfer.policies")


def worker_read_paths(private: Sequence[str | Path] = ()) -> tuple[str, ...]:
    """What a worker may read under Landlock besides its own model: the Python installation, openinfer's own
    packages and the system libraries they load.

    Landlock grants whole trees, so this never holds the supervisor's working directory (`python -m` puts it
    on sys.path: under systemd that is `/`) nor any directory that contains, or lies inside, one of `private`
    (the model repository, the cache, the runtime directory): one of those would hand every worker the other
    models' files and weights.
    """
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {p for p in sys.path if p and os.path.isdir(p)} - {os.getcwd()}
    for package in _PACKAGES:
        spec = importlib.util.find_spec(package)
        paths |= set(spec.submodule_search_locations or ()) if spec else set()
    paths |= set(_SYSTEM_READ_PATHS)
    private_real = [os.path.realpath(p) for p in private if str(p)]
    kept = []
    for path in sorted(p for p in paths if os.path.exists(p)):
        real = os.path.realpath(path)
        if any(_nested(real, other) or _nested(other, real) for other in private_real):
            log.warning("not in the workers' Landlock view: it holds, or lies in, a private directory", extra={"path": path})
            continue
        kept.append(path)
    return tuple(kept)


def _nested(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def channel_limits(settings: Settings) -> Limits:
    """What one message from a worker may carry: a meta frame and the outputs of at most one batch.
    Over it, the worker is retired (no legitimate worker sends more)."""
    return Limits(frames=1 << 16, first_frame=1 << 20, message_bytes=settings.server.max_worker_message_bytes)


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        timers: TimerHeap,
        on_worker_lost: Callable[[WorkerHandle, str], None],
        on_model_failed: Callable[[ServedModel], None],
        on_message: Callable[[WorkerHandle, list[Buffer]], None],
        reject_worker: Callable[[WorkerHandle, str], None],
    ) -> None:
        self.on_model_failed = on_model_failed
        self.settings = settings
        self.reactor = reactor
        self.timers = timers
        self.on_worker_lost = on_worker_lost
        self.on_message = on_message
        self.reject_worker = reject_worker
        self.workers: dict[int, WorkerHandle] = {}  # by worker id
        self.by_pidfd: dict[int, WorkerHandle] = {}
        # What each model version's processes may add to the log, kept across its workers' replacements.
        self.output_budgets: weakref.WeakKeyDictionary[ServedModel, OutputBudget] = weakref.WeakKeyDictionary()
        self.preparer: "WeightPreparer | None" = None  # set by the supervisor once the store exists
        self.direct: "DirectPath | None" = None  # set by the supervisor once its listener is bound
        # Drains and replaces an idle worker holding most of its address space (recycling.py), given why.
        self.recycle: Callable[[WorkerHandle, str], None] | None = None
        self._recycled_ns: dict[Any, int] = {}  # model key -> when one of its workers was last recycled
        self._next_id = 1
        self.shutting_down = False
        self.respawns_due = 0  # replacements waiting out their delay (a drain with queued tasks waits for them)
        self.strikes = CrashStrikes()  # clients whose requests crashed a model's workers (crash_blame.py)
        self.on_barred: Callable[[ServedModel, str], None] | None = None  # answers what such a client has queued
        self.halting = False  # a hard stop (supervisor._stop_now): nothing more runs or is spawned, what is left is answered UNAVAILABLE
        # Why other processes can signal the workers (their uid is shared), or None: crash strikes are off then
        # (crash_blame.py: an abort sent with kill(2) looks like one of the worker's own).
        self.workers_shared: str | None = None
        self._uid_gid = self._resolve_worker_user()
        self.runtime_dir: Path | None = None  # this instance's private directory (set once it exists)

    def _resolve_worker_user(self) -> tuple[int | None, int | None]:
        refuse_shared_uid_without_landlock(self.settings.sandbox)
        if os.geteuid() != 0 or not self.settings.sandbox.enabled:
            return None, None
        value = self.settings.sandbox.worker_user
        uid, gid = resolve_worker_user(value)
        warning = shared_ids_warning(value, uid, gid)
        if warning is not None:
            self.workers_shared = warning
            log.warning("workers share their uid", extra={"uid": uid, "gid": gid, "reason": warning, "crash_strikes": "off: a process of that uid could send a worker SIGABRT and have the client whose request it ran refused"})
        return uid, gid

    @property
    def worker_gid(self) -> int | None:
        return self._uid_gid[1]

    @property
    def worker_uid(self) -> int | None:
        return self._uid_gid[0]

    def boot_config(self, model: ServedModel, worker_id: int) -> WorkerBootConfig:
        sb = self.settings.sandbox
        memory_limit = memory_limit_bytes(self.settings, model)
        uid, gid = self._uid_gid
        repository = model.repository or model.path.parent
        private: list[str | Path] = [repository]
        if self.runtime_dir is not None:
            private.append(self.runtime_dir.parent)  # every instance's channel and prepared weights
        if self.preparer is not None:
            private.append(self.preparer.store.base)
        return WorkerBootConfig(
            worker_id=worker_id,
            model=model.name,
            version=model.version,
            model_path=str(model.path),
            intra_op_threads=model.intra_op_threads,
            supervisor_pid=os.getpid(),
            log_level=self.settings.log.level,
            sandbox=WorkerSandboxConfig(
                enabled=sb.enabled,
                boot_policy=sb.boot_policy,
                serve_policy=sb.serve_policy,
                uid=uid,
                gid=gid,
                memory_limit_bytes=memory_limit,
                max_open_files=sb.max_open_files,
                landlock=sb.landlock,
                namespaces=sb.namespaces,
                read_paths=worker_read_paths(private),
            ),
            prepared_dir=str(model.prepared_dir) if model.prepared_dir else None,
            repository=str(repository),
            max_model_bytes=self.settings.pool.max_model_bytes,
            work_dir=str(self.runtime_dir / WORK_DIR) if self.runtime_dir is not None else "",
            steps=model.config.steps.to_dict() if model.config.steps is not None else None,
            cache=self._cache_config(model, memory_limit),
            chain=tuple({"name": m.name, "version": m.version, "model_path": str(m.path), "prepared_dir": str(m.prepared_dir) if m.prepared_dir else None} for m in model.chain_members),
        )

    @staticmethod
    def _cache_config(model: ServedModel, memory_limit: int | None) -> dict[str, Any] | None:
        """The model's [cache] for a worker: at most a quarter of the worker's memory limit, so that no
        client can fill a worker's memory with answers (found by an attacker, issue #19)."""
        cache = model.config.cache
        if cache is None:
            return None
        config = cache.to_dict()
        if memory_limit and cache.max_bytes > memory_limit // 4:
            config["max_bytes"] = memory_limit // 4
            log.warning("cache.max_bytes is over a quarter of the worker's memory limit: capped", extra={"model": model.key, "max_bytes": cache.max_bytes, "capped_to": config["max_bytes"], "memory_limit_mb": memory_limit >> 20})
        return config

    def spawn(self, model: ServedModel) -> WorkerHandle:
        worker_id = self._next_id
        self._next_id += 1
        config = self.boot_config(model, worker_id)
        endpoint = self.direct.prepare(worker_id, model) if self.direct is not None else None
        if endpoint is None:
            spawned = spawn_worker(config)
        else:
            direct_config, listener, page, _ = endpoint
            try:
                spawned = spawn_worker(replace(config, direct=direct_config), direct_fds=(listener.fileno(), page.fd))
            except BaseException:
                page.close()
                raise
            finally:
                listener.close()  # the worker holds it now
        assert spawned.channel is not None
        channel = FrameStream(spawned.channel, channel_limits(self.settings))
        worker = WorkerHandle(worker_id=worker_id, model=model, spawned=spawned, channel=channel)
        if endpoint is not None:
            assert self.direct is not None
            self.direct.opened(worker, endpoint[0], endpoint[2], endpoint[3], config.sandbox)
        model.workers.append(worker)
        self.workers[worker_id] = worker
        self.by_pidfd[spawned.pidfd] = worker
        self.reactor.add(spawned.pidfd, lambda mask: self.reap(spawned.pidfd, self.shutting_down))
        relay = StderrRelay(spawned.stderr_fd, {"worker": worker_id, "pid": spawned.pid, "model": model.key}, self.output_budget(model), self.timers.call_at)
        worker.stderr = relay
        self.reactor.add(spawned.stderr_fd, lambda mask: self._pump_stderr(relay))
        self.reactor.add(channel.sock.fileno(), lambda mask: self._on_channel(worker, mask))
        deadline = time.monotonic_ns() + int(self.settings.pool.ready_timeout_s * 1e9)
        self.timers.call_at(deadline, lambda: self._check_ready(worker))
        log.info("worker spawned", extra={"worker": worker_id, "pid": worker.pid, "model": model.name, "version": model.version})
        return worker

    def output_budget(self, model: ServedModel) -> OutputBudget:
        return self.output_budgets.setdefault(model, OutputBudget())  # (at a spawn: the spare one is nothing)

    def _pump_stderr(self, relay: StderrRelay) -> None:
        if not relay.pump():
            self.reactor.remove(relay.fd)  # the pipe is closed; the fd itself is closed at reap

    # -- the channel -----------------------------------------------------------------------------------
    def send(self, worker: WorkerHandle, frames: list[Buffer]) -> bool:
        """Queue a message for a worker; False if its channel is gone (it is exiting: reap follows)."""
        channel = worker.channel
        if channel.closed:
            return False
        try:
            channel.send(frames)
        except PeerClosed:
            self._close_channel(worker)
            return False
        if channel.out_bytes:
            self.reactor.modify(channel.sock.fileno(), READABLE | WRITABLE)
        return True

    def _on_channel(self, worker: WorkerHandle, mask: int) -> None:
        channel = worker.channel
        if channel.closed:
            return
        try:
            if mask & WRITABLE and channel.flush():
                self.reactor.modify(channel.sock.fileno(), READABLE)
            if mask & READABLE:
                self._take_messages(worker)
        except PeerClosed:
            self._close_channel(worker)  # it exited or closed its end: its pidfd reports the exit
        except ProtocolError as exc:
            self.reject_worker(worker, str(exc))

    def _take_messages(self, worker: WorkerHandle, last_words: bool = False) -> None:
        """Handle what the worker's channel holds (8 MiB at most a call). A worker being killed is not heard
        any more - except its last words, read after its death (_last_words)."""
        channel = worker.channel
        for frames in channel.read(max_bytes=8 * 1024 * 1024):
            if isinstance(frames, Oversized):
                raise ProtocolError(f"message over its limit: {frames.reason}")
            if worker.retired and not last_words:
                continue  # being killed: what it says no longer counts
            try:
                self.on_message(worker, frames)
            except (PeerClosed, ProtocolError):
                raise
            except Exception as exc:
                # What it sent is checked where it arrives (worker_inbound.py); a check that raises
                # something else (round 64: a datatype that is a list, TypeError) must not leave the
                # worker serving, half-handled - BUSY until max_compute_ms, its client timed out.
                log.exception("a worker's message could not be handled; retiring it", extra={"worker": worker.worker_id, "pid": worker.pid})
                self.reject_worker(worker, f"its message could not be handled ({type(exc).__name__})")
            if channel.closed:
                return

    def _last_words(self, worker: WorkerHandle) -> None:
        """What a serving worker wrote before it died - a result its pidfd's event came before - is read
        before its channel closes: it was answered, not lost with the worker, and the task after it is the
        one that was running (round 80's suspicion: read in the other order, the answered task passed for
        the running one, and its client took the strike for the crash of the task behind it). Retired
        first: nothing more is sent to it (dispatch.next_for)."""
        channel = worker.channel
        if channel.closed or worker.retired or worker.ready_ns is None:
            return
        worker.retired = True
        try:
            self._take_messages(worker, last_words=True)
        except (PeerClosed, ProtocolError):
            pass

    def _close_channel(self, worker: WorkerHandle) -> None:
        if not worker.channel.closed:
            self.reactor.remove(worker.channel.sock.fileno())
            worker.channel.close()

    def _check_ready(self, worker: WorkerHandle) -> None:
        if worker.state in (WorkerState.SPAWNED, WorkerState.LOADED):
            log.error("worker not ready in time; killing it", extra={"worker": worker.worker_id, "pid": worker.pid})
            worker.exit_reason = f"not ready within {self.settings.pool.ready_timeout_s:g} s"
            self.kill(worker)

    def kill(self, worker: WorkerHandle) -> None:
        worker.spawned.kill()  # (by pidfd: never a process that took the pid of one reaped)

    def on_hello(self, worker: WorkerHandle, hello: Hello) -> None:
        model = worker.model
        if model.state is not ModelState.READY or not model.inputs:
            model.set_metadata(hello.inputs, hello.outputs)
            model.load_ms = hello.load_ms
        elif (hello.inputs, hello.outputs) != (model.inputs, model.outputs):
            self.reject_worker(worker, "its model's inputs and outputs differ from the other workers' of the same model version")
            return
        if hello.warmup_error:
            log.warning("warm-up failed; first request pays the first-run cost", extra={"model": model.name, "reason": hello.warmup_error})
        worker.transition(WorkerState.LOADED)
        if self.direct is None or not worker.direct_address:
            self.send(worker, [messages.ACK])
            return
        self.send(worker, [messages.ACK, self.direct.key_for(model)])
        if model.batch_apart.now(time.monotonic_ns()) is not None:  # (read with the ACK: handled before any request)
            self.send(worker, [messages.APART, model.batch_apart.encode()])

    def on_ready(self, worker: WorkerHandle, sandbox: dict) -> None:  # type: ignore[type-arg]
        worker.sandbox = sandbox
        worker.ready_ns = time.monotonic_ns()
        worker.ready_address_space = address_space(worker.pid)
        worker.transition(WorkerState.READY)
        model = worker.model
        if model.state is ModelState.LOADING:
            model.state = ModelState.READY
            log.info("model ready", extra={"model": model.name, "version": model.version, "load_ms": model.load_ms})
        log.info(
            "worker ready",
            extra={"worker": worker.worker_id, "pid": worker.pid, "model": model.name, "startup_ms": round((worker.ready_ns - worker.spawned_ns) / 1e6, 1), "sandbox": sandbox},
        )

    def reap(self, pidfd: int, shutting_down: bool) -> WorkerHandle | None:
        """The pidfd became readable: collect the exit status, forget the worker, maybe respawn."""
        worker = self.by_pidfd.get(pidfd)
        # An event from the same poll() batch can name an fd that was closed and reused by a worker
        # spawned meanwhile: only a process that really exited is reaped (poll() never blocks).
        if worker is None or worker.spawned.process.poll() is None:
            return None
        del self.by_pidfd[pidfd]
        self.reactor.remove(pidfd)
        self.reactor.remove(worker.spawned.stderr_fd)
        if worker.stderr is not None:
            worker.stderr.pump(final=True)
        self._last_words(worker)
        self._close_channel(worker)
        status = worker.spawned.process.returncode
        # Whose requests it was running when it died: a direct run's, from its deadline page (its word), else
        # the front door's running unit - not every client with a request waiting behind the run (round 80).
        direct_run = worker.page.run_owners() if self.direct is not None and worker.page is not None else None
        running = direct_run if direct_run is not None else {task.identity for task in worker.inflight.running_unit()}
        several = ended_itself(status) and (len(running) > 1 or direct_run == frozenset())  # (an empty page: several, not named)
        if several:
            self._batch_apart(worker, running)
        if self.direct is not None:
            self.direct.forget(worker)
        # Its status pipe speaks for its boot only: a worker that was serving (and may be compromised) could
        # otherwise claim a prepared-weights mismatch and have its model's shared weights thrown away.
        boot_error = worker.spawned.read_status() if worker.ready_ns is None else None
        worker.spawned.close()
        self.workers.pop(worker.worker_id, None)
        model = worker.model
        if worker in model.workers:
            model.workers.remove(worker)
        if worker in model.idle:
            model.idle.remove(worker)
        was = worker.state
        worker.transition(WorkerState.EXITED)
        how = describe_exit(status)
        reason = worker.exit_reason or boot_error or how
        level = logging.INFO if was is WorkerState.DRAINING else logging.ERROR
        log.log(level, "worker exited", extra={"worker": worker.worker_id, "pid": worker.pid, "model": model.name, "version": model.version, "exit": how, "reason": reason, "state": was.value})
        if status == -signal.SIGSYS:
            log.error("worker killed by seccomp (SIGSYS): it made a system call its policy forbids", extra={"worker": worker.worker_id, "policy": self.settings.sandbox.serve_policy if worker.ready_ns is not None else self.settings.sandbox.boot_policy})
        if worker.inflight:
            self.on_worker_lost(worker, f"worker {worker.worker_id} (pid {worker.pid}) {how} while running this task")
        if (was is WorkerState.DRAINING and not worker.expected_exit) or (shutting_down and self._none_while_stopping(model)) or model.retiring:
            return worker
        if boot_error is not None and PREPARED_MISMATCH in boot_error and self.preparer is not None:
            log.error("prepared weights failed verification; preparing again", extra={"model": model.key, "reason": boot_error})
            if model.prepared_dir is not None:
                self.preparer.on_mismatch(model)
                return worker
            # A chain's worker checks its members' entries: the one named goes aside and the chain loads
            # that member unshared (round 34: nothing was prepared again and no worker came back - the chain
            # "ready" with none, every request expiring in its queue).
            for member in model.chain_members:
                if member.prepared_dir is not None and str(member.prepared_dir) in boot_error:
                    self.preparer.store.discard(member.prepared_dir.name)
                    member.prepared_dir = None
                    member.sharing = "off: its prepared weights failed verification in a chain's worker"
            self._schedule_respawn(model, boot_error)
            return worker
        if was in (WorkerState.SPAWNED, WorkerState.LOADED) and boot_error is not None and model.state is not ModelState.READY:
            model.fail_to_load(boot_error)
            self.on_model_failed(model)
            return worker
        if worker.overran:  # killed for a run past max_compute_ms: not a crash, but replaced as one is
            model.restarts += 1
            self._respawn_later(model)
            return worker
        if worker.expected_exit:  # (recycled: _respawn spawns none a reload no longer wants)
            self._respawn(model)
            model.restarts += 1
            return worker
        self._schedule_respawn(model, reason, blamed(status, running), kept_apart=several and len(running) > 1)
        return worker

    def _schedule_respawn(self, model: ServedModel, reason: str, culprit: str | None = None, kept_apart: bool = False) -> None:
        """`culprit`: the one client whose requests the worker ended itself running (crash_blame.py): its
        strike, not a step toward the model's crash loop. `kept_apart`: it ran several clients' requests,
        named, and those clients are now batched apart: their next crash is a strike, and this one is no
        step toward the crash loop either - a poison sent to every worker of a model at once, each batched
        with another uid's requests, was that many crash-loop steps at once (round 83, low: five workers,
        five crashes no one's), the model UNAVAILABLE for everyone where it had as many workers as
        pool.crash_loop_limit. A run the page does not name counts (a model that crashes itself can write
        that)."""
        pool = self.settings.pool
        model.restarts += 1
        if (culprit is not None or kept_apart) and self._strikes_on():
            if culprit is not None:
                self._strike(model, culprit, pool.crash_strikes)
            self._respawn_later(model)
            return
        model.consecutive_crashes += 1
        if model.consecutive_crashes >= pool.crash_loop_limit:
            if model.state is not ModelState.UNAVAILABLE:
                model.state = ModelState.UNAVAILABLE
                model.reason = f"crash loop: {model.consecutive_crashes} consecutive worker failures, last: {reason}"
                log.error("model unavailable", extra={"model": model.name, "version": model.version, "reason": model.reason})
                self.on_model_failed(model)  # its queued requests are answered UNAVAILABLE now
            return  # no more respawns until a reload re-arms the model
        self._respawn_later(model)

    def _strikes_on(self) -> bool:
        """Crash strikes count (pool.crash_strikes), and the workers' uid is theirs alone (crash_blame.py)."""
        return self.settings.pool.crash_strikes > 0 and self.workers_shared is None

    def _batch_apart(self, crashed: WorkerHandle, identities: AbstractSet[str]) -> None:
        """A run of several clients' requests ended its worker: no one's strike, so those clients' requests
        are batched only with their own for the strikes' window, by the front door and by every worker of
        the model, running or to come (direct/batch_apart.py). Nothing to gain while strikes are off."""
        if not self._strikes_on():
            return
        model = crashed.model
        now = time.monotonic_ns()
        model.batch_apart.keep_apart(identities, now + WINDOW_NS, now)
        log.warning(
            "a batch of several clients' requests crashed its worker: their requests are batched apart",
            extra={"model": model.key, "clients": sorted(identities)[:16] or "not named: everyone", "named": len(identities), "minutes": WINDOW_NS // 60_000_000_000},  # (the page may name 509: round 86)
        )
        if self.direct is None:
            return
        table = model.batch_apart.encode()
        for worker in model.workers:
            if worker is not crashed and worker.direct_address and worker.state in (WorkerState.LOADED, WorkerState.READY, WorkerState.BUSY):
                self.send(worker, [messages.APART, table])

    def _strike(self, model: ServedModel, client: str, limit: int) -> None:
        if not self.strikes.strike(model.name, client, time.monotonic_ns(), limit):  # (every version: round 87)
            log.warning("worker crash held against the client whose request it ran", extra={"model": model.key, "client": client})
            return
        log.error(
            "client refused a model: its requests crashed the model's workers",
            extra={"model": model.key, "client": client, "crashes": limit, "window_s": WINDOW_NS // 1_000_000_000},
        )
        if self.on_barred is not None:
            self.on_barred(model, client)
        if self.direct is not None:  # its leases of the model go too (the model's other clients renew theirs)
            self.direct.rotate_model_key(model, self.all_workers(), self.send)

    def _respawn_later(self, model: ServedModel) -> None:
        """Replace a worker of `model` that crashed or was killed for overrunning, after a delay that doubles
        per such exit until the supervisor sees a request answered, or a minute passes without one: what a
        worker's ledger claims does not reset it (ServedModel.served), nor can a model whose step fakes an
        overrun (a deadline page dated at boot, and max_compute_ms = 1 in its own config.toml: round 74)
        have its workers booted again at once, as fast as they come up. The minute is the model's, not a
        worker's age: one worker of many crashing at a minute old reset it for the young ones (round 75's
        suspicion)."""
        pool = self.settings.pool
        now = time.monotonic_ns()
        quiet = now - model.replaced_ns >= QUIET_NS
        model.respawn_crashes = 1 if quiet else model.respawn_crashes + 1
        delay_ms = min(pool.respawn_backoff_max_ms, pool.respawn_backoff_ms * 2 ** min(model.respawn_crashes - 1, 32))
        # The quiet minute counts from the replacement's start, not its scheduling: a delay longer than a
        # minute (respawn_backoff_max_ms can be) would otherwise pass for one (round 76).
        model.replaced_ns = now + delay_ms * 1_000_000
        log.info("worker replacement scheduled", extra={"model": model.key, "delay_ms": delay_ms, "crashes": model.consecutive_crashes})
        self.respawns_due += 1
        self.timers.call_at(now + delay_ms * 1_000_000, lambda: self._respawn_due(model))

    def _respawn_due(self, model: ServedModel) -> None:
        self.respawns_due -= 1
        self._respawn(model)

    def _respawn(self, model: ServedModel) -> None:
        # Not into a model its crash loop made UNAVAILABLE (a timer set before it did: round 76).
        if model.state in (ModelState.FAILED, ModelState.UNAVAILABLE) or model.retiring or len(model.workers) >= model.worker_count:
            return
        if self.shutting_down and self._none_while_stopping(model):
            return
        self.spawn(model)

    def _none_while_stopping(self, model: ServedModel) -> bool:
        """While the daemon stops, a worker is replaced only for tasks queued for its model: a drain finishes
        them (PROTOCOL.md 10.3; round 76: a crash just before or during a drain left them waiting out the
        whole grace), a hard stop has answered them and starts nothing (round 77)."""
        return self.halting or not model.queue

    def start_liveness_checks(self) -> None:
        self.timers.call_at(time.monotonic_ns() + int(self.settings.pool.ping_interval_s * 1e9), self._ping_idle_workers)

    def _ping_idle_workers(self) -> None:
        """Idle workers must answer a PING within the grace; busy ones are bounded by their task deadline
        instead, so a long inference can never be mistaken for a hang (and a hang never hides behind one)."""
        now = time.monotonic_ns()
        grace_ns = int(self.settings.pool.ping_grace_s * 1e9)
        for worker in list(self.workers.values()):
            if worker.state is not WorkerState.READY:
                continue
            if _running_direct(worker, now, grace_ns):
                # READY to the supervisor, but running a direct request: its loop answers after the run,
                # which its deadline page bounds (the supervisor kills it past that deadline instead).
                # Killing it here killed every direct request longer than the grace (found by an attacker).
                worker.ping_sent_ns = 0
                continue
            if worker.ping_sent_ns and now - worker.ping_sent_ns > grace_ns:
                # Its PONG may be waiting unread in the channel, behind a loop that was busy elsewhere
                # (round 50: a burst of costly requests held the loop; every healthy worker was killed): a
                # worker is judged on what it sent, read now, not on what the supervisor got round to.
                self._on_channel(worker, READABLE)
                if not worker.ping_sent_ns or worker.retired or worker.worker_id not in self.workers:
                    continue
                log.error("worker unresponsive; killing it", extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model.key})
                worker.exit_reason = f"unresponsive: no PONG within {self.settings.pool.ping_grace_s:g} s"
                self.kill(worker)
            elif not worker.ping_sent_ns and self.send(worker, [messages.PING, worker.ping_token]):
                worker.ping_sent_ns = now
                worker.pings_owed += 1
        self.start_liveness_checks()

    def recycle_if_overgrown(self, worker: WorkerHandle) -> None:
        """As its PONG arrives - its report of what it holds for requests in flight is then fresh (one read
        before the ping trusted the report of an interval ago, while new frames were announced) -: an idle
        worker holding most of its memory is recycled (recycling.py), at most one of a model's workers
        every RECYCLE_SPACING_NS."""
        now = time.monotonic_ns()
        if self.recycle is None or worker.retired or worker.state is not WorkerState.READY or now < self._recycled_ns.get(worker.model.key, 0) + RECYCLE_SPACING_NS:
            return
        if _running_direct(worker, now, int(self.settings.pool.ping_grace_s * 1e9)):
            return
        reason = overgrown(worker.pid, worker.ready_address_space, enforced_memory_limit(self.settings, worker.model), worker.cache_held[1] if worker.cache_held else 0, worker.request_bytes)
        if reason is not None:
            self._recycled_ns[worker.model.key] = now
            self.recycle(worker, reason)

    def all_workers(self) -> list[WorkerHandle]:
        return list(self.workers.values())


def _running_direct(worker: WorkerHandle, now_ns: int, grace_ns: int) -> bool:
    """The worker's deadline page says it is running a direct request, due no later than its model's
    max_compute_ms from now (a page claiming more is not believed: the ping rules apply)."""
    page = worker.page
    if page is None or worker.retired:
        return False
    _, deadline = page.read()
    return deadline != 0 and deadline <= now_ns + worker.model.config.max_compute_ms * 1_000_000 + grace_ns


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = str(-status)
        return f"was killed by {name}"
    return f"exited with code {status}"


def refuse_shared_uid_without_landlock(sandbox: SandboxSettings) -> None:
    """Not root, the daemon gives its workers its own uid: only Landlock then keeps a worker taken over by
    its model from the daemon's files - at the start, and at a reload (sandbox.landlock applies to new
    workers: a reload setting it false must not start them without it). Round 42, on a non-root daemon
    with Landlock off: a hostile steps module read the CURVE secret key and the metrics token, and the
    supervisor's memory - its master lease key, then a lease for a model the access policy denied (the
    supervisor is not dumpable since). Nothing to check as root, or with the sandbox off (explicitly)."""
    if os.geteuid() == 0 or not sandbox.enabled:
        return
    if sandbox.shared_uid_without_landlock:
        log.warning("workers run as the daemon's uid without Landlock: a worker taken over by its model can read every file the daemon can (sandbox.shared_uid_without_landlock = true)")
        return
    from openinfer.sandbox.landlock import landlock_abi

    why = "sandbox.landlock = false" if not sandbox.landlock else ("this kernel has no Landlock" if landlock_abi() == 0 else None)
    if why is not None:
        raise ConfigError(
            f"workers would run as the daemon's own uid (it is not root) without Landlock ({why}): a worker taken over by its model "
            "could read every file the daemon can - its CURVE secret key, its metrics token, the weights cache, every model. "
            "Turn Landlock on, run the daemon as root with sandbox.worker_user, or set sandbox.shared_uid_without_landlock = true knowingly"
        )
