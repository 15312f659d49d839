"""asyncio client: many coroutines may share one `AsyncClient`; replies are matched to callers by id.

The front door (every operation; the fallback for `infer`) is a ZeroMQ DEALER; on ipc://, `infer` goes
straight to a model's workers under a lease (docs/PROTOCOL.md section 17), over direct connections the
event loop reads as their replies arrive. The decisions are the blocking client's (client/core.py).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping, Sequence, cast

import numpy as np
import zmq
import zmq.asyncio

from openinfer.wire.errors import InvalidArgument, OpenInferError, Unavailable
from openinfer.wire.protocol import retry_pause
from openinfer.wire.tensors import BF16Array
from openinfer.wire.zmtp import PeerClosed

from .core import DEFAULT_TIMEOUT_S, ClientCore, dropped
from .direct import DEFAULT_MAX_REPLY_BYTES, DirectLink, Lease, NoDirectPath, answer_pending, attach_frames, check_request_size, handshake_step, lease_expired, read_replies, start_connect
from .give_up_timer import GiveUpTimer
from .result import InferResult, result_from_reply
from .socket_setup import configure_client_socket

_CLOSED = object()  # AsyncClient._loop of a closed client


class AsyncClient:
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
        """The arguments are `Client`'s: `direct=False` sends every request through the front door (the
        v1 path); `max_reply_bytes` is the largest reply frame this client takes (PROTOCOL.md 2.4)."""
        self._core = core = ClientCore(address, timeout, client_name, retries, direct, curve_server_key is not None, max_reply_bytes)
        self.address = core.address
        self.timeout = timeout
        self.client_name = client_name
        self.retries = retries
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        configure_client_socket(self._socket, max_reply_bytes=max_reply_bytes, curve_server_key=curve_server_key, curve_keypair=curve_keypair)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # a dropped connection fails its requests at once
        self._socket.connect(self.address)
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}  # by request id on direct links
        self._give_up = GiveUpTimer(self._gave_up)  # ends each of those waits at its own time
        self._lease_locks: dict[tuple[str, int | None], asyncio.Lock] = {}
        self._link_locks: dict[str, asyncio.Lock] = {}
        # The event loop the client first ran on; _CLOSED once closed. Its readers and timers live there.
        self._loop: asyncio.AbstractEventLoop | object | None = None

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray | BF16Array | bytes | str],
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> InferResult:
        if self._loop is not asyncio.get_running_loop():
            self._bind_loop()
        core = self._core
        budget = self.timeout if timeout is None else timeout
        request_id = core.next_id()
        frames = core.infer_frames(request_id, model, inputs, version, outputs, budget, priority)
        started = time.perf_counter_ns()
        deadline = time.monotonic() + budget
        if core.direct:
            try:
                header, reply = await self._direct_round_trip(model, version, request_id, frames, budget, deadline)
                return result_from_reply(header, reply, (time.perf_counter_ns() - started) / 1000.0)
            except NoDirectPath as exc:
                self._check_open()  # closed meanwhile: the lease request failed for that, not the daemon
                if time.monotonic() >= deadline:  # not a 1 ms request to the front door
                    raise core.no_time_left(exc, budget) from None
        if core.needs_door_limits(frames):
            await self._ask_door_limits()
        core.check_door_size(frames)
        for attempt in range(self.retries + 1):
            try:
                header, reply = await self._round_trip(request_id, frames, max(0.001, deadline - time.monotonic()))
                return result_from_reply(header, reply, (time.perf_counter_ns() - started) / 1000.0)
            except Unavailable as exc:
                pause = retry_pause(attempt, self.retries, deadline, time.monotonic())
                if pause is None or not core.retryable(exc):
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def models(self) -> list[dict[str, Any]]:
        return (await self._call("models")).get("models", [])  # (a reply without them, from a fake or broken daemon: none)

    async def metadata(self, model: str, version: int | None = None) -> dict[str, Any]:
        return await self._call("metadata", model=model, version=version)

    async def status(self) -> dict[str, Any]:
        return await self._call("status")

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def health(self) -> dict[str, Any]:
        return await self._call("health")

    async def reload(self) -> dict[str, Any]:
        return await self._call("reload")

    async def close(self) -> None:
        if self._socket.closed or self._loop is _CLOSED:
            return  # closed, or closing: a second close is a no-op
        self._loop = _CLOSED  # what is still taking a lease or connecting fails when it resumes
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable("client closed"))
        self._pending.clear()
        for link in list(self._core.links.values()):
            self._unwatch(link)
        self._core.close_links()
        self._wake_all()
        self._give_up.stop()
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._context.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the front door ---------------------------------------------------------------------------
    def _bind_loop(self) -> None:
        """First use: the client belongs to this event loop from now on. A closed client, or one used from
        a second loop (a second asyncio.run), refuses: its connections' readers, its front-door reader
        and its timers live on the first loop, and replies would never be read (a caller's mistake)."""
        self._check_open()
        if self._loop is not None:
            raise InvalidArgument("this AsyncClient belongs to the event loop it was first used on (an earlier asyncio.run): create one per event loop")
        self._loop = asyncio.get_running_loop()

    def _check_open(self) -> None:
        if self._loop is _CLOSED:
            raise Unavailable("client closed")

    async def _call(self, op: str, within: float | None = None, **fields: Any) -> dict[str, Any]:
        if self._loop is not asyncio.get_running_loop():
            self._bind_loop()
        request_id = self._core.next_id()
        fields = {k: v for k, v in fields.items() if v is not None}
        header, _ = await self._round_trip(request_id, self._core.op_frames(request_id, op, fields), self.timeout if within is None else within)
        return self._core.op_result(header)

    async def _ask_door_limits(self) -> None:
        try:
            self._core.door_limits_from(await self._call("health"))
        except Unavailable:
            raise
        except OpenInferError:  # health not granted to this client: the daemon's answer decides
            self._core.door_limits = {}

    async def _round_trip(self, request_id: int, frames: list[Any], timeout: float) -> tuple[dict[str, Any], list[Any]]:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        future: asyncio.Future[tuple[dict[str, Any], list[Any]]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        send_deadline = time.monotonic() + timeout
        try:
            await self._send(frames, send_deadline)
            return await asyncio.wait_for(future, max(0.0, send_deadline - time.monotonic() + self._core.wait_s(timeout) - timeout))
        except asyncio.TimeoutError:
            await self._send_cancel(request_id)
            raise self._core.timed_out(timeout) from None
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by close() while the send waited: answered by what was raised

    async def _send(self, frames: list[Any], deadline: float) -> None:
        while True:
            self._check_open()  # (closed during the pause below: the socket is gone)
            try:
                await self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"daemon not reachable at {self.address}") from None
                await asyncio.sleep(0.005)

    async def _send_cancel(self, request_id: int) -> None:
        try:
            await self._socket.send_multipart(self._core.op_frames(self._core.next_id(), "cancel", {"target": request_id}), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    async def _read_replies(self) -> None:
        """Replies to their callers; when the monitor reports the connection dropped, what arrived before
        the drop is still delivered and every other front-door request fails at once."""
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            if self._socket in ready:
                self._deliver_ready()
            if self._monitor in ready and self._dropped():
                self._deliver_ready()
                lost = self._core.connection_lost()
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(lost)

    def _deliver_ready(self) -> None:
        while True:
            try:
                reply = cast("asyncio.Future[list[Any]]", self._socket.recv_multipart(zmq.NOBLOCK, copy=False)).result()  # NOBLOCK: already done
            except zmq.Again:
                return
            try:
                header = self._core.reply_header(reply[0].buffer)
            except OpenInferError as exc:
                self._fail_pending(exc)
                continue
            rid = header.get("id") if isinstance(header, dict) else None
            future = self._pending.get(rid) if isinstance(rid, int) else None
            if future is not None and not future.done():
                future.set_result((header, reply))

    def _fail_pending(self, exc: OpenInferError) -> None:
        """A reply that does not decode names no request: whichever it answers, the daemon is broken (or
        not one), so every front-door request waiting now fails with it instead of at its timeout."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)

    def _dropped(self) -> bool:
        return dropped(lambda: cast("asyncio.Future[list[bytes]]", self._monitor.recv_multipart(zmq.NOBLOCK)).result())  # NOBLOCK: already done

    # -- the direct path --------------------------------------------------------------------------
    async def _direct_round_trip(self, model: str, version: int | None, request_id: int, frames: list[Any], budget: float, deadline: float) -> tuple[dict[str, Any], list[Any]]:
        core = self._core
        for _ in range(2):  # a lease revoked under us (a reload) is renewed once
            # The common case - a fresh lease, a connected and attached link - awaits nothing before the
            # send: each coroutine (and lock) on the way costs every request.
            lease = core.leases.get((model, version))
            if lease is None or not lease.fresh(time.monotonic_ns()):
                lease = await self._lease(model, version, budget, deadline)
                self._check_open()  # closed while it waited
            check_request_size(frames, lease)
            address = self._address(lease)
            link = core.links.get(address)
            if link is None or link.attached_ns != lease.expires_ns:
                link = await self._link(lease, address, budget, deadline)
                self._check_open()  # closed while it waited: the link is closed too
            header, reply = await self._exchange(link, request_id, frames, budget, deadline, lease)
            if not lease_expired(header):
                core.answered(link.address, header)
                return header, reply
            core.leases.pop((model, version), None)
        raise NoDirectPath("the lease kept expiring")

    async def _lease(self, model: str, version: int | None, budget: float, deadline: float) -> Lease:
        core = self._core
        key = (model, version)
        lease = core.leases.get(key)
        if lease is not None and lease.fresh(time.monotonic_ns()):
            return lease
        lock = self._lease_locks.setdefault(key, asyncio.Lock())
        if not await _take_turn(lock, deadline):  # many coroutines, one lease request
            raise core.unsent(budget, f"another request of this client was still asking the daemon for a lease on {model!r}")
        try:
            lease = core.leases.get(key)
            now = time.monotonic_ns()
            if lease is not None and lease.fresh(now):
                return lease
            fields: dict[str, Any] = {"model": model} if version is None else {"model": model, "version": version}
            try:
                result = await self._call("lease", core.lease_wait_s(deadline), **fields)
            except OpenInferError as exc:
                core.lease_refused(exc)
                raise
            return core.lease_taken(key, result, now)
        finally:
            lock.release()

    def _address(self, lease: Lease) -> str:
        """The lease's worker for the next request (links to retired workers closed first)."""
        core = self._core
        if core.links:
            core.forget_drained(self._unwatch)
        address = core.pick_address(lease)
        if address is None:
            core.leases.pop((lease.model, lease.version), None)
            raise NoDirectPath("every worker of the lease is retiring, or running a request this client gave up on")
        return address

    async def _link(self, lease: Lease, address: str, budget: float, deadline: float) -> DirectLink:
        """The link to `address`, connected and attached to `lease`. A request that finds another one
        connecting or attaching it waits for that, but not past its own deadline: a worker busy with a run
        it cannot stop completes neither until the run ends."""
        core = self._core
        loop = asyncio.get_running_loop()
        lock = self._link_locks.setdefault(address, asyncio.Lock())
        if not await _take_turn(lock, deadline):
            raise core.unsent(budget, f"another request of this client was still connecting to the worker at {address} (it is busy, or stopped)")
        try:
            link = core.links.get(address)
            if link is None:
                try:
                    link = await _connect(address, deadline)
                except Unavailable:
                    if time.monotonic() >= deadline:  # a worker that runs what it cannot stop answers no handshake
                        raise core.unsent(budget, f"the worker at {address} did not complete the connection (it is busy, or stopped)") from None
                    core.unreachable(address)
                    link = None
                else:
                    if self._loop is _CLOSED:  # closed while it connected: nothing may stay open
                        link.stream.close()
                        self._check_open()
                    core.links[address] = link
                    loop.add_reader(link.fd, self._on_readable, link)
            if link is not None and link.attached_ns != lease.expires_ns:
                request_id = core.next_id()
                header, _ = await self._exchange(link, request_id, attach_frames(request_id, lease), budget, deadline)
                core.attached(link, lease, header)
        finally:
            lock.release()
        if link is None:
            return await self._link(lease, self._address(lease), budget, deadline)  # another worker of the lease, else NoDirectPath
        return link

    async def _exchange(self, link: DirectLink, request_id: int, frames: list[Any], budget: float, deadline: float, lease: Lease | None = None) -> tuple[dict[str, Any], list[Any]]:
        core = self._core
        loop = asyncio.get_running_loop()
        pending = core.register(link, request_id, deadline, lease)
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters[request_id] = waiter
        try:
            try:
                link.stream.send(frames)
                if link.stream.out_bytes:
                    loop.add_writer(link.fd, self._on_writable, link)
            except PeerClosed:
                self._lost(link)
            if pending.reply is None and pending.error is None:
                self._give_up.arm(request_id, core.give_up_at(deadline, budget))
                try:
                    await waiter
                except asyncio.TimeoutError:
                    try:
                        link.stream.send(core.op_frames(core.next_id(), "cancel", {"target": request_id}))
                    except (PeerClosed, OSError):
                        pass
                    core.gave_up(link, request_id)
                    raise core.timed_out(budget, direct=True) from None
        finally:
            self._waiters.pop(request_id, None)
            self._give_up.disarm(request_id)
            link.pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _on_readable(self, link: DirectLink) -> None:
        try:
            replies = read_replies(link)
        except PeerClosed:
            self._lost(link)
            return
        for header, reply in replies:
            if answer_pending(link, header, reply):
                self._wake(header["id"])
        if link.broken is not None:  # a reply came that no request can be told from
            self._lost(link)

    def _on_writable(self, link: DirectLink) -> None:
        try:
            if link.stream.flush():
                asyncio.get_running_loop().remove_writer(link.fd)
        except PeerClosed:
            self._lost(link)

    @staticmethod
    def _unwatch(link: DirectLink) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(link.fd)
        loop.remove_writer(link.fd)

    def _lost(self, link: DirectLink) -> None:
        if not link.closed:
            self._unwatch(link)
        waiting = list(link.pending)
        self._core.link_lost(link)
        for rid in waiting:
            self._wake(rid)

    def _gave_up(self, request_id: int) -> None:
        """Its give-up time came with no reply: its wait ends with TimeoutError."""
        waiter = self._waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_exception(asyncio.TimeoutError())

    def _wake(self, request_id: int) -> None:
        waiter = self._waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_all(self) -> None:
        for request_id in list(self._waiters):
            self._wake(request_id)


async def _connect(address: str, deadline: float) -> DirectLink:
    """Connect to a worker and complete the handshake on the event loop, by `deadline`: a cancel or the
    deadline closes the socket at once (a connect in an executor thread could be neither interrupted nor
    closed: a cancelled one was left to the garbage collector)."""
    loop = asyncio.get_running_loop()
    link = start_connect(address)
    fd = link.fd
    try:
        while not handshake_step(link):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"no handshake from the worker at {address}")
            ready: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            watch_out = bool(link.stream.out_bytes)
            loop.add_reader(fd, wake)
            if watch_out:
                loop.add_writer(fd, wake)
            try:
                await asyncio.wait_for(ready, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(fd)
                if watch_out:
                    loop.remove_writer(fd)
    except BaseException:
        link.stream.close()
        raise
    return link


async def _take_turn(lock: asyncio.Lock, deadline: float) -> bool:
    """Acquire `lock`, waiting no later than `deadline` (time.monotonic()); False when it passed first.
    Always through asyncio.wait_for (a task per call; only leases and new links come here): `locked()`
    is False just after a release whose woken waiter has not run yet, and an acquire then queues behind
    that waiter without a bound."""
    try:
        await asyncio.wait_for(lock.acquire(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return False
    return True
