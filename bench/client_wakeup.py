"""What a wake-up costs the Python client (issue #17: at most 50 us of CPU per request): the same code
measured after sleeping for its reply and with the reply already waiting.

    .venv/bin/python bench/client_wakeup.py                 # ~1 min: 5 interleaved rounds
    .venv/bin/python bench/client_wakeup.py --plot-only bench/results/client_wakeup.json

bench/client_cpu.py measures `Client.infer` at c = 1 against a real worker: the client sleeps in select
for every reply. Here the same two loops - `Client.infer` and client_cpu's bare loop (encoder, sendmsg,
select, recv, header and array; no bookkeeping) - also run with their reply already waiting: the link's
socket is swapped for one end of a socketpair whose other end holds a real reply of that worker, so
nothing sleeps and what is measured is the code alone. Both conditions in every round, order reversed
every other round; figures are medians over rounds of user + system CPU (`getrusage`) per request.

The report gives, per loop, `woken / waiting`: how many times its own code's cost a request pays once
the process slept for its reply (on this VM the caches and branch predictors are cold after an idle
vCPU, and the client's code runs ~2-3x slower). With that factor, the client's code would have to cost
50 / factor us with the reply waiting to meet the target at c = 1. Writes bench/results/client_wakeup.json
and .png; reports, never asserts.
"""
from __future__ import annotations

import argparse
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from client_cpu import TARGET_US, _bare_request, _measure, _whole_message, bare_loop, sync_client  # noqa: E402
from common import DaemonProcess, add_output_arguments, machine_info, median_of, pyplot, redrawn, world_readable_copy, write_json  # noqa: E402

from openinfer.client import Client  # noqa: E402
from openinfer.wire.zmtp import message_buffers  # noqa: E402

LOOPS = ("Client.infer", "bare loop")


def waiting_loops(address: str, calls: int) -> dict[str, dict[str, float]]:
    """Both loops, each reply put in the socket before the request is sent: no sleep, no wake-up."""
    x = np.ones((1, 64), np.float32)
    with Client(address) as client:
        sock, send, output = _bare_request(client)
        send()  # one real reply of the worker, kept to be played back
        data = b""
        while _whole_message(data) is None:
            select.select([sock], [], [], 5.0)
            data += sock.recv(65536)
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        core = client._core
        link = next(iter(core.links.values()))
        link.stream.sock = mine  # the client now talks to `theirs`, which answers before it is asked
        request_id = msgpack.unpackb(_whole_message(data)[0])["id"]  # type: ignore[index]
        core.next_id = lambda: request_id  # type: ignore[method-assign]  # every request is the one the reply answers
        far = time.monotonic_ns() + 3600 * 10**9
        for lease in core.leases.values():
            lease.expires_ns = far
        link.attached_ns = far

        def client_one() -> None:
            theirs.send(data)
            client.infer("tiny", {"x": x})
            theirs.recv(65536)

        def bare_one() -> None:
            theirs.send(data)
            mine.sendmsg(message_buffers(core.infer_frames(request_id, "tiny", {"x": x}, None, None, 30.0, None)))
            got = b""
            while True:
                select.select([mine], [], [], 5.0)
                got += mine.recv(65536)
                parts = _whole_message(got)
                if parts is not None:
                    output(parts)
                    break
            theirs.recv(65536)

        try:
            for one in (client_one, bare_one):
                for _ in range(300):
                    one()
            return {"Client.infer": _measure(calls, client_one), "bare loop": _measure(calls, bare_one)}
        finally:
            link.stream.sock = sock
            mine.close()
            theirs.close()


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, condition, color in ((-width / 2, "waiting", "tab:blue"), (width / 2, "woken", "tab:orange")):
        values = [result["figures"][f"{loop}, {condition}"]["cpu_us"] for loop in LOOPS]
        ax.bar([i + offset for i in range(len(LOOPS))], values, width, label="reply already waiting" if condition == "waiting" else "slept for the reply (real worker)", color=color)
    ax.set_xticks(range(len(LOOPS)), list(LOOPS))
    ax.axhline(TARGET_US, color="tab:red", linestyle="--", label=f"target {TARGET_US:g} µs")
    ax.set_ylabel("CPU per request, µs (client process)")
    ax.set_title("The same client code, with and without a wake-up (tiny, c = 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000)
    add_output_arguments(parser, BENCH / "results" / "client_wakeup.json")
    args = parser.parse_args(argv)
    if redrawn(args, plot):
        return 0

    repo = world_readable_copy(["tiny"])
    runs: dict[str, list[float]] = {}
    with DaemonProcess(models=repo, workers=2, env={"OPENINFER_POOL_DIRECT": "1"}, label="client-wakeup").start(timeout=120) as daemon:
        def woken() -> dict[str, dict[str, float]]:
            return {"Client.infer": sync_client(daemon.address, args.requests), "bare loop": bare_loop(daemon.address, args.requests)}

        def waiting() -> dict[str, dict[str, float]]:
            return waiting_loops(daemon.address, args.requests)

        conditions: list[tuple[str, Callable[[], dict[str, dict[str, float]]]]] = [("woken", woken), ("waiting", waiting)]
        for round_index in range(args.rounds):
            for condition, measure in conditions if round_index % 2 == 0 else list(reversed(conditions)):
                for loop, figures in measure().items():
                    runs.setdefault(f"{loop}, {condition}", []).append(figures["cpu_us"])
            print(f"round {round_index + 1}: " + "; ".join(f"{name} {values[-1]:.1f} us" for name, values in runs.items()))
    figures = {name: {"cpu_us": median_of(values), "runs": values} for name, values in runs.items()}
    factors = {loop: median_of(w / c for w, c in zip(runs[f"{loop}, woken"], runs[f"{loop}, waiting"])) for loop in LOOPS}
    client_factor = factors["Client.infer"] or 1.0
    result = {
        "config": {"rounds": args.rounds, "requests": args.requests, "model": "examples/models/tiny, 2 workers, sandboxed, direct path, c = 1", "cpu": "getrusage(RUSAGE_SELF) user + system of the client process"},
        "machine": machine_info(),
        "figures": figures,
        "woken_over_waiting": factors,
        "client_code_budget_us": TARGET_US / client_factor,
    }
    for name, f in figures.items():
        print(f"{name:28s} CPU {f['cpu_us']:6.1f} us/request")
    for loop, factor in factors.items():
        print(f"{loop}: woken / waiting = x{factor:.2f} (median of the rounds' ratios)")
    print(f"to meet {TARGET_US:g} us at c = 1 with that factor, Client.infer's code would have to cost {TARGET_US / client_factor:.1f} us with its reply waiting")
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
