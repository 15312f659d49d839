"""The direct path (PROTOCOL.md 17) vs the front door, driven by bench/cwire against one daemon.

One `openinfer serve` (examples/models/tiny, 2 workers, sandboxed unless --no-sandbox) with the direct
path on (OPENINFER_POOL_DIRECT=1); two cwire processes: one sends straight to the workers under a
lease, the other through the daemon's socket. Runs are interleaved (repeat -> level -> path, the order
of the two paths alternating between repeats) so that noise from other tenants of this shared machine
hits both alike; each figure is the median over repeats of that figure. Also the CPU each role spent per
request (supervisor, workers, cwire), from psutil over each run.

    .venv/bin/python bench/direct_path.py                      # c = 1 and 8, 5 repeats of 3 s (~2 min)
    .venv/bin/python bench/direct_path.py --levels 1,8,32 --repeats 3
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from common import RESULTS_DIR, DaemonNotReady, DaemonProcess, cpu_seconds, latency_summary, machine_info, median_of_runs, ratio, tiny_input, world_readable_copy, write_json  # noqa: E402
from cwireload import CWirePool  # noqa: E402
from loadgen import concurrency_levels  # noqa: E402

PATHS = ("direct", "front-door")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", type=concurrency_levels, default=concurrency_levels("1,8"), help="concurrency levels (default 1,8)")
    p.add_argument("--duration", type=float, default=3.0, help="measurement window per run, seconds (default 3)")
    p.add_argument("--warmup", type=float, default=0.25, help="discarded seconds at the start of each run (default 0.25)")
    p.add_argument("--repeats", type=int, default=5, help="runs per (level, path); figures are medians (default 5)")
    p.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=True, help="sandboxed daemon (default) or --insecure-no-sandbox")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "direct_path.json")
    return p.parse_args(argv)


def one_run(pool: CWirePool, daemon: DaemonProcess, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    workers = daemon.worker_pids()
    before = {"supervisor": cpu_seconds([daemon.pid]), "workers": cpu_seconds(workers), "cwire": cpu_seconds(pool.pids)}
    result = pool.run(daemon.address, concurrency, args.duration, args.warmup)
    after = {"supervisor": cpu_seconds([daemon.pid]), "workers": cpu_seconds(workers), "cwire": cpu_seconds(pool.pids)}
    # CPU over the whole run (warm-up included) per request of the window, scaled to the window's share
    requests = max(1, result.completed) * (args.duration + args.warmup) / args.duration
    return {
        "path": result.path,
        "throughput_rps": round(result.throughput_rps, 1),
        **latency_summary(result.latencies_ns),
        "errors": dict(result.errors),
        "path_events": dict(result.path_events),
        "cpu_us_per_request": {role: round((after[role] - before[role]) * 1e6 / requests, 2) for role in before},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = world_readable_copy(["tiny"])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {path: {str(c): [] for c in args.levels} for path in PATHS}
    try:
        with DaemonProcess(models, workers=2, sandbox=args.sandbox, label="direct", env={"OPENINFER_POOL_DIRECT": "1"}) as daemon:
            x = tiny_input(seed=1000)
            pools = {path: CWirePool("tiny", "x", x, path=path) for path in PATHS}
            try:
                for pool in pools.values():
                    pool.prepare(daemon.address, 1)
                for repeat in range(args.repeats):
                    order = PATHS if repeat % 2 == 0 else PATHS[::-1]
                    for concurrency in args.levels:
                        for path in order:
                            figures = one_run(pools[path], daemon, concurrency, args)
                            runs[path][str(concurrency)].append(figures)
                            print(f"repeat {repeat + 1}/{args.repeats} c={concurrency:<3} {path:<10} p50 {figures['p50_us']} us  {figures['throughput_rps']} req/s  errors {figures['errors'] or '-'}", flush=True)
            finally:
                for pool in pools.values():
                    pool.close()
    finally:
        shutil.rmtree(models, ignore_errors=True)
    medians = {path: {c: median_of_runs(rs) for c, rs in by_level.items()} for path, by_level in runs.items()}
    comparison = {
        c: {
            "p50_ratio_front_door_over_direct": ratio(medians["front-door"][c].get("p50_us"), medians["direct"][c].get("p50_us")),
            "throughput_ratio_direct_over_front_door": ratio(medians["direct"][c].get("throughput_rps"), medians["front-door"][c].get("throughput_rps")),
        }
        for c in medians["direct"]
    }
    return {
        "config": {"levels": args.levels, "duration_s": args.duration, "warmup_s": args.warmup, "repeats": args.repeats, "sandbox": args.sandbox,
                   "model": "examples/models/tiny", "workers": 2, "generator": "bench/cwire (one process per path)"},
        "machine": machine_info(),
        "medians": medians,
        "comparison": comparison,
        "runs": runs,
    }


def print_summary(results: dict[str, Any]) -> None:
    print(f"\n{'c':>4} {'path':<11} {'p50 us':>9} {'p99 us':>9} {'req/s':>9}   CPU us/request: supervisor workers cwire")
    for c in results["medians"]["direct"]:
        for path in PATHS:
            m = results["medians"][path][c]
            cpu = m.get("cpu_us_per_request", {})
            print(f"{c:>4} {path:<11} {m.get('p50_us')!s:>9} {m.get('p99_us')!s:>9} {m.get('throughput_rps')!s:>9}   {cpu.get('supervisor')!s:>10} {cpu.get('workers')!s:>7} {cpu.get('cwire')!s:>5}")
        print(f"     front door / direct p50: {results['comparison'][c]['p50_ratio_front_door_over_direct']}, direct / front door req/s: {results['comparison'][c]['throughput_ratio_direct_over_front_door']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        results = run(args)
    except DaemonNotReady as exc:
        print(f"the daemon did not start: {exc}", file=sys.stderr)
        return 1
    results["config"]["wall_s"] = round(time.monotonic() - started, 1)
    write_json(args.out, results)
    print_summary(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
