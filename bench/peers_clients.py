"""The Python clients a user would write, as one load generator for bench/peers.py.

One spawned process, one asyncio event loop, `c` coroutines each in a closed loop (request, await the
reply, next request), on the same loop for both servers:
  "http URL"               aiohttp: one ClientSession, POST the raw float32 body, read the raw reply
  "openinfer ADDRESS"      openinfer.client.AsyncClient (the direct path when the daemon grants a lease)
  "openinfer-door ADDRESS" AsyncClient(direct=False): every request through the front door
The target is one string ("KIND ADDRESS"), so the pool keeps loadgen.SharedLoopsPool's contract
(prepare/run -> loadgen.RunResult). OpenInfer replies bring their server `timing`, which tells which path
served them (the direct path has no `dispatch_us`, docs/PROTOCOL.md 17.4).
"""
from __future__ import annotations

import asyncio
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Awaitable, Callable

import numpy as np

from loadgen import SharedLoopsPool, WindowTally

MODEL = "tiny"
WARMUP_PER_LOOP = 20  # requests per coroutine when a (target, c) is first seen: connections, caches
# One request: returns the server's timing (OpenInfer) or None (HTTP); raises Failed for a failed reply.
Call = Callable[[], Awaitable[dict[str, float] | None]]


class Failed(Exception):
    """A request answered with an error: counted under `code`, not as a latency."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class PythonClients(SharedLoopsPool):
    """One spawned process with an event loop; targets are "KIND ADDRESS" strings (see the module doc)."""

    def __init__(self) -> None:
        super().__init__(1, _client_main, lambda index: (), "bench-peers-python")


def _client_main(conn: Connection) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    body = np.ones((1, 64), dtype=np.float32)  # what wrk and cwire send
    calls: dict[str, Call] = {}
    closers: list[Callable[[], Awaitable[None]]] = []
    warmed: set[tuple[str, int]] = set()
    conn.send("hello")
    while True:
        command = conn.recv()
        if command[0] == "quit":
            for close in closers:
                loop.run_until_complete(close())
            loop.close()
            return
        try:
            target = command[1]
            if target not in calls:
                calls[target] = loop.run_until_complete(_make_call(target, body, closers))
            if command[0] == "prepare":
                conn.send("ok")
                continue
            loops = command[2]
            if (target, loops) not in warmed:  # c connections / links exist before the window opens
                loop.run_until_complete(_warm_up(calls[target], loops))
                warmed.add((target, loops))
            conn.send(loop.run_until_complete(_closed_loops(calls[target], *command[2:])))
        except Exception:
            conn.send({"failure": traceback.format_exc()})


async def _make_call(target: str, body: np.ndarray, closers: list[Callable[[], Awaitable[None]]]) -> Call:
    kind, address = target.split(" ", 1)
    if kind == "http":
        return await _http_call(address, body.tobytes(), closers)
    if kind in ("openinfer", "openinfer-door"):
        return _openinfer_call(address, body, kind == "openinfer", closers)
    raise ValueError(f"unknown target kind {kind!r}")


async def _http_call(url: str, body: bytes, closers: list[Callable[[], Awaitable[None]]]) -> Call:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=10))
    closers.append(session.close)
    headers = {"Content-Type": "application/octet-stream"}

    async def call() -> None:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise Failed(f"HTTP_{response.status}")

    return call


def _openinfer_call(address: str, body: np.ndarray, direct: bool, closers: list[Callable[[], Awaitable[None]]]) -> Call:
    from openinfer.client import AsyncClient, OpenInferError

    client = AsyncClient(address, timeout=10.0, direct=direct)
    closers.append(client.close)
    inputs = {"x": body}

    async def call() -> dict[str, float]:
        try:
            return (await client.infer(MODEL, inputs)).timing
        except OpenInferError as exc:
            raise Failed(exc.code) from None

    return call


async def _warm_up(call: Call, loops: int) -> None:
    async def one() -> None:
        for _ in range(WARMUP_PER_LOOP):
            await call()

    await asyncio.gather(*(one() for _ in range(loops)))


async def _closed_loops(call: Call, loops: int, start_ns: int, measure_ns: int, end_ns: int) -> dict[str, Any]:
    """`loops` coroutines back to back until end_ns; requests sent and answered inside the window count."""
    now = time.monotonic_ns
    delay = (start_ns - now()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    tally = WindowTally(measure_ns, end_ns)

    async def one_loop() -> None:
        while True:
            t0 = now()
            try:
                timing, code = await call(), None
            except Failed as exc:
                timing, code = None, exc.code
            t1 = now()
            tally.add(t0, t1, timing, code)
            if t1 >= end_ns:
                return

    await asyncio.gather(*(one_loop() for _ in range(loops)))
    return tally.result()
