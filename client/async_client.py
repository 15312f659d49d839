"""asyncio client: many coroutines may share one `AsyncClient`; replies are matched to callers by id."""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import zmq
import zmq.asyncio

from openinfer.wire.errors import DeadlineExceeded, Unavailable, error_from_wire
from openinfer.wire.protocol import encode_infer_request, encode_op_request, resolve_address, retry_pause, unpack
from .result import InferResult, result_from_reply
from openinfer.wire.tensors import BF16Array
from .socket_setup import configure_client_socket
from .sync_client import DEFAULT_TIMEOUT_S


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
    ) -> None:
        self.address = resolve_address(address)
        # Retry policy: only UNAVAILABLE (daemon unreachable, draining, model not serving) is retried, with
        # exponential backoff from 50 ms, within the call's timeout. A request that failed with
        # WORKER_CRASHED is never retried: a poison input would kill the next worker too.
        self.retries = retries
        self.timeout = timeout
        self.client_name = client_name
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        configure_client_socket(self._socket, curve_server_key=curve_server_key, curve_keypair=curve_keypair)
        self._socket.connect(self.address)
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray | BF16Array],
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> InferResult:
        budget = self.timeout if timeout is None else timeout
        request_id = next(self._ids)
        frames = encode_infer_request(
            request_id,
            model,
            inputs,
            version=version,
            outputs=outputs,
            timeout_ms=max(1, int(budget * 1000)),
            client_name=self.client_name,
            priority=priority,
        )
        started = time.perf_counter_ns()
        deadline = time.monotonic() + budget
        for attempt in range(self.retries + 1):
            try:
                header, reply = await self._round_trip(request_id, frames, max(0.001, deadline - time.monotonic()))
                return result_from_reply(header, reply, (time.perf_counter_ns() - started) / 1000.0)
            except Unavailable:
                pause = retry_pause(attempt, self.retries, deadline, time.monotonic())
                if pause is None:
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def models(self) -> list[dict[str, Any]]:
        return (await self._call("models"))["models"]

    async def metadata(self, model: str, version: int | None = None) -> dict[str, Any]:
        return await self._call("metadata", model=model, version=version)

    async def status(self) -> dict[str, Any]:
        return await self._call("status")

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def health(self) -> dict[str, Any]:
        return await self._call("health")

    async def close(self) -> None:
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
        self._socket.close(linger=0)
        self._context.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        if self.client_name:
            fields["client"] = self.client_name
        header, _ = await self._round_trip(request_id, encode_op_request(request_id, op, **fields), self.timeout)
        if "error" in header:
            raise error_from_wire(header["error"])
        return header.get("result") or {}

    async def _round_trip(self, request_id: int, frames: list[Any], timeout: float) -> tuple[dict[str, Any], list[Any]]:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        future: asyncio.Future[tuple[dict[str, Any], list[Any]]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        deadline = time.monotonic() + timeout
        try:
            await self._send(frames, deadline)
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await self._send_cancel(request_id)
            raise DeadlineExceeded(f"no reply from {self.address} within {timeout:.3g} s") from None
        finally:
            self._pending.pop(request_id, None)

    async def _send(self, frames: list[Any], deadline: float) -> None:
        while True:
            try:
                await self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"daemon not reachable at {self.address}") from None
                await asyncio.sleep(0.005)

    async def _send_cancel(self, request_id: int) -> None:
        try:
            await self._socket.send_multipart(encode_op_request(next(self._ids), "cancel", target=request_id), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    async def _read_replies(self) -> None:
        while True:
            reply = await self._socket.recv_multipart(copy=False)
            try:
                header = unpack(reply[0].buffer)
            except Exception:
                continue
            rid = header.get("id") if isinstance(header, dict) else None
            future = self._pending.get(rid) if isinstance(rid, int) else None
            if future is not None and not future.done():
                future.set_result((header, reply))
