"""Blocking client.

A `Client` owns one ZeroMQ DEALER socket. Calls on one `Client` are serialised by a lock, so sharing it
between threads is safe but not concurrent; for parallel requests give each thread its own `Client`
(cheap) or use `AsyncClient`, which multiplexes many in-flight requests over one socket.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
import zmq

from openinfer.wire.errors import DeadlineExceeded, Unavailable, error_from_wire
from openinfer.wire.protocol import encode_infer_request, encode_op_request, resolve_address, retry_pause, unpack
from .result import InferResult, result_from_reply
from openinfer.wire.tensors import BF16Array
from .socket_setup import configure_client_socket

DEFAULT_TIMEOUT_S = 30.0


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
    ) -> None:
        self.address = resolve_address(address)
        # Retry policy: only UNAVAILABLE (daemon unreachable, draining, model not serving) is retried, with
        # exponential backoff from 50 ms, within the call's timeout. A request that failed with
        # WORKER_CRASHED is never retried: a poison input would kill the next worker too.
        self.retries = retries
        self.timeout = timeout
        self.client_name = client_name
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        configure_client_socket(self._socket, curve_server_key=curve_server_key, curve_keypair=curve_keypair)
        self._socket.connect(self.address)
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)
        self._lock = threading.Lock()

    # -- public API -------------------------------------------------------------------------------
    def infer(
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
                header, reply = self._round_trip(request_id, frames, max(0.001, deadline - time.monotonic()))
                return result_from_reply(header, reply, (time.perf_counter_ns() - started) / 1000.0)
            except Unavailable:
                pause = retry_pause(attempt, self.retries, deadline, time.monotonic())
                if pause is None:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")

    def models(self) -> list[dict[str, Any]]:
        return self._call("models")["models"]

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
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        if self.client_name:
            fields["client"] = self.client_name
        header, _ = self._round_trip(request_id, encode_op_request(request_id, op, **fields), self.timeout)
        if "error" in header:
            raise error_from_wire(header["error"])
        return header.get("result") or {}

    def _round_trip(self, request_id: int, frames: list[Any], timeout: float) -> tuple[dict[str, Any], list[Any]]:
        deadline = time.monotonic() + timeout
        with self._lock:
            self._send(frames, deadline)
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                    self._send_cancel(request_id)
                    raise DeadlineExceeded(f"no reply from {self.address} within {timeout:.3g} s")
                reply = self._socket.recv_multipart(copy=False)
                header = unpack(reply[0].buffer)
                if isinstance(header, dict) and header.get("id") == request_id:
                    return header, reply
                # A late reply to a request we already gave up on: drop it.

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
            self._socket.send_multipart(encode_op_request(next(self._ids), "cancel", target=request_id), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # best effort: the daemon also drops the task when its own timeout passes
