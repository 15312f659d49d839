"""The supervisor: one event loop that owns the front door, the worker channels, the queues and the
accounting. It never imports onnxruntime and never runs a task itself.

Trust flows one way: what reaches this process from a client (frontdoor/), a worker (worker_inbound.py),
the prepare helper (preparation.py) or the repository is checked where it arrives."""
from __future__ import annotations

import gc
import logging
import shutil
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from openinfer.wire.errors import DeadlineExceeded, OpenInferError, Unavailable, WorkerCrashed
from openinfer.wire.protocol import resolve_address, unpack
from openinfer.wire.zmtp import Buffer

from openinfer.daemon.control import admin
from openinfer.daemon.frontdoor.access import AccessPolicy
from openinfer.daemon.observability.accounting import Accountant
from openinfer.daemon.frontdoor.client_limits import ClientLimiter, load_client_policy
from openinfer.daemon.direct.books import PASS_RECORDS, DirectBooks
from openinfer.daemon.direct.endpoints import OVERDUE_GRACE_NS, DirectPath
from openinfer.daemon.direct.ledger import Entry
from openinfer.daemon.scheduling.dispatch import Dispatcher
from openinfer.daemon.frontdoor.bind import bind_public
from openinfer.daemon.frontdoor.connections import Connection, ConnectionTable
from openinfer.daemon.frontdoor.validation import check_infer
from openinfer.daemon.observability.metrics import MetricsExporter
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.modelstore.models import ModelRegistry, ServedModel
from openinfer.daemon.workerpool.crash_blame import striker
from openinfer.daemon.workerpool.pool import WorkerPool, refuse_shared_uid_without_landlock
from openinfer.daemon.workerpool.recycling import enforced_memory_limit
from openinfer.daemon.workerpool.preparation import WeightPreparer
from openinfer.daemon.files.prepared import PreparedStore
from openinfer.daemon.loop.reactor import Reactor
from openinfer.daemon.control.reload import RepositorySync
from openinfer.daemon.frontdoor.replies import ReplySender
from openinfer.daemon.frontdoor.requests import FrontDoorRequests
from openinfer.daemon.scheduling.overdue_runs import OverdueRuns
from openinfer.daemon.scheduling.results import WorkerResults
from openinfer.daemon.files.runtime_dir import base_runtime_dir, create_instance_dir
from openinfer.daemon.control.sdnotify import SystemdNotifier
from openinfer.daemon.control.service_status import ServiceStatus
from openinfer.daemon.observability.jsonlog import configure_logging
from openinfer.daemon.config.settings import LIVE, NEW_WORKERS, RESTART, Settings, changed_settings, keep_running_values, reload_class
from openinfer.daemon.loop.signals import SignalInbox
from openinfer.daemon.loop.timers import MonotonicTimerFd, TimerHeap
from .worker import messages
from openinfer.daemon.workerpool.worker_inbound import BadWorkerMessage, parse_hello, parse_ready, parse_pong_report
from openinfer.daemon.workerpool.workers import WorkerHandle, WorkerState

log = logging.getLogger("openinfer.supervisor")

_GC_THRESHOLDS = (20_000, 20, 100)
_HOUSEKEEPING_NS = 5_000_000  # how often running tasks' deadlines are checked (and the workers' ledgers read)
LEDGER_READ_MS = 20  # while workers answer direct requests, their ledgers are read at least this often
LEDGER_IDLE_MS = 100  # and while they seem quiet (a full ring drops records: stats would miss them)
QUIT_GRACE_NS = 5_000_000_000  # a worker told to QUIT leaves by itself within this (its own drain: 4 s), unless it is running
HALT_GRACE_NS = 1_000_000_000  # a hard stop: a worker answers what it queued and leaves after its run, or is killed then
LEAVING_NS = 1_500_000_000  # and within this after its last run once its drain is over (its leaving flushes for at most 1 s)
# Once a drain's workers are gone, the replies still waiting to be written get this long to be read (round
# 60: the daemon exited 0.1-0.2 s after SIGTERM and a client that read its ten answered replies 0.5 s later
# got none). A worker's own leaving gives its direct clients the same (its drain reads for 4 s).
LINGER_NS = 5_000_000_000


def _wake_only() -> None:
    """A timer that only wakes the loop: what is due then runs after every pass (`_progress_drain`)."""


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        reload_settings: Callable[[], Settings] | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.reload_settings = reload_settings
        self.notifier = notifier or SystemdNotifier(None)
        self.service = ServiceStatus(self.notifier)
        self.started_ns = time.monotonic_ns()
        self.registry = ModelRegistry()
        self.accountant = Accountant()
        self.reactor = Reactor()
        self.timers = TimerHeap(MonotonicTimerFd())
        self.draining = False
        self.finished = False
        self._drain_deadline_ns: int | None = None
        self._linger_until_ns: int | None = None  # a drain's workers are gone: replies not yet written wait until then
        self._next_task_id = 1
        self._next_housekeeping_ns = 0
        self.limiter = ClientLimiter(load_client_policy(settings.server.client_policy))
        self.access = AccessPolicy.load(settings.server.access_policy)
        self.pool = WorkerPool(settings, self.reactor, self.timers, self._on_worker_lost, self._on_model_failed, self._on_worker_message, self._reject_worker)
        self.runtime_dir = create_instance_dir(base_runtime_dir(settings.server.runtime_dir), self.pool.worker_gid)
        self.pool.runtime_dir = self.runtime_dir
        self.listener = bind_public(settings, resolve_address(settings.server.socket))
        self.requests = FrontDoorRequests(self)
        self.connections = ConnectionTable(settings, self.reactor, self.timers, self.listener, self.access, self.requests.on_client_event, self._on_connection_closed)
        self.direct = DirectPath(settings, self.listener, DirectBooks(self.accountant, self._log_direct_access, lambda: self.replies.settings.log.access_log_sample > 0))
        self.pool.direct = self.direct
        self.pool.recycle = self._recycle
        self.pool.on_barred = self._fail_barred
        self.sync = RepositorySync(settings, self.registry, self.pool, self._quit, self._move_retired_queue)
        self.replies = ReplySender(settings, self.connections, self.accountant, self.limiter)
        self.dispatcher = Dispatcher(settings, self.pool.send, self.timers, self.limiter, self.replies.fail, self._retire_worker)
        self.results = WorkerResults(self.dispatcher, self.replies, self._reject_worker)
        self.overdue = OverdueRuns(self.dispatcher, self.replies, self.pool)
        try:
            store = PreparedStore(Path(settings.server.cache_dir) if settings.server.cache_dir else self.runtime_dir / "prepared", self.pool.worker_uid)
        except BaseException:  # (another daemon's cache): nothing will serve at the address, so no socket is left there
            self.listener.cleanup()
            raise
        self.pool.preparer = WeightPreparer(self.pool, store, self.sync.start_workers, self.sync.all_models)
        self.signals = SignalInbox()
        self.reactor.add(self.signals.fd, lambda mask: self._on_signals(self.signals.drain()))
        assert self.timers.wakeup is not None
        self.reactor.add(self.timers.wakeup.fd, lambda mask: self.timers.on_wakeup())  # due timers run after the pass
        try:
            self.exporter = MetricsExporter(settings.metrics, self.listener.clients_gid(settings.server.socket_mode))
        except BaseException:  # (a bad token file, a taken port): nothing will serve at the address, so no socket is left there
            self.listener.cleanup()
            raise
        if self.exporter.wakeup_fd is not None:  # a scrape asks for a fresh snapshot: due() then says yes
            self.reactor.add(self.exporter.wakeup_fd, lambda mask: self.exporter.on_wakeup())

    @property
    def address(self) -> str:
        return self.listener.address

    # -- model loading ----------------------------------------------------------------------------
    def load_repository(self) -> None:
        self.sync.sync()
        self.pool.start_liveness_checks()
        self._tell_systemd()
        log.info("serving", extra={"address": self.address, "models": sorted(self.registry.by_name), "failed": sorted(self.registry.failed)})

    def reload(self) -> dict[str, Any]:
        """SIGHUP / `reload`: re-read the config file (a bad one keeps the old settings), then the repository."""
        self.service.reloading()
        try:
            return self._reload()
        finally:
            self._tell_systemd()

    def _reload(self) -> dict[str, Any]:
        """Every setting is declared live, new-workers-only or restart-only (daemon/config/settings.py); this
        applies the live ones, says which apply to new workers only and which wait for a restart, and
        always reads the access and client policy files again (a client newly denied is refused at its
        next request). A bad config or policy file changes nothing."""
        result: dict[str, Any] = {}
        old = self.settings
        try:
            new = self.reload_settings() if self.reload_settings is not None else old
            access = AccessPolicy.load(new.server.access_policy)
            client_policy = load_client_policy(new.server.client_policy)
            changed = changed_settings(old, new)
            by_class = {cls: [key for key in changed if reload_class(key) == cls] for cls in (LIVE, NEW_WORKERS, RESTART)}
            new = keep_running_values(old, new, by_class[RESTART])
            # On what will be in force, restart-only values kept (round 45: the file's own `enabled = false` or
            # `shared_uid_without_landlock = true`, both reverted next, let `landlock = false` through).
            refuse_shared_uid_without_landlock(new.sandbox)
        except ConfigError as exc:
            log.error("reload: invalid configuration; keeping the old one", extra={"reason": str(exc)})
            return {"error": f"invalid configuration, nothing changed: {exc}"}
        self.settings = self.pool.settings = self.sync.settings = self.dispatcher.settings = self.replies.settings = new
        self.access = access
        self.limiter.policy = client_policy
        self.connections.reconfigure(new, access)
        if new.log.level != old.log.level:
            configure_logging(new.log.level)
        if new.server.starvation_ms != old.server.starvation_ms:
            for model in self.sync.all_models():
                model.queue.starvation_ms = new.server.starvation_ms
        result["settings"] = {"applied": by_class[LIVE], "new_workers_only": by_class[NEW_WORKERS], "needs_restart": by_class[RESTART]}
        result["policies"] = {"access": access.source, "clients": client_policy.source}
        if by_class[RESTART]:
            log.warning("reload: these settings need a restart to take effect; the running values stay in force", extra={"keys": by_class[RESTART]})
        log.info("reload: settings and policies", extra={**result["settings"], "access_policy": access.source, "client_policy": client_policy.source})
        self.direct.settings = new
        self.direct.rotate_key(self.pool.all_workers(), self.pool.send)  # every lease is revoked: clients renew under the new policy
        result.update(self.sync.sync())
        return result

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        reactor = self.reactor
        connections = self.connections
        watchdog = self.notifier.watchdog if self.notifier.watchdog_interval_ns else None
        idle_ms = min(1000, (self.notifier.watchdog_interval_ns or 4_000_000_000) // 4_000_000)
        if self.direct.enabled:
            # Direct traffic never wakes this loop: a worker's ledger ring must be read before it fills
            # (~1 s of one worker at its fastest), also when traffic starts after a quiet spell.
            idle_ms = min(idle_ms, LEDGER_IDLE_MS)
        # Every request allocates dicts and frames that die young; with the default gen0 threshold (700)
        # the cyclic collector ran thousands of times a second and re-scanned everything loaded at boot.
        # Freezing the boot objects and collecting less often: +18 % throughput at c=64 (bench/batching).
        gc.freeze()
        gc.set_threshold(*_GC_THRESHOLDS)
        while not self.finished:
            if watchdog is not None:
                watchdog()  # from the loop itself: a wedged loop stops the pings and systemd restarts us
            busy = self._any_busy()
            # Look before sleeping: while work keeps arriving the timerfd need not be set at all (setting it
            # costs ~18 us in this VM); due timers run between messages and after each pass.
            events = reactor.poll(0)
            if not events and not connections.turns:  # idle: the bookkeeping deferred from the busy path, then sleep
                self.dispatcher.arm_deadlines()  # before timeout_ms below reads the timers
                self.accountant.flush()
                books = self.direct.books
                events = reactor.poll(self.timers.timeout_ms(1 if books.behind else 5 if busy else LEDGER_READ_MS if books.active else idle_ms) / 1000)
            self._dispatch(events)
            if connections.turns:
                connections.turns.serve()  # the clients' messages read, in fair turns (frontdoor/fair_turns.py)
            now = time.monotonic_ns()
            self.dispatcher.arm_overdue_deadlines(now)
            self.timers.run_due()
            if self.exporter.due(now):
                self.read_ledgers()  # the workers' direct requests first: a scrape is exact
                self._publish_metrics_safely()
            if busy or self.direct.enabled:
                self._expire_running()
            self.connections.housekeeping(now)
            if self.sync.retiring:
                self.sync.progress()
            if self.draining:
                self._progress_drain()
        return 0

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        handlers = self.reactor
        for event in events:
            try:
                handlers.dispatch([event])
            except Exception:  # a bug in one handler must not take the daemon (and every client) down
                log.exception("internal error in the supervisor loop; continuing")

    def new_task_id(self) -> int:
        """Task numbers (the worker channel's, the access log's): one sequence for both paths."""
        task_id = self._next_task_id
        self._next_task_id += 1
        return task_id

    def read_ledgers(self, limit: int | None = None) -> None:
        if self.direct.enabled:
            self.direct.read_ledgers(list(self.pool.workers.values()), self._reject_worker, limit)

    def _log_direct_access(self, worker: WorkerHandle, entry: Entry) -> None:
        """A request a worker answered on the direct path, for the access log (sampled as the front
        door's tasks are, by the task number given here)."""
        task_id = self.new_task_id()
        if self.replies.access_sampled(task_id):
            model = worker.model
            self.replies.log_direct_access(task_id, worker.worker_id, model.name, model.version, entry.request_id, entry.client, entry.code or "OK", entry.timing)

    def _publish_metrics_safely(self) -> None:
        try:
            self._publish_metrics()
        except Exception:
            log.exception("metrics snapshot failed; continuing")

    def _publish_metrics(self) -> None:
        """When a scrape waits or the textfile is due, from the loop: the exporter's threads only ever
        read this snapshot."""
        workers = [{"model": w.model.name, "version": w.model.version, "state": w.state.value} for w in self.pool.all_workers()]
        depths = {(m.name, m.version): len(m.queue) for m in self.sync.all_models()}
        self.exporter.publish(admin.stats_result(self), workers, depths)

    def _any_busy(self) -> bool:
        for worker in self.pool.workers.values():
            if worker.inflight:
                return True
        return False

    # -- connections --------------------------------------------------------------------------------
    def _on_connection_closed(self, conn: Connection) -> None:
        """Its queued requests will never be read: they leave the queue now (replies to its running ones
        are dropped when they come). Only its own are looked at: every close once walked every queued
        request of every client (with 4000 queued, 350 -> 745 us of the supervisor per close)."""
        queued_for = self.dispatcher.queued_for
        for request_id in list(conn.open_ids):
            task = queued_for(conn.conn_id, request_id)
            if task is not None and not task.done:
                self.dispatcher.remove_queued(task)
                self.replies.fail(task, DeadlineExceeded("cancelled: the client's connection closed before the task ran"))

    # -- worker messages ----------------------------------------------------------------------------
    def _on_worker_message(self, worker: WorkerHandle, frames: list[Buffer]) -> None:
        kind = bytes(frames[0][:1])
        if kind == messages.RESULT:
            self.results.on_result(worker, frames)
        elif kind == messages.RESULTS:
            self.results.on_batch(worker, frames)
        elif kind == messages.HELLO and worker.state is WorkerState.SPAWNED:
            try:
                hello = parse_hello(frames)
            except BadWorkerMessage as exc:
                self._reject_worker(worker, f"HELLO: {exc}")
                return
            self.pool.on_hello(worker, hello)
        elif kind in (messages.HELLO, messages.READY) and worker.state is WorkerState.DRAINING and worker.ready_ns is None:
            return  # told to stop while it booted (a stop kills it): its HELLO or READY crossed that, no fault
        elif kind == messages.READY and worker.state is WorkerState.LOADED:
            try:
                sandbox = parse_ready(frames)
            except BadWorkerMessage as exc:
                self._reject_worker(worker, f"READY: {exc}")
                return
            self.pool.on_ready(worker, sandbox)
            if self.draining and not worker.model.queue:
                self._quit(worker)
                return
            self.dispatcher.next_for(worker)  # (in a drain: a replacement booted to finish its model's queue)
            if not self.draining:
                self.sync.on_model_ready(worker.model)
                self._tell_systemd()
        elif kind == messages.PONG and len(frames) == 3 and bytes(frames[1]) == worker.ping_token:
            if not worker.pings_owed:  # round 14: unasked PONGs, each parsed with a /proc read, held the loop
                self._reject_worker(worker, "PONG without a PING")
                return
            worker.pings_owed -= 1
            worker.ping_sent_ns = 0
            try:
                report = parse_pong_report(frames[2], worker.model.config.cache, enforced_memory_limit(self.settings, worker.model))
            except BadWorkerMessage as exc:
                self._reject_worker(worker, f"PONG: {exc}")
                return
            worker.cache_held, worker.request_bytes = report.cache_held, report.request_bytes
            self.pool.recycle_if_overgrown(worker)
        else:
            self._reject_worker(worker, f"unexpected message kind {kind.hex() or 'empty'} in state {worker.state.value}")

    def _retire_now(self, worker: WorkerHandle) -> None:
        worker.retired = True
        if worker in worker.model.idle:
            worker.model.idle.remove(worker)
        self.pool.kill(worker)

    def _reject_worker(self, worker: WorkerHandle, reason: str) -> None:
        """A worker sent something it was not asked for: it may be compromised. It is killed, exactly the
        tasks it held fail with WORKER_CRASHED, and a fresh worker takes its place (counted as a crash)."""
        if worker.retired:
            return
        worker.retired = True
        log.error("worker sent an invalid message; retiring it", extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model.key, "reason": reason})
        worker.exit_reason = f"retired: sent an invalid message ({reason})"
        if worker in worker.model.idle:
            worker.model.idle.remove(worker)
        for task in worker.inflight.take_all():
            if task.done:
                self.dispatcher.settle(task)
            else:
                self.replies.fail(task, WorkerCrashed(f"worker {worker.worker_id} (pid {worker.pid}) sent an invalid message and was retired while holding this task", {"worker": worker.worker_id, "pid": worker.pid}))
        self.pool.kill(worker)

    def _on_model_failed(self, model: ServedModel) -> None:
        """The model cannot serve (load failed, or its workers crash-looped): queued requests must not
        wait for their deadline, they get UNAVAILABLE with the reason at once."""
        self.sync.on_model_failed(model)
        reason = f"model {model.key} is {model.state.value}: {model.reason}"
        failed = self.dispatcher.fail_queue(model, lambda: Unavailable(reason))
        if failed:
            log.warning("queued requests failed: model cannot serve", extra={"model": model.key, "requests": failed, "reason": model.reason})
        # The last model still loading may be this one: systemd is told READY=1 (naming it as not serving)
        # now, not never (a model whose worker failed to load after the others were ready kept a
        # Type=notify service from starting: killed at TimeoutStartSec, restarted, again).
        self._tell_systemd()

    def _move_retired_queue(self, model: ServedModel) -> None:
        """A retiring version's last worker is gone with tasks still queued for it: each goes to the version
        of its model that serves now - looked up, and checked against it, as when it arrived - or is
        answered with why it cannot (that version's inputs differ, a pinned version or the model is
        gone). Round 22's attacker: released with the version, they waited out their deadlines, counted
        nowhere (every other worker of a one-worker model served on)."""
        moved = 0
        while model.queue:
            task = model.queue.popleft()
            self.dispatcher.dequeue(task)
            if task.done:
                continue
            try:
                header = unpack(task.header_frame)
                target = self.requests.serving(header["model"], header.get("version"))  # (lookup_for_infer refuses while draining)
                _, task.signature = check_infer(header, task.data_frames, target, target.config.max_request_bytes or self.settings.server.max_request_bytes, walk_bytes=False)
                outputs = header.get("outputs")
                task.model, task.wanted, task.batch_key, task.rows = target, tuple(outputs) if outputs else target.output_order, None, 0
                self.dispatcher.admit(task, header, release_on_error=False)
                moved += 1
            except OpenInferError as exc:
                self.replies.fail(task, exc)
        log.warning("a retired version's last worker exited with tasks queued: sent to the version serving now", extra={"model": model.key, "moved": moved})

    def _recycle(self, worker: WorkerHandle, reason: str) -> None:
        """An idle worker left holding most of its address space (recycling.py): drained and replaced."""
        log.warning("worker recycled", extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model.key, "reason": reason})
        worker.exit_reason, worker.expected_exit = reason, True
        self._quit(worker)

    def _fail_barred(self, model: ServedModel, identity: str) -> None:
        """A client was just refused the model for crashing its workers: what it has queued for it is
        answered so, not run to crash the next worker."""
        error = self.requests.barred(identity, model)
        if error is not None:
            versions = list(self.registry.by_name.get(model.name, {}).values())  # refused every version (round 87)
            struck = striker(identity)
            for version in versions if model in versions else [*versions, model]:
                # A plain tcp:// peer is refused by its host: its queued requests on its other connections too
                # (round 88: they ran, one crash each - 8 against 3 with six connections).
                for queued in [each for each in version.queue.identities() if striker(each) == struck]:
                    self.dispatcher.fail_queued_by(version, queued, lambda: error)
            if self.pool.direct is not None:  # and the workers theirs
                self.pool.direct.bar(model, identity, error, self.pool.all_workers(), self.pool.send)

    def _retire_worker(self, worker: WorkerHandle) -> None:
        self._quit(worker)
        self.sync.progress()

    def _on_worker_lost(self, worker: WorkerHandle, how: str) -> None:
        """Exactly the task the worker was running fails; pipelined ones behind it never started and go
        back to the front of the queue. A batch that crashed goes back whole, each member to run alone."""
        running = worker.inflight.take_running()
        if not running:
            return
        if len(running) == 1:
            if running[0].done:
                self.dispatcher.settle(running[0])
            elif self.pool.halting:  # killed by the hard stop, not lost
                self.replies.fail(running[0], Unavailable("daemon stopped while this task was running"))
            else:
                self.replies.fail(running[0], WorkerCrashed(how, {"worker": worker.worker_id, "pid": worker.pid}))
        else:
            worker.inflight.put_back(running)
        self.dispatcher.requeue_unstarted(worker)
        if self.pool.halting:
            self._fail_queued()  # (what it had not started came back to its model's queue)

    # -- deadlines --------------------------------------------------------------------------------
    def _expire_running(self) -> None:
        """Kill workers whose running task (or batch) is past its deadline or max_compute_ms."""
        now = time.monotonic_ns()
        if now < self._next_housekeeping_ns and not self.direct.books.behind:
            return
        self._next_housekeeping_ns = now + _HOUSEKEEPING_NS
        self.read_ledgers(PASS_RECORDS)  # bounded: `stats` and scrapes read the rest first
        for worker, ran_ns in self.direct.overdue(list(self.pool.workers.values()), now):
            log.error("a direct request ran past max_compute_ms; killing the worker", extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model.key, "ran_ms": ran_ns // 1_000_000, "max_compute_ms": worker.model.config.max_compute_ms})
            worker.exit_reason = f"killed: a request sent to it directly was still running after {ran_ns // 1_000_000} ms, past max_compute_ms = {worker.model.config.max_compute_ms}"
            worker.expected_exit = worker.overran = True
            self._retire_now(worker)
            # What the front door gave it waited behind that run and never started: it goes to another
            # worker - once (the page is the worker's word: a hostile step can fake it on every worker).
            self.dispatcher.requeue_unstarted(worker, WorkerCrashed(f"worker {worker.worker_id} (pid {worker.pid}) was killed while holding this task, the second worker to be (each for a direct request that overstayed its deadline)", {"worker": worker.worker_id, "pid": worker.pid}))
        for worker in list(self.pool.workers.values()):
            # The worker stops a run at its deadline itself and answers it (worker/channel_tasks.py). A run
            # it cannot stop (one kernel that never checks the flag, a step's own loop) has its overdue
            # tasks answered here, half a second later, and goes on; only the operator's bound,
            # max_compute_ms, gets the worker killed. Killing at a task's deadline let any client kill
            # workers at will: it only had to give a request a timeout shorter than its compute.
            inflight = worker.inflight
            if worker.retired or not inflight.overdue(now - OVERDUE_GRACE_NS):
                continue
            if now - OVERDUE_GRACE_NS < self.overdue.limit_ns(worker):
                self.overdue.answer(worker, now)
            else:
                self.overdue.kill(worker, now)
        if self.direct.enabled:  # (the retiring versions of a reload too: their queues wait for their workers)
            self.dispatcher.serve_parked(self.sync.all_models())

    # -- signals and shutdown ---------------------------------------------------------------------
    def _on_signals(self, signums: list[int]) -> None:
        for signum in signums:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.draining:
                    log.warning("second stop signal: stopping now")
                    self._stop_now()
                else:
                    self.begin_drain()
            elif signum == signal.SIGHUP and self.draining:
                # A reload would start workers for models no one may ask any more (round 78: a SIGHUP after a
                # hard stop booted a new model's worker, then quit it). The `reload` operation answers UNAVAILABLE.
                log.warning("reload ignored: the daemon is stopping")
            elif signum == signal.SIGHUP:
                self.reload()

    def _tell_systemd(self) -> None:
        if self.notifier.enabled:
            self.service.tell(self.sync.all_models(), len(self.pool.workers), self.address, bool(self.sync.pending), self.draining)

    def begin_drain(self) -> None:
        self.notifier.stopping("draining: finishing queued and running tasks")
        log.info("draining: finishing queued and running tasks", extra={"grace_s": self.settings.server.drain_grace_s})
        self.draining = True
        self.pool.shutting_down = True
        self._drain_deadline_ns = time.monotonic_ns() + int(self.settings.server.drain_grace_s * 1e9)
        self.timers.call_at(self._drain_deadline_ns, _wake_only)  # the loop may be idle then: a timer wakes it
        # Every lease stops working now, as on a reload: a direct client's next request is told its lease
        # expired and its renewal is refused UNAVAILABLE, as a new request is at the front door; what the
        # workers have read is still answered. (Round 57: the direct path served new requests until each
        # client's lease came up for renewal, ~2.7 s of a drain.)
        self.direct.rotate_key(self.pool.all_workers(), self.pool.send)

    def _progress_drain(self) -> None:
        now = time.monotonic_ns()
        if self._drain_deadline_ns is not None and now >= self._drain_deadline_ns:
            log.warning("drain grace period over: stopping now")
            self._stop_now()
        if self.pool.halting:
            # A task put back after the hard stop answered the queues (a worker killed for overrunning, a
            # retired version's queue moved: round 77 - it was booted a replacement, or never answered).
            self._fail_queued()
        pending = any(m.queue for m in self.sync.all_models()) or self._any_busy()
        if not pending:
            for worker in self.pool.all_workers():
                if worker.state is not WorkerState.DRAINING:
                    self._quit(worker)
        if not self.pool.workers and not (pending and self.pool.respawns_due and not self.pool.halting):
            if self._linger_until_ns is None:
                self._linger_until_ns = now + LINGER_NS
                self.timers.call_at(self._linger_until_ns, _wake_only)  # (an idle loop sleeps up to a second)
            unwritten = self.connections.unwritten()
            if unwritten and now < self._linger_until_ns:
                return
            if unwritten:
                log.warning("stopping with replies not yet read by their clients", extra={"connections": unwritten})
            self.finished = True

    def _quit(self, worker: WorkerHandle) -> None:
        if worker.state in (WorkerState.READY, WorkerState.BUSY, WorkerState.LOADED, WorkerState.SPAWNED):
            # QUIT (GOAWAY, drain) unless it never served: a worker the dispatcher retires as its last
            # front-door task ends is still BUSY then, with direct requests of its own (round 14: killed
            # at every reload of a model served on both paths, failing them WORKER_CRASHED)
            ready = worker.state is WorkerState.READY or (worker.state is WorkerState.BUSY and not worker.inflight)
            self._stop_dispatching(worker)
            quit_ns = time.monotonic_ns()
            if ready and self.pool.send(worker, [messages.QUIT, quit_ns.to_bytes(8, "little")]):  # its drain counts from now
                latest_ns = quit_ns + QUIT_GRACE_NS + worker.model.config.max_compute_ms * 1_000_000
                self.timers.call_at(quit_ns + QUIT_GRACE_NS, lambda: self._gone_or_killed(worker, latest_ns))
                return
            self.pool.kill(worker)

    def _stop_dispatching(self, worker: WorkerHandle) -> None:
        """DRAINING: neither the dispatcher nor a lease sends it anything more."""
        if worker in worker.model.idle:
            worker.model.idle.remove(worker)
        worker.transition(WorkerState.DRAINING)
        self.direct.withdraw(worker)

    def _gone_or_killed(self, worker: WorkerHandle, latest_ns: int) -> None:
        """A worker told to QUIT and still here after QUIT_GRACE_NS is killed - unless its page says it is
        running a direct request or ended one less than LEAVING_NS ago: a client waits for that run, which
        a reload must not fail (round 9: a 7 s run was killed 5 s after a reload, WORKER_CRASHED), and the
        moment between a run's end and its reply's write, or the worker's leaving (send back, flush: at
        most a second), must not be cut (a computed reply lost; round 11). Its drain counts from the QUIT's
        sending (it carries the time), so it starts no run after QUIT + 4 s and is gone by QUIT + 4 s +
        max_compute_ms. Looked at every quarter second until `latest_ns` (the grace plus the model's
        max_compute_ms). A page that lies only keeps this retiring worker that long."""
        if worker.state is WorkerState.EXITED:
            return
        now = time.monotonic_ns()
        if now < latest_ns and worker.ran_direct_within(now, LEAVING_NS):
            self.timers.call_at(min(latest_ns, now + 250_000_000), lambda: self._gone_or_killed(worker, latest_ns))
            return
        self.pool.kill(worker)

    def _stop_now(self) -> None:
        """A hard stop (a second SIGTERM, or the drain's grace over): nothing more starts. Each worker is told
        to QUIT with no drain - what it read and did not start is answered as a lease expiry (the client's
        renewal is then refused UNAVAILABLE), the run it is in ends and is answered - and is killed
        HALT_GRACE_NS later if still there; a run that long ends as on a worker's death. (Round 57: workers
        were killed at once, and a direct client's requests queued on them were reported WORKER_CRASHED.)
        A third signal kills at once."""
        if self.pool.halting:
            for worker in self.pool.all_workers():
                self.pool.kill(worker)
            return
        self.pool.halting = True
        self._fail_queued()
        now = time.monotonic_ns()
        for worker in self.pool.all_workers():
            if worker.state is not WorkerState.DRAINING:
                self._stop_dispatching(worker)
            serving = worker.ready_ns is not None  # (one still booting holds nothing: killed at once)
            if serving and self.pool.send(worker, [messages.QUIT, now.to_bytes(8, "little"), bytes(8)]):
                self.timers.call_at(now + HALT_GRACE_NS, partial(self.pool.kill, worker))
            else:
                self.pool.kill(worker)
        self.draining = True
        self.pool.shutting_down = True
        self._drain_deadline_ns = None
        self._linger_until_ns = time.monotonic_ns()  # stopping now: replies not yet read are not waited for

    def _fail_queued(self) -> None:
        for model in self.sync.all_models():
            self.dispatcher.fail_queue(model, lambda: Unavailable("daemon stopped before this task ran"))

    def close(self) -> None:
        if self.exporter.enabled:
            try:
                self._publish_metrics()  # final counts for the textfile collector
            except Exception:
                log.exception("final metrics snapshot failed")
        self.exporter.close()
        if self.pool.preparer is not None:
            self.pool.preparer.close()
        for worker in self.pool.all_workers():
            self.pool.kill(worker)
            worker.spawned.process.wait()
            worker.spawned.close()
        self.connections.close_all()
        self.listener.cleanup()
        self.direct.close()
        self.signals.close()
        self.timers.close()
        self.reactor.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.notifier.close()
        log.info("stopped")
