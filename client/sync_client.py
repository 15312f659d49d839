"""Blocking client.

A `Client` holds one ZeroMQ DEALER socket to the front door (the daemon's socket: every operation, and
the fallback for `infer`) and, on ipc://, direct connections to the workers of the models it uses
(docs/PROTOCOL.md section 17): `infer` goes to a worker in one hop under a lease the front door issued.
Calls on one `Client` are serialised by a lock, so sharing it between threads is safe but not
concurrent; for parallel requests give each thread its own `Client` or use `AsyncClient`.
"""
from __future__ import annotations

import select
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
import zmq

from openinfer.wire.errors import OpenInferError, Unavailable
from openinfer.wire.protocol import retry_pause
from openinfer.wire.tensors import BF16Array
from openinfer.wire.zmtp import PeerClosed

from .core import DEFAULT_TIMEOUT_S, ClientCore, dropped
from .direct import DEFAULT_MAX_REPLY_BYTES, DirectLink, Lease, NoDirectPath, answer_pending, attach_frames, check_request_size, connect, lease_expired, read_replies
from .result import InferResult, result_from_reply
from .socket_setup import configure_client_socket

__all__ = ["Client", "DEFAULT_TIMEOUT_S"]


class Client:
    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        client_name: str | None = None,
        curve_server_key: bytes | None = None,
        curve_keypair: tuple[bytes, bytes] | None = None,
        retries: int = 0,
        direct: bool = True,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        """`direct=False` sends every request through the front door (the v1 path). `max_reply_bytes`:
        the largest reply frame this client takes (PROTOCOL.md 2.4; default 1 GiB, the daemon's default
        server.max_worker_message_bytes, which bounds every reply frame it sends): a frame over it closes
        the connection, and the request in flight fails UNAVAILABLE naming this limit, rather than the
        client taking whatever a daemon (or a fake one) sends into memory. A worker's replies on the
        direct path are held to the smaller of this and the lease's max_reply_bytes."""
        self._core = core = ClientCore(address, timeout, client_name, retries, direct, curve_server_key is not None, max_reply_bytes)
        self.address = core.address
        self.timeout = timeout
        self.client_name = client_name
        self.retries = retries
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        configure_client_socket(self._socket, max_reply_bytes=max_reply_bytes, curve_server_key=curve_server_key, curve_keypair=curve_keypair)
        # A socket monitor tells a waiting call that the connection dropped (the daemon cut it or went
        # away): its reply cannot come, so it fails at once instead of at its timeout.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._socket.connect(self.address)
        self._lock = threading.Lock()

    # -- public API -------------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray | BF16Array | bytes | str],
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> InferResult:
        core = self._core
        budget = self.timeout if timeout is None else timeout
        request_id = core.next_id()
        frames = core.infer_frames(request_id, model, inputs, version, outputs, budget, priority)
        started = time.perf_counter_ns()
        deadline = time.monotonic() + budget
        if not self._lock.acquire(False):  # (free, as it nearly always is: no call to _take_lock)
            self._take_lock(budget)
        try:
            if core.direct:
                try:
                    header, reply = self._direct_round_trip(model, version, request_id, frames, budget, deadline)
                    return result_from_reply(header, reply, (time.perf_counter_ns() - started) / 1000.0)
                except NoDirectPath as exc:
                    if time.monotonic() >= deadline:  # not a 1 ms request to the front door
                        raise core.no_time_left(exc, budget) from None
            if core.needs_door_limits(frames):
                self._ask_door_limits()
            core.check_door_size(frames)
            for attempt in range(self.retries + 1):
                try:
                    header, reply = self._round_trip(request_id, frames, max(0.001, deadline - time.monotonic()))
                    return result_from_reply(header, reply, (time.perf_counter_ns() - started) / 1000.0)
                except Unavailable as exc:
                    pause = retry_pause(attempt, self.retries, deadline, time.monotonic())
                    if pause is None or not core.retryable(exc):
                        raise
                    time.sleep(pause)
        finally:
            self._lock.release()
        raise AssertionError("unreachable")

    def models(self) -> list[dict[str, Any]]:
        return self._call("models").get("models", [])  # (a reply without them, from a fake or broken daemon: none)

    def metadata(self, model: str, version: int | None = None) -> dict[str, Any]:
        return self._call("metadata", model=model, version=version)

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def health(self) -> dict[str, Any]:
        return self._call("health")

    def reload(self) -> dict[str, Any]:
        return self._call("reload")

    def close(self) -> None:
        if self._socket.closed:
            return  # closed already: a second close is a no-op
        self._core.close_links()
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the front door ---------------------------------------------------------------------------
    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        self._take_lock(self.timeout)
        try:
            return self._call_locked(op, fields)
        finally:
            self._lock.release()

    def _take_lock(self, budget: float) -> None:
        """The client's one request at a time: another thread's request is waited for no longer than this
        call's own timeout."""
        if not self._lock.acquire(False) and not self._lock.acquire(timeout=min(max(0.0, budget), threading.TIMEOUT_MAX)):
            raise self._core.unsent(budget, "another thread's request held this client all along (a Client sends one request at a time: give each thread its own, or use AsyncClient)")

    def _call_locked(self, op: str, fields: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        request_id = self._core.next_id()
        header, _ = self._round_trip(request_id, self._core.op_frames(request_id, op, fields), self.timeout if timeout is None else timeout)
        return self._core.op_result(header)

    def _ask_door_limits(self) -> None:
        try:
            self._core.door_limits_from(self._call_locked("health", {}))
        except Unavailable:
            raise
        except OpenInferError:  # health not granted to this client: the daemon's answer decides
            self._core.door_limits = {}

    def _round_trip(self, request_id: int, frames: list[Any], timeout: float) -> tuple[dict[str, Any], list[Any]]:
        deadline = time.monotonic() + self._core.wait_s(timeout)
        self._dropped()  # drops before this request are not its concern
        self._send(frames, time.monotonic() + timeout)
        lost = False
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            ready = dict(self._poller.poll(0 if lost else max(0, remaining_ms)))
            if self._socket not in ready:
                if lost:  # nothing left that arrived before the drop
                    raise self._core.connection_lost()
                if self._monitor in ready:
                    lost = self._dropped()
                    continue
                if remaining_ms > 0:
                    continue
                self._send_cancel(request_id)
                raise self._core.timed_out(timeout)
            reply = self._socket.recv_multipart(copy=False)
            header = self._core.reply_header(reply[0].buffer)  # one request in flight: an undecodable reply fails it
            if isinstance(header, dict) and header.get("id") == request_id:
                return header, reply
            # A late reply to a request we already gave up on: drop it.

    def _dropped(self) -> bool:
        return dropped(lambda: self._monitor.recv_multipart(zmq.NOBLOCK))

    def _send(self, frames: list[Any], deadline: float) -> None:
        # IMMEDIATE=1 makes send fail (EAGAIN) while no daemon is connected, so a down daemon is reported
        # as UNAVAILABLE instead of the request sitting in a queue.
        while True:
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"daemon not reachable at {self.address}") from None
                time.sleep(0.005)

    def _send_cancel(self, request_id: int) -> None:
        try:
            self._socket.send_multipart(self._core.op_frames(self._core.next_id(), "cancel", {"target": request_id}), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # best effort: the daemon also drops the task when its own timeout passes

    # -- the direct path --------------------------------------------------------------------------
    def _direct_round_trip(self, model: str, version: int | None, request_id: int, frames: list[Any], budget: float, deadline: float) -> tuple[dict[str, Any], list[Any]]:
        core = self._core
        for _ in range(2):  # a lease revoked under us (a reload) is renewed once
            lease = self._lease(model, version, deadline)
            check_request_size(frames, lease)
            link = self._link(lease, budget, deadline)
            header, reply = self._exchange(link, request_id, frames, budget, deadline, lease)
            if not lease_expired(header):
                core.answered(link.address, header)
                return header, reply
            core.leases.pop((model, version), None)
        raise NoDirectPath("the lease kept expiring")

    def _lease(self, model: str, version: int | None, deadline: float) -> Lease:
        core = self._core
        key = (model, version)
        lease = core.leases.get(key)
        now = time.monotonic_ns()
        if lease is not None and lease.fresh(now):
            return lease
        fields: dict[str, Any] = {"model": model} if version is None else {"model": model, "version": version}
        try:
            result = self._call_locked("lease", fields, core.lease_wait_s(deadline))
        except OpenInferError as exc:
            core.lease_refused(exc)
        return core.lease_taken(key, result, now)

    def _link(self, lease: Lease, budget: float, deadline: float) -> DirectLink:
        core = self._core
        core.tidy_links()
        address = core.pick_address(lease)
        if address is None:
            core.leases.pop((lease.model, lease.version), None)
            raise NoDirectPath("every worker of the lease is retiring, or running a request this client gave up on")
        # An idle link is not read before the send: that recv failed with EAGAIN on nearly every request,
        # and the exception cost about a fifth of the client's CPU at c = 1 (bench/README.md, session 9).
        # A GOAWAY that came meanwhile is read with the reply (the retiring worker still answers what is
        # sent), and a worker that closed the link makes the send fail (_exchange).
        link = core.links.get(address)
        if link is None:
            try:
                link = core.links[address] = connect(address, max(0.001, deadline - time.monotonic()))
            except Unavailable:
                if time.monotonic() >= deadline:  # a worker that runs what it cannot stop answers no handshake
                    raise core.unsent(budget, f"the worker at {address} did not complete the connection (it is busy, or stopped)") from None
                core.unreachable(address)
                return self._link(lease, budget, deadline)  # another worker of the lease, else NoDirectPath
        if link.attached_ns != lease.expires_ns:
            request_id = core.next_id()
            header, _ = self._exchange(link, request_id, attach_frames(request_id, lease), budget, deadline)
            core.attached(link, lease, header)
        return link

    def _exchange(self, link: DirectLink, request_id: int, frames: list[Any], budget: float, deadline: float, lease: Lease | None = None) -> tuple[dict[str, Any], list[Any]]:
        """Send on a worker's connection and wait for this request's reply."""
        core = self._core
        pending = core.register(link, request_id, deadline, lease)
        give_up = core.give_up_at(deadline, budget)
        stream = link.stream
        sock = stream.sock
        try:
            try:
                stream.send(frames)
            except PeerClosed:  # closed while idle (retired, or died): nothing was sent, so it may go elsewhere
                pending.error = NoDirectPath(f"the worker at {link.address} had closed the connection; the request was not sent")
                raise
            while pending.reply is None and pending.error is None:
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    self._direct_cancel(link, request_id)
                    core.gave_up(link, request_id)
                    raise core.timed_out(budget, direct=True)
                if stream.out_bytes:
                    select.select([sock], [sock], [], remaining)
                    stream.flush()
                elif not select.select([sock], [], [], remaining)[0]:
                    continue
                for header, reply in read_replies(link):
                    answer_pending(link, header, reply)
                if link.broken is not None:  # a reply came that no request can be told from
                    raise PeerClosed()
        except PeerClosed:
            core.link_lost(link)
        finally:
            link.pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _direct_cancel(self, link: DirectLink, request_id: int) -> None:
        try:
            link.stream.send(self._core.op_frames(self._core.next_id(), "cancel", {"target": request_id}))
        except (PeerClosed, OSError):
            pass

