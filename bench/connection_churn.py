"""What one client connection's open and close costs the supervisor, with other clients' requests queued.

    .venv/bin/python bench/connection_churn.py                    # ~1 min
    .venv/bin/python bench/connection_churn.py --queued 0,4000,16000 --seconds 3 --repeats 3
    .venv/bin/python bench/connection_churn.py --plot-only bench/results/connection_churn.json

A sandboxed daemon serves a model whose one worker is held by a long run; a client queues `--queued`
requests behind it and keeps them there. Then a churning client opens a front-door connection, asks
`health`, and closes it, for `--seconds`; the supervisor's CPU over that window, per connection, is the
figure. Levels are measured interleaved, `--repeats` times each, on one daemon; figures are medians.
A close used to walk every queued request of every client (with 4000 queued: 745 us a close against
350 us with none); the ratio to the empty queue is the target: about 1, whatever is queued.

Writes bench/results/connection_churn.json and connection_churn.png. It reports, it never asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings

from common import RESULTS_DIR, DaemonProcess, add_output_arguments, cpu_seconds, machine_info, pyplot, ratio, redrawn, world_readable_tempdir, write_json  # noqa: E402

HELD_STEPS = 3_000_000_000  # the run that holds the worker: far longer than the benchmark (it is cut at its close)


def _busy_repository() -> Path:
    """busy: y = x + n by a Loop of n steps, one worker, room for every request queued."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import onnx_builders

    root = world_readable_tempdir("oi-bench-churn-")
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\nmax_queue = 65536\nmax_compute_ms = 3600000\n")  # held all along
    (root / "clients.toml").write_text("[default]\nmax_in_flight = 1000000\n")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


class Backlog:
    """One AsyncClient on a thread of its own: the request holding the worker, or requests queued behind it
    (closing it cancels them: the daemon answers what a closed connection left queued)."""

    def __init__(self, address: str) -> None:
        from openinfer.client import AsyncClient

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = AsyncClient(address, timeout=3600, direct=False)
        self.pending: list[Any] = []

    def send(self, count: int, steps: int) -> None:
        async def more() -> None:
            self.pending.extend(asyncio.ensure_future(self.client.infer("busy", _inputs(steps))) for _ in range(count))

        asyncio.run_coroutine_threadsafe(more(), self.loop).result(120)

    def close(self) -> None:
        async def end() -> None:
            await self.client.close()
            await asyncio.gather(*self.pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(end(), self.loop).result(120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _inputs(steps: int) -> dict[str, np.ndarray]:
    return {"x": np.zeros(1, np.float32), "n": np.array(steps, np.int64)}


def _queued(address: str) -> int:
    from openinfer.client import Client

    with Client(address, timeout=10, direct=False) as admin:
        return int(admin.status()["queued"])


def _wait_queued(address: str, count: int, timeout_s: float = 60.0, at_most: bool = False) -> None:
    """Until `count` requests are queued (or, `at_most`, no more than that)."""
    deadline = time.monotonic() + timeout_s
    while (_queued(address) > count) if at_most else (_queued(address) < count):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the queue did not reach {count} requests in {timeout_s} s")
        time.sleep(0.05)


def churn(address: str, supervisor_pid: int, seconds: float) -> dict[str, float]:
    """Open, ask health, close, for `seconds`: the supervisor's CPU per connection."""
    from openinfer.client import Client

    before = cpu_seconds([supervisor_pid])
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < seconds:
        with Client(address, timeout=10, direct=False) as client:
            client.health()
        count += 1
    cpu = cpu_seconds([supervisor_pid]) - before
    return {"connections": count, "supervisor_cpu_s": round(cpu, 3), "supervisor_us_per_connection": round(cpu / count * 1e6, 1)}


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    levels = results["levels"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(level["queued"]) for level in levels], [level["supervisor_us_per_connection"] for level in levels], color="tab:blue")
    ax.set_xlabel("requests queued by another client")
    ax.set_ylabel("supervisor CPU per connection (us)")
    ax.set_title("Open, health, close: what the supervisor pays")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queued", default="0,4000,16000", help="requests kept queued by another client, per level")
    parser.add_argument("--seconds", type=float, default=3.0, help="churn window per run")
    parser.add_argument("--repeats", type=int, default=3)
    add_output_arguments(parser, RESULTS_DIR / "connection_churn.json")
    args = parser.parse_args()
    if redrawn(args, plot):
        return
    levels = sorted(int(value) for value in args.queued.split(","))
    repository = _busy_repository()
    daemon = DaemonProcess(repository, workers=1, label="churn", env={"OPENINFER_SERVER_CLIENT_POLICY": str(repository / "clients.toml")})
    runs: dict[int, list[dict[str, float]]] = {level: [] for level in levels}
    with daemon:
        holder = Backlog(daemon.address)
        holder.send(1, HELD_STEPS)  # runs all along: what the others send stays queued
        for repeat in range(args.repeats):
            for level in levels:  # interleaved: each level once per repeat, the backlog made again each time
                backlog = Backlog(daemon.address)
                backlog.send(level, 1)
                _wait_queued(daemon.address, level)
                runs[level].append(churn(daemon.address, daemon.pid, args.seconds))
                backlog.close()
                _wait_queued(daemon.address, 0, at_most=True)
                print(f"repeat {repeat + 1}: {level} queued: {runs[level][-1]}", flush=True)
        holder.close()
    summary = []
    baseline = None
    for level, level_runs in sorted(runs.items()):
        figure = statistics.median(run["supervisor_us_per_connection"] for run in level_runs)
        baseline = figure if baseline is None else baseline
        summary.append({"queued": level, "supervisor_us_per_connection": figure, "ratio_to_the_first": ratio(figure, baseline), "runs": level_runs})
    results = {"machine": machine_info(), "config": vars(args) | {"out": str(args.out), "plot_only": None}, "levels": summary}
    write_json(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    for level in summary:
        print(f"{level['queued']:>6} queued: {level['supervisor_us_per_connection']:.0f} us a connection (x{level['ratio_to_the_first']:.2f})")


if __name__ == "__main__":
    main()
