"""The supervisor's side of the direct path (docs/PROTOCOL.md section 17): clients send `infer` straight
to a worker, one hop, under a lease the front door issued after its access check.

Owned here: the directory of worker endpoints beside the public socket (`PATH.d/`, the socket's own
access), each worker's listening socket (bound by the supervisor, handed over at spawn), the lease key
(a new one on every reload, which revokes every lease), issuing leases, the workers' deadline pages, and
the counts workers hand over (tallies, merged into the accountant once checked). `stats` and metrics
scrapes first ask every worker for its counts (a flush), so what they report is complete.
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

from openinfer.wire.errors import Unavailable
from openinfer.wire.protocol import unpack

from . import lease as leases
from openinfer.daemon.observability.accounting import CLIENT_KEY, ERROR_CODES, STAGES, Accountant, TallyRejected
from .deadline_page import DeadlinePage
from openinfer.daemon.frontdoor.listener import BoundListener
from openinfer.daemon.modelstore.models import ServedModel
from openinfer.daemon.config.settings import Settings
from openinfer.daemon.loop.timers import TimerHeap
from openinfer.daemon.worker import messages
from openinfer.daemon.worker.bootconfig import DirectConfig
from openinfer.daemon.workerpool.workers import WorkerHandle, WorkerState

log = logging.getLogger("openinfer.supervisor")

OVERDUE_GRACE_NS = 500_000_000  # the worker stops an overdue run itself (worker/run_watch.py); a kill is the backstop
FLUSH_WAIT_NS = 200_000_000  # a worker stuck in a long run answers a flush late: its counts come later
_SOCKET_PATH_MAX = 107


class DirectPath:
    def __init__(self, settings: Settings, listener: BoundListener, timers: TimerHeap, accountant: Accountant) -> None:
        self.settings = settings
        self.timers = timers
        self.accountant = accountant
        self.key = leases.new_key()
        self._serial = 0
        self.directory: Path | None = None
        self._flush_token = 0
        self._flush_waiting: set[int] = set()
        self._flush_callbacks: list[Callable[[], None]] = []
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
            access_log_sample=self.settings.log.access_log_sample,
            batching={"max_batch_size": batching.max_batch_size, "max_queue_delay_us": batching.max_queue_delay_us, "preferred_batch_sizes": list(batching.preferred_batch_sizes)} if batching else None,
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

    def forget(self, worker: WorkerHandle) -> None:
        """The worker exited: its endpoint goes (clients on it saw their connections close)."""
        self.withdraw(worker)
        if worker.page is not None:
            worker.page.close()
            worker.page = None
        if worker.worker_id in self._flush_waiting:
            self._flush_waiting.discard(worker.worker_id)
            if not self._flush_waiting:
                self._finish_flush()

    # -- leases ---------------------------------------------------------------------------------------
    def lease(self, identity: str, model: ServedModel, max_in_flight: int, limits: dict[str, Any]) -> dict[str, Any]:
        if self.directory is None:
            raise Unavailable("this daemon has no direct path (it serves tcp://, or pool.direct = false): send infer to the front door", {"direct": "off"})
        workers = [w for w in model.workers if w.direct_address and not w.retired and w.state in (WorkerState.READY, WorkerState.BUSY)]
        if not workers:
            raise Unavailable(f"model {model.key} has no worker ready for direct requests yet")
        ttl_ns = int(self.settings.server.lease_ttl_s * 1e9)
        self._serial += 1
        token, _ = leases.issue(self.key, identity, model.name, model.version, ttl_ns, self._serial, max_in_flight)
        self.leases_issued += 1
        return {
            "model": model.name,
            "version": model.version,
            "lease": token,
            "expires_in_ms": ttl_ns // 1_000_000,
            "workers": [{"address": w.direct_address, "worker": w.worker_id} for w in workers],
            "limits": limits,
        }

    def rotate_key(self, workers: list[WorkerHandle], send: Callable[[WorkerHandle, list[Any]], bool]) -> None:
        """A reload: every lease issued so far stops working (clients renew at the front door, where the
        policy just read applies)."""
        self.key = leases.new_key()
        for worker in workers:
            if worker.direct_address and worker.state not in (WorkerState.SPAWNED, WorkerState.EXITED):
                send(worker, [messages.KEY, self.key, repr(self.settings.log.access_log_sample).encode()])

    # -- counts ---------------------------------------------------------------------------------------
    def on_tally(self, worker: WorkerHandle, frames: list[Any]) -> list[AccessRecord]:
        """A worker's counts of its direct requests: checked (accounting.merge) before any is added;
        TallyRejected retires the worker (the caller). Returns its sampled access records, checked, for
        the access log."""
        if len(frames) != 5 or len(frames[2]) > 16 << 20 or len(frames[3]) > 1 << 16 or len(frames[4]) > 16 << 20:
            raise TallyRejected("malformed TALLY")
        token = bytes(frames[1])
        try:
            raw = unpack(frames[2])
            sizes = unpack(frames[3])
            access = checked_access(unpack(frames[4]))
        except TallyRejected:
            raise
        except Exception:
            raise TallyRejected("TALLY is not msgpack") from None
        model = worker.model
        batching = model.config.batching
        largest = batching.max_batch_size if batching is not None else 1
        if not isinstance(sizes, list) or len(sizes) > largest or not all(
            isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and 1 <= pair[0] <= largest and type(pair[1]) is int and 0 <= pair[1] < 1 << 48 for pair in sizes
        ):
            raise TallyRejected("batch sizes out of bounds")
        if raw is not None:
            self.accountant.merge(raw, model.name, model.version)  # checked whole before anything is added
        for size, n in sizes:
            model.batch_sizes[size] = model.batch_sizes.get(size, 0) + n
        if raw is not None:
            for name, version, exported in raw["models"]:
                worker.tasks_served += exported[0]
                if exported[1]:
                    worker.model.consecutive_crashes = 0
        if token and token == str(self._flush_token).encode() and worker.worker_id in self._flush_waiting:
            self._flush_waiting.discard(worker.worker_id)
            if not self._flush_waiting:
                self._finish_flush()
        return access

    def flush(self, workers: list[WorkerHandle], send: Callable[[WorkerHandle, list[Any]], bool], then: Callable[[], None]) -> None:
        """Ask every worker with an endpoint for its counts; `then()` once all answered (or after
        FLUSH_WAIT_NS). Flushes asked for meanwhile share the one in progress."""
        self._flush_callbacks.append(then)
        if self._flush_waiting:
            return
        self._flush_token += 1
        token = str(self._flush_token).encode()
        for worker in workers:
            if worker.direct_address and worker.state in (WorkerState.READY, WorkerState.BUSY) and not worker.retired and send(worker, [messages.FLUSH, token]):
                self._flush_waiting.add(worker.worker_id)
        if not self._flush_waiting:
            self._finish_flush()
            return
        expected = self._flush_token
        self.timers.call_at(time.monotonic_ns() + FLUSH_WAIT_NS, lambda: self._flush_timed_out(expected))

    def _flush_timed_out(self, token: int) -> None:
        if token == self._flush_token and self._flush_waiting:
            log.info("workers did not hand over their counts in time; reporting without them", extra={"workers": sorted(self._flush_waiting)})
            self._finish_flush()

    def _finish_flush(self) -> None:
        self._flush_waiting.clear()
        callbacks, self._flush_callbacks = self._flush_callbacks, []
        for callback in callbacks:
            callback()

    # -- deadlines ------------------------------------------------------------------------------------
    @staticmethod
    def overdue(workers: list[WorkerHandle], now_ns: int) -> list[tuple[WorkerHandle, int]]:
        """Workers whose direct run has passed its deadline: (worker, how long it has run, ns)."""
        late = []
        for worker in workers:
            page = worker.page
            if page is None or worker.retired:
                continue
            since, deadline = page.read()
            if deadline and now_ns > deadline + OVERDUE_GRACE_NS:
                late.append((worker, now_ns - since))
        return late

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


AccessRecord = tuple[int, str, str, dict[str, float]]  # request id, client, code ("OK" or an error code), timing
_TIMING_KEYS = frozenset(f"{stage}_us" for stage in (*STAGES, "cpu"))


def checked_access(raw: Any) -> list[AccessRecord]:
    """A worker's access records: [[request id, client key, code, {stage_us: float}], ...], at most
    messages.MAX_ACCESS_RECORDS; anything else raises TallyRejected (nothing is logged from it)."""
    if not isinstance(raw, list) or len(raw) > messages.MAX_ACCESS_RECORDS:
        raise TallyRejected("access records out of bounds")
    records = []
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise TallyRejected("malformed access record")
        request_id, client, code, timing = entry
        if type(request_id) is not int or not 0 <= request_id < 1 << 64 or not isinstance(client, str) or not CLIENT_KEY.fullmatch(client):
            raise TallyRejected("access record with a bad id or client")
        if code != "OK" and code not in ERROR_CODES:
            raise TallyRejected("access record with an unknown code")
        if not isinstance(timing, dict) or not all(k in _TIMING_KEYS and type(v) in (int, float) and 0 <= v < 1e12 for k, v in timing.items()):
            raise TallyRejected("access record with a bad timing")
        records.append((request_id, client, code, timing))
    return records


def _endpoint_dir(socket_path: Path, settings: Settings) -> Path | None:
    """`PATH.d`, beside the public socket: created fresh (we hold the socket's lock, so what is there
    was left by a daemon that is gone), private to the daemon but for the access the socket itself gives."""
    directory = socket_path.with_name(socket_path.name + ".d")
    if len(os.fsencode(str(directory / "w4294967295.sock"))) > _SOCKET_PATH_MAX:
        log.warning("no direct path: the worker endpoints' paths would not fit a Unix socket address", extra={"dir": str(directory)})
        return None
    try:
        st = os.lstat(directory)
        if stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(directory)
        else:
            os.unlink(directory)
    except FileNotFoundError:
        pass
    mode = settings.server.socket_mode
    dir_mode = 0o700 | (0o050 if mode & 0o060 else 0) | (0o005 if mode & 0o006 else 0)
    os.mkdir(directory, 0o700)
    if settings.server.socket_group:
        os.chown(directory, -1, grp.getgrnam(settings.server.socket_group).gr_gid, follow_symlinks=False)
    os.chmod(directory, dir_mode)
    return directory

