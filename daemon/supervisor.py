"""The supervisor: one poller loop that owns the public socket, the worker channel, the queues and the
accounting. It never imports onnxruntime and never runs a task itself."""
from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from openinfer.client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Internal,
    OpenInferError,
    Unavailable,
    WorkerCrashed,
)
from openinfer.client.protocol import MAX_HEADER_BYTES, PROTOCOL_VERSION, resolve_address, unpack

from . import admin
from .access import AccessPolicy
from .accounting import Accountant
from .endpoint import BoundEndpoint, bind_public
from .client_limits import ClientLimiter, load_client_policy
from .dispatch import Dispatcher
from .modelconfig import ConfigError
from .metrics import MetricsExporter
from .models import ModelRegistry, ModelState, ServedModel
from .pool import WorkerPool
from .preparation import WeightPreparer
from .peer_guard import PeerGuard
from .peers import PeerDirectory
from .prepared import PreparedStore
from .reload import RepositorySync
from .replies import ReplySender
from .results import WorkerResults
from .runtime_dir import base_runtime_dir, create_instance_dir
from .settings import Settings
from .sdnotify import SystemdNotifier
from .signals import SignalInbox
from .tasks import Task
from .timers import MonotonicTimerFd, TimerHeap
from .validation import OverLimit, check_envelope, check_infer, decode_header, request_id_of
from .worker import messages
from .workers import WorkerHandle, WorkerState

log = logging.getLogger("openinfer.supervisor")

_BATCH = 64  # messages taken from one socket before looking at the others
# pyzmq flag enums cost microseconds per call on this path; plain ints do not.
_NOBLOCK = int(zmq.NOBLOCK)
_GC_THRESHOLDS = (20_000, 20, 100)
_HOUSEKEEPING_NS = 5_000_000  # how often running tasks' deadlines are checked


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
        self._systemd_ready = False  # READY=1 sent for the current start or reload
        self._systemd_summary: tuple[Any, ...] = ()
        self.started_ns = time.monotonic_ns()
        self.context = zmq.Context(io_threads=1)
        self.registry = ModelRegistry()
        self.accountant = Accountant()
        self.timers = TimerHeap(MonotonicTimerFd())
        self.poller = zmq.Poller()
        self.draining = False
        self.finished = False
        self._drain_deadline_ns: int | None = None
        self._next_task_id = 1
        self._next_housekeeping_ns = 0
        self.limiter = ClientLimiter(load_client_policy(settings.server.client_policy))
        self.access = AccessPolicy.load(settings.server.access_policy)
        self.peers = PeerDirectory(self.access)
        # ZAP: libzmq asks this socket about every new connection; Unix-socket peers come with uid/gid/pid.
        self.zap = self.context.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind("inproc://zeromq.zap.01")
        self.frontend = self._make_frontend()
        self.endpoint: BoundEndpoint = bind_public(
            self.frontend,
            resolve_address(settings.server.socket),
            mode=settings.server.socket_mode,
            group=settings.server.socket_group,
            insecure_tcp=settings.server.insecure_tcp,
            curve_secret_key_file=settings.server.curve_secret_key_file,
        )
        self.guard = PeerGuard(self.frontend, settings, self.timers)
        self.backend = self.context.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pool = WorkerPool(settings, self.backend, "", self.timers, self._on_worker_lost, self.poller, self._on_model_failed)
        self.sync = RepositorySync(settings, self.registry, self.pool, self._quit)
        self.replies = ReplySender(settings, self.frontend, self.accountant, self.limiter)
        self.dispatcher = Dispatcher(settings, self.backend, self.timers, self.limiter, self.replies.fail, self._retire_worker)
        self.results = WorkerResults(self.dispatcher, self.replies)
        self.runtime_dir = create_instance_dir(base_runtime_dir(settings.server.runtime_dir), self.pool.worker_gid)
        channel = self.runtime_dir / "workers.sock"
        self.backend.bind(f"ipc://{channel}")
        if self.pool.worker_gid is not None:
            os.chown(channel, -1, self.pool.worker_gid)
            os.chmod(channel, 0o660)
        self.pool.channel_address = f"ipc://{channel}"
        store = PreparedStore(Path(settings.server.cache_dir) if settings.server.cache_dir else self.runtime_dir / "prepared", self.pool.worker_uid)
        self.pool.preparer = WeightPreparer(self.pool, store, self.sync.start_workers)
        self.signals = SignalInbox()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self.signals.fd, zmq.POLLIN)
        self.poller.register(self.zap, zmq.POLLIN)
        self.poller.register(self.guard.monitor, zmq.POLLIN)
        assert self.timers.wakeup is not None
        self.timer_fd = self.timers.wakeup.fd
        self.poller.register(self.timer_fd, zmq.POLLIN)
        self.exporter = MetricsExporter(settings.metrics)
        if self.exporter.wakeup_fd is not None:  # a scrape asks for a fresh snapshot (metrics.py)
            self.poller.register(self.exporter.wakeup_fd, zmq.POLLIN)

    def _make_frontend(self) -> zmq.Socket:  # type: ignore[type-arg]
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        # One frame over this drops the peer (libzmq); the multipart total is checked per request.
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.server.max_request_bytes + MAX_HEADER_BYTES)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"openinfer")
        return sock

    # -- model loading ----------------------------------------------------------------------------
    def load_repository(self) -> None:
        self.sync.sync()
        self.pool.start_liveness_checks()
        self._tell_systemd()
        log.info("serving", extra={"address": self.endpoint.address, "models": sorted(self.registry.by_name), "failed": sorted(self.registry.failed)})

    def reload(self) -> dict[str, Any]:
        """SIGHUP / `reload`: re-read the config file (a bad one keeps the old settings), then the repository."""
        self.notifier.reloading()
        self._systemd_ready = False
        try:
            return self._reload()
        finally:
            self._tell_systemd()

    def _reload(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self.reload_settings is not None:
            try:
                new = self.reload_settings()
            except ConfigError as exc:
                log.error("reload: invalid configuration; keeping the old one", extra={"reason": str(exc)})
                return {"error": f"invalid configuration, nothing changed: {exc}"}
            fixed = [k for k in ("socket", "runtime_dir", "socket_mode", "socket_group", "insecure_tcp") if getattr(new.server, k) != getattr(self.settings.server, k)]
            if new.metrics != self.settings.metrics:
                fixed.append("metrics")
            if fixed:
                log.warning("reload: these settings need a restart to take effect", extra={"keys": fixed})
                result["needs_restart"] = [k if k == "metrics" else f"server.{k}" for k in fixed]
            self.settings = self.pool.settings = self.sync.settings = self.dispatcher.settings = self.replies.settings = self.guard.settings = new
        result.update(self.sync.sync())
        return result

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        poll = self.poller.poll
        frontend, backend, signal_fd = self.frontend, self.backend, self.signals.fd
        watchdog = self.notifier.watchdog if self.notifier.watchdog_interval_ns else None
        idle_ms = min(1000, (self.notifier.watchdog_interval_ns or 4_000_000_000) // 4_000_000)
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
            events = poll(0)
            if not events:  # idle: the bookkeeping deferred from the busy path, then sleep
                self.dispatcher.arm_deadlines()  # before timeout_ms below reads the timers
                self.accountant.flush()
                events = poll(self.timers.timeout_ms(5 if busy else idle_ms))
            try:
                self._handle(events, frontend, backend, signal_fd)
            except Exception:  # a bug in one handler must not take the daemon (and every client) down
                log.exception("internal error in the supervisor loop; continuing")
            now = time.monotonic_ns()
            self.dispatcher.arm_overdue_deadlines(now)
            self.timers.run_due()
            if self.exporter.due(now):
                try:
                    self._publish_metrics()
                except Exception:
                    log.exception("metrics snapshot failed; continuing")
            if busy:
                self._expire_running()
            self.guard.check_memory(time.monotonic_ns(), self._busy_routes)
            if self.sync.retiring:
                self.sync.progress()
            if self.draining:
                self._progress_drain()
        return 0

    def _handle(self, events: list[tuple[Any, int]], frontend: Any, backend: Any, signal_fd: int) -> None:
        for item, _ in events:
            if item is backend:
                self._drain_backend()
            elif item is frontend:
                self._drain_frontend()
            elif item == signal_fd:
                self._on_signals(self.signals.drain())
            elif item == self.timer_fd:
                self.timers.on_wakeup()  # the due timers run right after this pass
            elif item is self.zap:
                self.peers.answer_zap(self.zap)
            elif item is self.guard.monitor:
                self.guard.on_monitor()
            elif item == self.exporter.wakeup_fd:
                self.exporter.on_wakeup()  # due() below then publishes the snapshot the scrape waits for
            else:
                self.pool.on_fd_ready(item, shutting_down=self.draining)
                self._tell_systemd()

    def _publish_metrics(self) -> None:
        """When a scrape waits or the textfile is due, from the loop: the exporter's threads only ever
        read this snapshot."""
        workers = [{"model": w.model.name, "version": w.model.version, "state": w.state.value} for w in self.pool.all_workers()]
        depths = {(m.name, m.version): len(m.queue) for m in self.sync.all_models()}
        self.exporter.publish(admin.stats_result(self), workers, depths)

    def _busy_routes(self) -> list[bytes]:
        """Routing ids with a request queued or running (only asked when memory runs over its limit)."""
        routes = [route_id for route_id, _ in self.dispatcher.queued_by_request]
        for worker in self.pool.by_identity.values():
            routes.extend(task.route_id for task in worker.inflight)
        return routes

    def _any_busy(self) -> bool:
        for worker in self.pool.by_identity.values():
            if worker.inflight:
                return True
        return False

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None]) -> None:  # type: ignore[type-arg]
        """Take up to _BATCH whole messages, until zmq.Again. (Not ZMQ_EVENTS first: pyzmq turns its value
        into an IntFlag, which costs more than the exception; profiled at ~7 % of the loop at c=16.)
        Due timers run between messages: a batch's delay must not wait for a burst to be read."""
        recv = sock.recv
        run_due = self.timers.run_due
        for _ in range(_BATCH):
            run_due()
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame]
            while frame.more:  # the rest of a multipart message is already here
                frame = recv(0, copy=False)
                frames.append(frame)
            handle(frames)

    def _drain_frontend(self) -> None:
        self._drain(self.frontend, self._on_request)

    def _drain_backend(self) -> None:
        self._drain(self.backend, self._on_worker_message)

    # -- requests ---------------------------------------------------------------------------------
    def _on_request(self, frames: list[zmq.Frame]) -> None:
        received_ns = time.monotonic_ns()
        # A REQ peer puts an empty delimiter before the header; answer it the same way.
        split = 2 if len(frames) > 2 and len(frames[1]) == 0 else 1
        route = frames[:split]
        body = frames[split:]
        route_id = route[0].bytes
        client = ""  # known once the peer is: "uid=N" or the routing id in hex (see peers.peer_of)
        request_id: int | None = None
        self._request_model: ServedModel | None = None
        if not self.guard.saw(route_id, route[0], received_ns):
            return  # its connection struck out (peer_guard) and is about to be closed
        try:
            if not body:
                raise InvalidArgument("empty message: expected a header frame")
            header = decode_header(body[0].buffer)
            request_id = request_id_of(header)
            op = check_envelope(header, len(body))
            peer, client = self.peers.peer_of(route_id, body[0])
            name = header.get("client")
            if name:
                client = f"{name}@{client}"
            model_name = header.get("model")
            self.peers.authorize(peer, op, model_name if isinstance(model_name, str) else None)
            if op == "infer":
                self._accept_infer(route, route_id, request_id, client, header, body, received_ns)  # type: ignore[arg-type]
            else:
                self.replies.send(route, {"v": PROTOCOL_VERSION, "id": request_id, "result": self._admin(op, header, route)})
        except Exception as exc:  # every accepted request gets exactly one answer, even on a daemon bug
            client = client or route_id.hex()
            if not isinstance(exc, OpenInferError):
                log.exception("internal error while handling a request", extra={"client": client})
                exc = Internal(f"internal error: {type(exc).__name__}")
            if request_id is None:
                log.warning("malformed request", extra={"client": client, "code": exc.code, "reason": exc.message})
            timing = {"total_us": (time.monotonic_ns() - received_ns) / 1000}
            self.replies.error(route, request_id, exc, timing)
            if request_id is None or isinstance(exc, OverLimit):  # no conforming client sends this
                self.guard.strike(route_id, exc.message)
            model = self._request_model
            self.accountant.record(model.name if model else None, model.version if model else None, client, exc.code, timing)

    def _accept_infer(self, route: list[Any], route_id: bytes, request_id: int, client: str, header: dict[str, Any], body: list[Any], received_ns: int) -> None:
        if self.draining:
            raise Unavailable("daemon is shutting down; not accepting new requests")
        version = header.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise InvalidArgument("`version` must be an integer")
        name = header.get("model")
        if not isinstance(name, str):
            raise InvalidArgument("`model` must be a string (the name of a served model)")
        model = self.registry.lookup(name, version)
        if model.state is not ModelState.READY:
            raise Unavailable(f"model {model.key} is {model.state.value}" + (f": {model.reason}" if model.reason else ""))
        data = body[1:]
        limit = model.config.max_request_bytes or self.settings.server.max_request_bytes
        self._request_model = model  # so a rejection below is counted against this model
        nbytes, signature = check_infer(header, data, model, limit)
        decoded_ns = time.monotonic_ns()
        timeout_ms = header.get("timeout_ms") or model.config.timeout_ms
        task = Task(  # positional: half the cost of keywords, on every request
            self._next_task_id,  # task_id
            request_id,
            route,
            route_id,
            client,
            model,
            body[0],  # header_frame
            data,  # data_frames
            nbytes,
            received_ns,
            decoded_ns,
            received_ns + timeout_ms * 1_000_000,  # deadline_ns
            header.get("priority") or 0,
            signature,
        )
        key = (route_id, request_id)
        if key in self.replies.open_requests:
            raise InvalidArgument(f"id {request_id} is already in flight on this connection; ids must be unique among a connection's outstanding requests")
        self._next_task_id += 1
        self.limiter.admit(client, header.get("client"), decoded_ns)
        self.dispatcher.admit(task, header)
        self.replies.open_requests.add(key)

    # -- worker messages ----------------------------------------------------------------------------
    def _on_worker_message(self, frames: list[zmq.Frame]) -> None:
        worker = self.pool.by_identity.get(frames[0].bytes)
        if worker is None or len(frames) < 2:
            return
        kind = frames[1].bytes[:1]
        if kind == messages.RESULT:
            self.results.on_result(worker, frames)
        elif kind == messages.RESULTS:
            self.results.on_batch(worker, frames)
        elif kind == messages.HELLO:
            self.pool.on_hello(worker, unpack(frames[2].buffer))
        elif kind == messages.READY:
            self.pool.on_ready(worker, unpack(frames[2].buffer))
            if self.draining:
                self._quit(worker)
            else:
                self.dispatcher.next_for(worker)
                self.sync.on_model_ready(worker.model)
                self._tell_systemd()
        elif kind == messages.PONG:
            worker.ping_sent_ns = 0
        else:
            log.warning("unknown message from worker", extra={"worker": worker.worker_id, "kind": kind.hex()})

    def _on_model_failed(self, model: ServedModel) -> None:
        """The model cannot serve (load failed, or its workers crash-looped): queued requests must not
        wait for their deadline, they get UNAVAILABLE with the reason at once."""
        self.sync.on_model_failed(model)
        reason = f"model {model.key} is {model.state.value}: {model.reason}"
        failed = self.dispatcher.fail_queue(model, lambda: Unavailable(reason))
        if failed:
            log.warning("queued requests failed: model cannot serve", extra={"model": model.key, "requests": failed, "reason": model.reason})

    def _retire_worker(self, worker: WorkerHandle) -> None:
        self._quit(worker)
        self.sync.progress()

    def _on_worker_lost(self, worker: WorkerHandle, how: str) -> None:
        """Exactly the task the worker was running fails; pipelined ones behind it never started and go
        back to the front of the queue. A batch that crashed goes back whole, each member to run alone."""
        if not worker.inflight:
            return
        head = worker.inflight[0]
        if not (head.batched and len(worker.inflight) > 1):
            worker.inflight.popleft()
            if not head.done:
                self.replies.fail(head, WorkerCrashed(how, {"worker": worker.worker_id, "pid": worker.pid}))
        self.dispatcher.requeue_unstarted(worker)

    # -- deadlines --------------------------------------------------------------------------------
    def _expire_running(self) -> None:
        """Kill workers whose running task (or batch) is past its deadline or max_compute_ms."""
        now = time.monotonic_ns()
        if now < self._next_housekeeping_ns:
            return
        self._next_housekeeping_ns = now + _HOUSEKEEPING_NS
        for worker in list(self.pool.by_identity.values()):
            if not worker.inflight or now < worker.deadline_ns:
                continue
            running = [worker.inflight.popleft()]
            if running[0].batched:  # the whole batch was running
                while worker.inflight and worker.inflight[0].batched and worker.inflight[0].dispatched_ns == running[0].dispatched_ns:
                    running.append(worker.inflight.popleft())
            late = [t for t in running if t.deadline_ns <= now] if len(running) > 1 else running
            for task in running:
                if task not in late:
                    worker.inflight.appendleft(task)  # ran too long together with others: retried alone
            self.dispatcher.requeue_unstarted(worker)
            for task in late:
                ran_ms = (now - task.dispatched_ns) / 1e6
                self.replies.fail(task, DeadlineExceeded(f"task still running after {ran_ms:.0f} ms; its worker was killed and is being replaced"))
            worker.exit_reason = "killed: task exceeded its deadline"
            worker.expected_exit = True
            self.pool.kill(worker)

    # -- replies ----------------------------------------------------------------------------------
    # -- admin --------------------------------------------------------------------------------------
    def _admin(self, op: str, header: dict[str, Any], route: list[Any]) -> dict[str, Any]:
        if op == "models":
            return admin.models_result(self)
        if op == "metadata":
            return admin.metadata_result(self, header)
        if op == "health":
            return admin.health_result(self)
        if op == "status":
            return admin.status_result(self)
        if op == "stats":
            return admin.stats_result(self)
        if op == "cancel":
            return self._cancel(route, header.get("target"))
        if op == "reload":
            result = self.reload()
            if "error" in result:  # the old configuration keeps serving
                raise InvalidArgument(result["error"])
            return result
        raise InvalidArgument(f"operation {op!r} is not supported by this daemon yet")

    def _cancel(self, route: list[Any], target: Any) -> dict[str, Any]:
        task = self.dispatcher.queued_for(route[0].bytes, target) if isinstance(target, int) else None
        if task is None or task.done:
            return {"cancelled": False}
        self.dispatcher.remove_queued(task)
        self.replies.fail(task, DeadlineExceeded("cancelled by the client before it ran"))
        return {"cancelled": True}

    # -- signals and shutdown ---------------------------------------------------------------------
    def _on_signals(self, signums: list[int]) -> None:
        for signum in signums:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.draining:
                    log.warning("second stop signal: stopping now")
                    self._stop_now()
                else:
                    self.begin_drain()
            elif signum == signal.SIGHUP:
                self.reload()

    def _tell_systemd(self) -> None:
        """READY=1 once nothing is still loading (failed models do not hold startup back: they are in
        STATUS=, `health` and the logs); STATUS= whenever the model summary changes. Not per request."""
        if not self.notifier.enabled:
            return
        models = self.sync.all_models()
        summary = tuple(sorted((m.key, m.state.value, m.ready_workers()) for m in models))
        if summary == self._systemd_summary and self._systemd_ready:
            return
        self._systemd_summary = summary
        ready = sum(1 for m in models if m.state is ModelState.READY)
        bad = sorted(m.key for m in models if m.state in (ModelState.FAILED, ModelState.UNAVAILABLE))
        text = f"serving {ready} model versions, {len(self.pool.by_identity)} workers at {self.endpoint.address}" + (f"; not serving: {', '.join(bad)}" if bad else "")
        loading = any(m.state is ModelState.LOADING for m in models) or bool(self.sync.pending)
        if not self._systemd_ready and not loading and not self.draining:
            self.notifier.ready(text)
            self._systemd_ready = True
        else:
            self.notifier.status(text)

    def begin_drain(self) -> None:
        self.notifier.stopping("draining: finishing queued and running tasks")
        log.info("draining: finishing queued and running tasks", extra={"grace_s": self.settings.server.drain_grace_s})
        self.draining = True
        self._drain_deadline_ns = time.monotonic_ns() + int(self.settings.server.drain_grace_s * 1e9)

    def _progress_drain(self) -> None:
        if self._drain_deadline_ns is not None and time.monotonic_ns() >= self._drain_deadline_ns:
            log.warning("drain grace period over: stopping now")
            self._stop_now()
        pending = any(m.queue for m in self.sync.all_models()) or self._any_busy()
        if not pending:
            for worker in self.pool.all_workers():
                if worker.state is not WorkerState.DRAINING:
                    self._quit(worker)
        if not self.pool.by_identity:
            self.finished = True

    def _quit(self, worker: WorkerHandle) -> None:
        if worker.state in (WorkerState.READY, WorkerState.BUSY, WorkerState.LOADED, WorkerState.SPAWNED):
            if worker in worker.model.idle:
                worker.model.idle.remove(worker)
            ready = worker.state is WorkerState.READY
            worker.transition(WorkerState.DRAINING)
            if ready:
                try:
                    self.backend.send_multipart([worker.identity, messages.QUIT], flags=zmq.NOBLOCK)
                    self.timers.call_at(time.monotonic_ns() + 5_000_000_000, lambda: self.pool.kill(worker))
                    return
                except zmq.ZMQError:
                    pass
            self.pool.kill(worker)

    def _stop_now(self) -> None:
        for model in self.sync.all_models():
            self.dispatcher.fail_queue(model, lambda: Unavailable("daemon stopped before this task ran"))
        for worker in self.pool.all_workers():
            while worker.inflight:
                task = worker.inflight.popleft()
                if not task.done:
                    self.replies.fail(task, Unavailable("daemon stopped while this task was running"))
            if worker.state is not WorkerState.DRAINING:
                worker.transition(WorkerState.DRAINING)
            self.pool.kill(worker)
        self.draining = True
        self._drain_deadline_ns = None

    def close(self) -> None:
        if self.exporter.enabled:
            try:
                self._publish_metrics()  # final counts for the textfile collector
            except Exception:
                log.exception("final metrics snapshot failed")
        self.exporter.close()
        for worker in self.pool.all_workers():
            self.pool.kill(worker)
            worker.spawned.process.wait()
            worker.spawned.close()
        self.signals.close()
        self.timers.close()
        self.guard.close()
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        self.zap.close(linger=0)
        self.context.term()
        self.endpoint.cleanup()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.notifier.close()
        log.info("stopped")
