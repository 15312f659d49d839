"""The supervisor's side of the direct path (docs/PROTOCOL.md section 17): clients send `infer` straight
to a worker, one hop, under a lease the front door issued after its access check.

Owned here: the directory of worker endpoints beside the public socket (`PATH.d/`, the socket's own
access), each worker's listening socket (bound by the supervisor, handed over at spawn), the lease keys
(one per model version, derived from a master key; a new master on every reload revokes every lease), issuing leases, the workers' deadline pages, and
the workers' ledgers (books.py: read on housekeeping passes and before every `stats` answer and
metrics snapshot, so what they report is complete).
"""
from __future__ import annotations

import grp
import logging
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

from openinfer.wire.errors import OpenInferError, Unavailable

from . import lease as leases
from .books import DirectBooks
from .deadline_page import DeadlinePage
from .ledger import MAX_RECORD_BYTES
from openinfer.daemon.frontdoor.client_limits import ClientLimit
from openinfer.daemon.frontdoor.listener import BoundListener, not_ours
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.modelstore.models import ServedModel
from openinfer.daemon.config.settings import Settings
from openinfer.daemon.worker import messages
from openinfer.daemon.worker.bootconfig import DirectConfig, WorkerSandboxConfig
from openinfer.daemon.workerpool.workers import WorkerHandle, WorkerState

log = logging.getLogger("openinfer.supervisor")

OVERDUE_GRACE_NS = 500_000_000  # the worker stops an overdue run itself (worker/run_watch.py, channel_tasks.py); a kill is the backstop, on both paths
_SOCKET_PATH_MAX = 107


class DirectPath:
    def __init__(self, settings: Settings, listener: BoundListener, books: DirectBooks) -> None:
        self.settings = settings
        self.books = books
        self._master_key = leases.new_key()  # never leaves the supervisor: workers get key_for their model version
        self._generations: dict[str, int] = {}  # model name -> how many times its leases alone were revoked (rotate_model_key)
        self._serial = 0
        self.directory: Path | None = None
        self.leases_issued = 0
        if listener.socket_path is not None and settings.pool.direct:
            self.directory = _endpoint_dir(listener.socket_path, settings)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    # -- spawning and reaping ------------------------------------------------------------------------
    def prepare(self, worker_id: int, model: ServedModel) -> tuple[DirectConfig, socket.socket, DeadlinePage, str] | None:
        """A worker's endpoint before it is spawned: (its boot config part, the listening socket, the
        deadline page, the address clients use), or None without a direct path."""
        if self.directory is None:
            return None
        server = self.settings.server
        path = self.directory / f"w{worker_id}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        if server.socket_group:
            os.chown(path, -1, grp.getgrnam(server.socket_group).gr_gid, follow_symlinks=False)
        os.chmod(path, server.socket_mode)
        listener.listen(64)
        page = DeadlinePage.create(f"openinfer-w{worker_id}")
        batching = model.config.batching
        config = DirectConfig(
            max_connections=max(8, server.max_connections // 4),
            max_connections_per_identity=server.max_connections_per_identity,
            max_request_bytes=model.config.max_request_bytes or server.max_request_bytes,
            max_reply_backlog_bytes=server.max_reply_backlog_bytes,
            strike_limit=server.peer_strike_limit,
            timeout_ms=model.config.timeout_ms,
            max_compute_ms=model.config.max_compute_ms,
            starvation_ms=server.starvation_ms,
            spin_us=self.settings.pool.worker_spin_us,
            batching={"max_batch_size": batching.max_batch_size, "max_queue_delay_us": batching.max_queue_delay_us, "preferred_batch_sizes": list(batching.preferred_batch_sizes), "quiet_us": batching.quiet_us} if batching else None,
        )
        return config, listener, page, f"ipc://{path}"

    def withdraw(self, worker: WorkerHandle) -> None:
        """The worker is retiring: its endpoint's name goes now, so a client holding an old lease fails
        to connect at once (and goes to the front door) instead of waiting on a worker that no longer
        accepts. Connections already open stay until the worker's drain ends."""
        if worker.direct_address:
            try:
                Path(worker.direct_address[len("ipc://") :]).unlink()
            except FileNotFoundError:
                pass

    def opened(self, worker: WorkerHandle, config: DirectConfig, page: DeadlinePage, address: str, sandbox: WorkerSandboxConfig) -> None:
        """The worker was spawned with this endpoint, config, sandbox and page (whose memfd holds its
        ledger too)."""
        worker.page, worker.direct_address = page, address
        self.books.open(worker, page.fd, config.max_request_bytes, largest_answer(sandbox))

    def forget(self, worker: WorkerHandle) -> None:
        """The worker exited: its last ledger records are read and what it held counted as lost; its
        endpoint goes (clients on it saw their connections close)."""
        if worker.page is not None:
            self.books.lost(worker)
        self.withdraw(worker)
        if worker.page is not None:
            worker.page.close()
            worker.page = None

    # -- leases ---------------------------------------------------------------------------------------
    def lease(self, identity: str, model: ServedModel, limit: ClientLimit, limits: dict[str, Any], gids: tuple[int, ...] = ()) -> dict[str, Any]:
        """`gids`: the groups the attaching process must hold, one of them (AccessPolicy.required_gids)."""
        if self.directory is None:
            raise Unavailable("this daemon has no direct path (it serves tcp://, or pool.direct = false): send infer to the front door", {"direct": "off"})
        now = time.monotonic_ns()
        workers = [w for w in model.workers if w.direct_address and not w.retired and w.state in (WorkerState.READY, WorkerState.BUSY) and not _past_deadline(w, now)]
        if not workers:
            raise Unavailable(f"model {model.key} has no worker ready for direct requests right now (starting, or running past a deadline)")
        ttl_ns = int(self.settings.server.lease_ttl_s * 1e9)
        self._serial += 1
        model.lessees.add(identity)
        token, _ = leases.issue(self.key_for(model), identity, model.name, model.version, ttl_ns, self._serial, limit.max_in_flight, limit.max_priority, gids)
        self.leases_issued += 1
        return {
            "model": model.name,
            "version": model.version,
            "lease": token,
            "expires_in_ms": ttl_ns // 1_000_000,
            "workers": [{"address": w.direct_address, "worker": w.worker_id} for w in workers],
            "limits": limits,
        }

    def key_for(self, model: ServedModel) -> bytes:
        """The lease key of one model version (lease.model_key): all its workers hold, and all a hostile
        step in one of them could mint leases with - for that model version alone."""
        return leases.model_key(self._master_key, model.name, model.version, self._generations.get(model.name, 0))

    def rotate_key(self, workers: list[WorkerHandle], send: Callable[[WorkerHandle, list[Any]], bool]) -> None:
        """A reload: every lease issued so far stops working (clients renew at the front door, where the
        policy just read applies)."""
        self._master_key = leases.new_key()
        self._generations.clear()
        for worker in workers:
            if worker.direct_address and worker.state not in (WorkerState.SPAWNED, WorkerState.EXITED):
                send(worker, [messages.KEY, self.key_for(worker.model)])

    def rotate_model_key(self, model: ServedModel, workers: list[WorkerHandle], send: Callable[[WorkerHandle, list[Any]], bool]) -> None:
        """A client was refused `model` (crash strikes, every version of it: round 87): its versions'
        leases stop working, no other model's - a hostile model naming a made-up uid on its page had
        every lease of every model revoked with each refusal, 14 times a minute (attacker round 86). Every
        worker of those versions is told, a reload's replacement still booting too."""
        self._generations[model.name] = self._generations.get(model.name, 0) + 1
        for worker in _serving_versions_of(model, workers):
            send(worker, [messages.KEY, self.key_for(worker.model)])

    def bar(self, model: ServedModel, identity: str, error: OpenInferError, workers: list[WorkerHandle], send: Callable[[WorkerHandle, list[Any]], bool]) -> None:
        """A client was refused `model`: every worker of its versions answers the client's queued direct
        requests `error` (BAR), as the front door answers its own queue."""
        message = [messages.BAR, msgpack.packb([identity, error.message, int(error.details.get("retry_after_s", 0))])]
        for worker in _serving_versions_of(model, workers):
            send(worker, message)

    # -- counts ---------------------------------------------------------------------------------------
    def read_ledgers(self, workers: list[WorkerHandle], reject: Callable[[WorkerHandle, str], None], limit: int | None = None) -> None:
        """Take in every worker's ledger (books.py): before `stats` and metrics snapshots, and on the
        supervisor's housekeeping pass."""
        self.books.read_all(workers, reject, limit)

    # -- deadlines ------------------------------------------------------------------------------------
    @staticmethod
    def overdue(workers: list[WorkerHandle], now_ns: int) -> list[tuple[WorkerHandle, int]]:
        """Workers whose direct run has gone on past its model's max_compute_ms: (worker, how long it has
        run, ns). A run past its requests' deadlines only is left to end: its clients have given up on
        it (and the lease leaves the worker out meanwhile); killing it there let a client with a short
        timeout and a run the worker cannot stop kill workers at will."""
        late = []
        for worker in workers:
            page = worker.page
            if page is None or worker.retired:
                continue
            since, deadline = page.read()
            # The page is the worker's word: no run of it started before it was ready (round 64's suspicion,
            # reproduced: a step that claimed a start long past had each of its model's workers killed and
            # booted again at once, twice a second, ~0.25 s of the host's CPU each).
            started = max(since, worker.ready_ns or now_ns)
            if deadline and since and now_ns > started + worker.model.config.max_compute_ms * 1_000_000 + OVERDUE_GRACE_NS:
                # The two words are written one at a time: a read between a run's end and the next run's
                # start can pair one run's deadline with the other's start (or with 0), and an honest worker
                # was killed mid-burst that way. A run that is really stuck reads the same twice.
                if page.read() == (since, deadline):
                    late.append((worker, now_ns - started))
        return late

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def largest_answer(sandbox: WorkerSandboxConfig) -> int:
    """The most output bytes one answer of a worker spawned with `sandbox` can carry: its address-space
    limit, since every output frame is in its memory when it books the answer. Not
    server.max_worker_message_bytes: a worker does not hold its direct replies to that, and a bound below
    what an honest worker answers would retire it. No limit (0, or the sandbox off): the record's own bound."""
    if sandbox.enabled and sandbox.memory_limit_bytes:
        return sandbox.memory_limit_bytes
    return MAX_RECORD_BYTES


def _past_deadline(worker: WorkerHandle, now_ns: int) -> bool:
    """A worker still running a request past its deadline is stopping it, or cannot stop it and runs on
    (until max_compute_ms, then it is killed): a lease that named it would queue a client's next request
    behind a run of unknown length, or send it to its death (WORKER_CRASHED)."""
    return worker.inflight.stalled or worker.direct_run_overdue(now_ns)  # stalled: a front-door run, answered overdue while it goes on


def _endpoint_dir(socket_path: Path, settings: Settings) -> Path | None:
    """`PATH.d`, beside the public socket: created fresh (we hold the socket's lock, so what is there
    was left by a daemon that is gone), private to the daemon but for the access the socket itself gives."""
    directory = socket_path.with_name(socket_path.name + ".d")
    if len(os.fsencode(str(directory / "w4294967295.sock"))) > _SOCKET_PATH_MAX:
        log.warning("no direct path: the worker endpoints' paths would not fit a Unix socket address", extra={"dir": str(directory)})
        return None
    try:
        st = os.lstat(directory)
        squatted = not_ours(directory, st, stat.S_ISDIR)
        if squatted is not None:
            raise ConfigError(squatted)
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    mode = settings.server.socket_mode
    dir_mode = 0o700 | (0o050 if mode & 0o060 else 0) | (0o005 if mode & 0o006 else 0)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:  # taken between the removal and here (another uid, in a sticky directory)
        raise ConfigError(not_ours(directory, os.lstat(directory), stat.S_ISDIR) or f"{directory} appeared while the daemon made it: is another daemon starting on this path?") from None
    if settings.server.socket_group:
        os.chown(directory, -1, grp.getgrnam(settings.server.socket_group).gr_gid, follow_symlinks=False)
    os.chmod(directory, dir_mode)
    return directory


def _serving_versions_of(model: ServedModel, workers: list[WorkerHandle]) -> list[WorkerHandle]:
    """The workers of every version of `model` with a direct endpoint, past their boot (one still booting
    gets the current key with its ACK) and alive."""
    return [w for w in workers if w.model.name == model.name and w.direct_address and w.state not in (WorkerState.SPAWNED, WorkerState.EXITED)]
