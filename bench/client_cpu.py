"""The Python client's CPU per request on the direct path (issue #17: at most 50 us), next to its floor.

    .venv/bin/python bench/client_cpu.py                 # ~1 min: 5 interleaved rounds
    .venv/bin/python bench/client_cpu.py --rounds 2 --requests 2000
    .venv/bin/python bench/client_cpu.py --plot-only bench/results/client_cpu.json

One sandboxed daemon (`examples/models/tiny`, 2 workers, direct path open). Each round measures, in this
process and in an order reversed every other round: `Client.infer` at c = 1, and `AsyncClient.infer` at
c = 1, 8 and 32 (c coroutines, one event loop) - user + system CPU of the whole process (`getrusage`)
over `requests` calls, divided by them, and the p50 of each call. The floors, in the same rounds: the
same loop as a bare client of the daemon (the request encoder, one sendmsg, one select, one recv, the
reply's header and array; no bookkeeping; and the same waited for through asyncio, AsyncClient's floor
at c = 1), and with nothing but a raw socketpair round trip (256 bytes,
Python on both ends, the client waiting in `select`) against an echo that answers at once and one that
first works `--service-us` (what a worker takes for the tiny model): a client that sleeps for each reply
pays the wake-up in its own CPU, whatever its code. Figures are medians over rounds. Writes
bench/results/client_cpu.json and .png; reports, never asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack
import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import DaemonProcess, add_output_arguments, machine_info, median_of, pyplot, redrawn, world_readable_copy, write_json  # noqa: E402

from openinfer.client import AsyncClient, Client  # noqa: E402
from openinfer.wire.zmtp import message_buffers  # noqa: E402

TARGET_US = 50.0
ASYNC_LEVELS = (1, 8, 32)
OVER_FLOOR = {"Client c=1": "floor: bare loop on the daemon", "AsyncClient c=1": "floor: asyncio bare loop on the daemon"}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # microsecond resolution (os.times() counts 10 ms ticks)
    return usage.ru_utime + usage.ru_stime


def _measure(calls: int, one: Callable[[], Any]) -> dict[str, float]:
    latencies = []
    cpu = _cpu_s()
    for _ in range(calls):
        start = time.perf_counter_ns()
        one()
        latencies.append(time.perf_counter_ns() - start)
    return {"cpu_us": (_cpu_s() - cpu) * 1e6 / calls, "p50_us": statistics.median(latencies) / 1000}


def sync_client(address: str, calls: int) -> dict[str, float]:
    x = np.ones((1, 64), np.float32)
    with Client(address) as client:
        for _ in range(200):
            client.infer("tiny", {"x": x})
        return _measure(calls, lambda: client.infer("tiny", {"x": x}))


def async_client(address: str, calls: int, concurrency: int) -> dict[str, float]:
    x = np.ones((1, 64), np.float32)

    async def run() -> dict[str, float]:
        async with AsyncClient(address) as client:
            latencies: list[int] = []

            async def loop(count: int, keep: bool) -> None:
                for _ in range(count):
                    start = time.perf_counter_ns()
                    await client.infer("tiny", {"x": x})
                    if keep:
                        latencies.append(time.perf_counter_ns() - start)

            await asyncio.gather(*(loop(50, False) for _ in range(concurrency)))
            cpu = _cpu_s()
            await asyncio.gather(*(loop(calls // concurrency, True) for _ in range(concurrency)))
            return {"cpu_us": (_cpu_s() - cpu) * 1e6 / len(latencies), "p50_us": statistics.median(latencies) / 1000}

    return asyncio.run(run())


def _bare_request(client: Client) -> tuple[socket.socket, Callable[[], None], Callable[[list[bytes]], Any]]:
    """For the bare loops: `client`'s one worker connection (it made it, and attached the lease, with a
    first request), a function that sends the next request on it with `Client`'s own encoder, and one
    that turns a reply's frames into its output array (header unpacked, array viewed)."""
    x = np.ones((1, 64), np.float32)
    client.infer("tiny", {"x": x})
    core = client._core
    sock = next(iter(core.links.values())).stream.sock
    ids = iter(range(1 << 40, 1 << 41))

    def send() -> None:
        sock.sendmsg(message_buffers(core.infer_frames(next(ids), "tiny", {"x": x}, None, None, 30.0, None)))

    def output(parts: list[bytes]) -> Any:
        header = msgpack.unpackb(parts[0])
        return np.ndarray(header["outputs"][0]["shape"], np.float32, parts[1])

    return sock, send, output


def bare_loop(address: str, calls: int) -> dict[str, float]:
    """The least a Python client can do per request against the same daemon: `Client`'s own request
    encoder, one sendmsg, a select, recv until the reply is whole, its header unpacked and its output
    viewed as an array - no lease or worker bookkeeping, limits, timeouts or InferResult."""
    with Client(address) as client:
        sock, send, output = _bare_request(client)

        def one() -> Any:
            send()
            data = b""
            while True:
                select.select([sock], [], [], 5.0)
                data += sock.recv(65536)
                parts = _whole_message(data)
                if parts is not None:
                    return output(parts)

        for _ in range(200):
            one()
        return _measure(calls, one)


def asyncio_bare_loop(address: str, calls: int) -> dict[str, float]:
    """bare_loop's request waited for as an asyncio client must (c = 1): a future per request, resolved
    by a reader callback kept on the socket. What asyncio's own machinery costs - two turns of the event
    loop per reply (the callback, then the task's wake-up) - is the floor of AsyncClient at c = 1."""
    with Client(address) as client:
        sock, send, output = _bare_request(client)

        async def run() -> dict[str, float]:
            loop = asyncio.get_running_loop()
            state: dict[str, Any] = {"data": b"", "waiting": None}

            def readable() -> None:
                state["data"] += sock.recv(65536)
                parts = _whole_message(state["data"])
                if parts is not None:
                    state["data"] = b""
                    state["waiting"].set_result(parts)

            async def one() -> Any:
                state["waiting"] = loop.create_future()
                send()
                return output(await state["waiting"])

            loop.add_reader(sock.fileno(), readable)
            try:
                for _ in range(200):
                    await one()
                latencies = []
                cpu = _cpu_s()
                for _ in range(calls):
                    start = time.perf_counter_ns()
                    await one()
                    latencies.append(time.perf_counter_ns() - start)
                return {"cpu_us": (_cpu_s() - cpu) * 1e6 / calls, "p50_us": statistics.median(latencies) / 1000}
            finally:
                loop.remove_reader(sock.fileno())

        return asyncio.run(run())


def _whole_message(data: bytes) -> list[bytes] | None:
    """The frames of one ZMTP message (short and long frames), or None until the last one is in. Not
    openinfer.wire.zmtp.FrameStream on purpose: its generality (limits, commands, partial frames) is part
    of what `Client` costs, and this floor measures the client without it."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        flags = data[pos]
        if flags & 0x02:
            if pos + 9 > len(data):
                return None
            size, start = int.from_bytes(data[pos + 1 : pos + 9], "big"), pos + 9
        else:
            size, start = data[pos + 1], pos + 2
        if start + size > len(data):
            return None
        frames.append(data[start : start + size])
        pos = start + size
        if not flags & 0x01:
            return frames
    return None


def socket_floor(calls: int, service_us: float) -> dict[str, float]:
    """A round trip on a socketpair to a forked echo that busy-works `service_us` before it answers."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo: nothing in it allocates or imports
        mine.close()
        while True:
            data = theirs.recv(65536)
            if not data:
                os._exit(0)
            until = time.perf_counter() + service_us / 1e6
            while time.perf_counter() < until:
                pass
            theirs.sendall(data)
    theirs.close()
    mine.setblocking(False)
    message = bytes(256)

    def round_trip() -> None:
        mine.sendmsg([message])
        select.select([mine], [], [], 5.0)
        mine.recv(65536)

    try:
        for _ in range(200):
            round_trip()
        return _measure(calls, round_trip)
    finally:
        mine.close()
        os.waitpid(pid, 0)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = list(result["figures"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [result["figures"][n]["cpu_us"] for n in names], color=["grey" if n.startswith("floor") else "tab:green" for n in names])
    ax.axhline(TARGET_US, color="tab:red", linestyle="--", label=f"target {TARGET_US:g} µs")
    ax.set_ylabel("CPU per request, µs (client process)")
    ax.set_title("Python client CPU per request, direct path (tiny model)")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--service-us", type=float, default=100.0, help="the floor echo's work per request (default 100: a worker's time for tiny)")
    add_output_arguments(parser, BENCH / "results" / "client_cpu.json")
    args = parser.parse_args(argv)
    if redrawn(args, plot):
        return 0

    repo = world_readable_copy(["tiny"])
    runs: dict[str, list[dict[str, float]]] = {}
    with DaemonProcess(models=repo, workers=2, env={"OPENINFER_POOL_DIRECT": "1"}, label="client-cpu").start(timeout=120) as daemon:
        series: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("Client c=1", lambda: sync_client(daemon.address, args.requests)),
            *((f"AsyncClient c={c}", lambda c=c: async_client(daemon.address, args.requests, c)) for c in ASYNC_LEVELS),
            ("floor: bare loop on the daemon", lambda: bare_loop(daemon.address, args.requests)),
            ("floor: asyncio bare loop on the daemon", lambda: asyncio_bare_loop(daemon.address, args.requests)),
            ("floor: echo at once", lambda: socket_floor(args.requests, 0.0)),
            (f"floor: echo after {args.service_us:g} us", lambda: socket_floor(args.requests, args.service_us)),
        ]
        for round_index in range(args.rounds):
            for name, measure in series if round_index % 2 == 0 else list(reversed(series)):
                runs.setdefault(name, []).append(measure())
            print(f"round {round_index + 1}: " + "; ".join(f"{name} {runs[name][-1]['cpu_us']:.1f} us" for name, _ in series))
    figures = {name: {"cpu_us": median_of(r["cpu_us"] for r in got), "p50_us": median_of(r["p50_us"] for r in got), "runs": got} for name, got in runs.items()}
    verdicts = [{"target": f"{name}: CPU per request <= {TARGET_US:g} us", "value": f["cpu_us"], "pass": f["cpu_us"] is not None and f["cpu_us"] <= TARGET_US}
                for name, f in figures.items() if not name.startswith("floor")]
    # What each client adds to its floor, measured in the same round (the floor itself moves by a third
    # between rounds on this shared VM; the difference moves far less).
    over_floor = {name: median_of(c["cpu_us"] - f["cpu_us"] for c, f in zip(runs[name], runs[floor])) for name, floor in OVER_FLOOR.items()}
    result = {
        "config": {"rounds": args.rounds, "requests": args.requests, "service_us": args.service_us, "model": "examples/models/tiny, 2 workers, sandboxed, direct path", "cpu": "getrusage(RUSAGE_SELF) user + system of the client process"},
        "machine": machine_info(),
        "figures": figures,
        "over_floor_us": over_floor,
        "verdicts": verdicts,
    }
    for name, f in figures.items():
        print(f"{name:38s} CPU {f['cpu_us']:6.1f} us/request   p50 {f['p50_us']:7.1f} us")
    for name, extra in over_floor.items():
        print(f"{name} over {OVER_FLOOR[name]}: {extra:+.1f} us (median of the rounds' differences)")
    for v in verdicts:
        print(f"  [{'PASS' if v['pass'] else 'FAIL'}] {v['target']}: {v['value']}")
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
