"""OpenInfer vs FastAPI+uvicorn (issue #17): one run, the same model, 2 workers each, interleaved rounds.

    .venv/bin/python bench/peers.py             # ~3.5 min: 5 rounds x 1 s per figure, then batching.py's c = 16, 32 (5 x 2 s)
    .venv/bin/python bench/peers.py --quick     # ~40 s, 1 round (wrk 1 s, the rest 1 s; a smoke run: figures, not a verdict)
    .venv/bin/python bench/peers.py --plot-only bench/results/peers.json   # redraw plot + summary

Servers, all on examples/models/tiny (x FP32[-1, 64] -> y), 2 worker processes each, nothing pinned:
  fastapi               bench/peers_app.py under `uvicorn --workers 2 --loop uvloop --http httptools`
  openinfer             `openinfer serve --workers 2`, sandboxed, OPENINFER_POOL_DIRECT=1 (both paths open)
  openinfer_no_sandbox  the same with --insecure-no-sandbox (the sandbox's cost)
  unix_echo             the floor: a Python echo on a raw Unix socket (bench/unix_echo.py)
Generators, closed loop, c requests in flight (c = 1, 8, 32):
  c       C generators: wrk -t1 (bench/peers_post.lua, raw float32 body) for HTTP; bench/cwire for OpenInfer,
          --direct (a lease, then straight to the workers) and --front-door (through the daemon's socket)
  python  the clients a user would write, one process, one event loop: aiohttp; openinfer AsyncClient
          (the direct path) and AsyncClient(direct=False) (the front door)
  floor   one Python client process on the echo (blocking socket at c = 1, epoll above)
Each round measures every (level, group) for every server of the group back to back, the servers' order
reversed every other round; each figure is the median over rounds of that figure, each ratio the median of
the per-round ratios (both sides measured back to back). Then bench/batching.py
(imported, not copied) measures batched vs unbatched OpenInfer at c >= 16. Writes bench/results/peers.json
and peers.png; reports the issue's ratios and targets, never asserts them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # siblings, also for spawned children
sys.path.insert(0, str(BENCH.parent / "tests"))  # batching.py builds its models with tests/onnx_builders

from common import (  # noqa: E402
    RESULTS_DIR,
    DaemonNotReady,
    DaemonProcess,
    cpu_seconds,
    latency_summary,
    machine_info,
    median_of_runs,
    tiny_input,
    world_readable_copy,
    world_readable_tempdir,
    write_json,
)
from cwireload import PATHS as CWIRE_PATHS, CWirePool, build as build_cwire  # noqa: E402
from loadgen import RunResult, concurrency_levels  # noqa: E402
from peers_clients import PythonClients  # noqa: E402
from peers_http import ServerNotReady, UvicornServer, Wrk  # noqa: E402
from peers_report import TARGETS, plot, print_summary, ratios, verdicts  # noqa: E402
from unix_echo import EchoClients, EchoServer  # noqa: E402

MODEL = "tiny"
WORKERS = 2
DIRECT_ENV = {"OPENINFER_POOL_DIRECT": "1"}


@dataclass
class Series:
    """One server driven by one generator: measured at each level, once per round."""

    group: str  # "c", "python" or "floor"
    name: str  # "fastapi", "openinfer_direct", "openinfer_frontdoor", "openinfer_no_sandbox", "unix_echo"
    generator: str
    path: str | None  # the OpenInfer path asked for: "direct" or "frontdoor"
    measure: Callable[[int], dict[str, Any]]
    runs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


# -- command line ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=concurrency_levels, default=[1, 8, 32], help="concurrency levels (default 1,8,32: the issue's figures)")
    p.add_argument("--duration", type=int, default=1, help="whole seconds measured per run (wrk counts whole seconds; default 1)")
    p.add_argument("--warmup", type=float, default=0.25, help="seconds discarded at the start of each run of the Python and cwire generators")
    p.add_argument("--repeats", type=int, default=5, help="rounds; each figure is the median over rounds, each ratio the median of per-round ratios (default 5)")
    p.add_argument("--batching-levels", type=concurrency_levels, default=[16, 32], help="levels of the batching phase (bench/batching.py; default 16,32)")
    p.add_argument("--batching-duration", type=float, default=2.0, help="seconds per run of the batching phase (default 2: 1 s runs of the batching daemon swing 2x; as many repeats as rounds)")
    p.add_argument("--no-batching", action="store_true", help="skip the batching phase (its figures are then null, with the reason)")
    p.add_argument("--quick", action="store_true", help="1 round (wrk 1 s, the other generators 1 s), batching at c = 16 only: a smoke run (the test's), not a measurement")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "peers.json", help="results file; the plot goes beside it as .png")
    p.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="redraw the plot and summary from a results file")
    args = p.parse_args(argv)
    # The runs of generators other than wrk (which counts whole seconds) may be shorter: --quick's are.
    args.pool_duration = float(args.duration)
    if args.quick:
        args.duration, args.warmup, args.repeats = 1, 0.1, 1
        args.pool_duration = 1.0  # (0.4 s: under a loaded run of the suite, 32 Python clients once completed none in it)
        args.batching_levels, args.batching_duration = [16], 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        results = json.loads(args.plot_only.read_text())
        plot(results, args.plot_only.with_suffix(".png"))
        print_summary(results)
        return 0
    started = time.monotonic()
    try:
        results = run(args)
    except (ServerNotReady, DaemonNotReady, RuntimeError) as exc:  # a server that did not start, wrk or cwire missing
        print(f"peers.py: {exc}", file=sys.stderr)
        return 1
    results["config"]["wall_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    write_json(args.out, results)
    drawn = plot(results, args.out.with_suffix(".png"))
    results["plot"] = str(args.out.with_suffix(".png")) if drawn else None
    results["plot_skipped"] = None if drawn else "matplotlib is not installed (bash examples/bootstrap.sh bench installs it)"
    write_json(args.out, results)
    print_summary(results)
    print(f"\nwrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if drawn else " (plot skipped)") + f" in {results['config']['wall_s']:.0f} s")
    return 0


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- cwire's direct mode -----------------------------------------------------------------------------
def cwire_direct_mode() -> dict[str, Any]:
    """bench/cwire takes a lease and sends infer to the workers itself (`--direct`, cwireload.PATHS);
    the front door's figures come from the same binary with `--front-door`."""
    build_cwire()
    return {"available": "direct" in CWIRE_PATHS, "detected_by": "bench/cwireload.PATHS"}


# -- one measurement ---------------------------------------------------------------------------------
def figures_of(result: RunResult, wall_s: float, cpu_s: dict[str, float]) -> dict[str, Any]:
    """Latency percentiles, throughput, errors, CPU per request per role, and which path answered."""
    out: dict[str, Any] = dict(latency_summary(result.latencies_ns))
    out["throughput_rps"] = round(result.throughput_rps, 1)
    out["errors"] = dict(result.errors)
    out.update(cpu_figures(cpu_s, wall_s, result.throughput_rps))
    if result.stages_us:  # OpenInfer replies: the direct path has no dispatch_us (PROTOCOL.md 17.4)
        dispatched = result.stages_us.get("dispatch_us")
        out["direct_share"] = round(1.0 - (dispatched.size if dispatched is not None else 0) / max(1, result.completed), 3)
        compute = result.stages_us.get("compute_us")
        if compute is not None and compute.size:
            out["compute_p50_us"] = round(float(np.median(compute)), 1)
    return out


def cpu_figures(cpu_s: dict[str, float], wall_s: float, rps: float) -> dict[str, Any]:
    """CPU per request (us) and cores busy, per role, at the run's rate (as latency.py)."""
    return {
        "cpu_us_per_req": {role: round(c / wall_s / rps * 1e6, 1) if rps and wall_s else None for role, c in cpu_s.items()},
        "cores": {role: round(c / wall_s, 2) if wall_s else None for role, c in cpu_s.items()},
    }


def pool_measure(pool: Any, address: str, roles: dict[str, Callable[[], list[int]]], duration: float, warmup: float) -> Callable[[int], dict[str, Any]]:
    """A Series.measure for a generator with the loadgen contract (cwire, Python clients, echo clients)."""

    def measure(level: int) -> dict[str, Any]:
        pool.prepare(address, level)
        pids = {role: get() for role, get in roles.items()} | {"generator": pool.pids}
        cpu0 = {role: cpu_seconds(p) for role, p in pids.items()}
        wall0 = time.monotonic()
        result = pool.run(address, level, duration, warmup)
        wall = time.monotonic() - wall0
        return figures_of(result, wall, {role: cpu_seconds(p) - cpu0[role] for role, p in pids.items()})

    return measure


def wrk_measure(wrk: Wrk, server: UvicornServer, duration: int) -> Callable[[int], dict[str, Any]]:
    def measure(level: int) -> dict[str, Any]:
        wrk.prepare(server.url, level)
        pids = server.pids()
        cpu0 = cpu_seconds(pids)
        raw = wrk.run(server.url, level, duration)
        wall = raw["duration_us"] / 1e6
        rps = raw["requests"] / wall if wall else 0.0
        out: dict[str, Any] = {key: raw[key] for key in ("p50_us", "p90_us", "p99_us", "mean_us")}
        out["count"] = raw["requests"]
        out["throughput_rps"] = round(rps, 1)
        out["errors"] = {kind: n for kind, n in raw["errors"].items() if n}
        out.update(cpu_figures({"server": cpu_seconds(pids) - cpu0, "generator": raw["cpu_s"]}, wall, rps))
        return out

    return measure


def openinfer_roles(daemon: DaemonProcess) -> dict[str, Callable[[], list[int]]]:
    return {"supervisor": lambda: [daemon.pid], "workers": daemon.worker_pids}


# -- servers -----------------------------------------------------------------------------------------
def start_daemon(models: Path, sandbox: bool) -> DaemonProcess:
    """`openinfer serve --workers 2` with the direct path on, once every worker is ready (a lease
    names only ready workers, and the first round must not meet a daemon still starting one)."""
    from openinfer.client import Client

    daemon = DaemonProcess(models, workers=WORKERS, sandbox=sandbox, label="peers" + ("" if sandbox else "-nosandbox"), env=DIRECT_ENV).start(timeout=120)
    deadline = time.monotonic() + 60
    with Client(daemon.address, timeout=5.0) as client:
        while time.monotonic() < deadline:
            rows = [m for m in client.status().get("models", []) if m.get("name") == MODEL]
            if rows and rows[0].get("ready_workers") == WORKERS:
                break
            time.sleep(0.05)
    return daemon


def build_series(args: argparse.Namespace, servers: dict[str, Any], pools: dict[str, Any], cwire: dict[str, Any]) -> list[Series]:
    fastapi, daemon, plain, echo = servers["fastapi"], servers["openinfer"], servers["openinfer_no_sandbox"], servers["unix_echo"]
    d, w = args.pool_duration, args.warmup
    c_path = "direct" if cwire["available"] else "frontdoor"
    c_pool = pools["cwire_direct"] if cwire["available"] else pools["cwire"]
    py = pools["python"]
    series = [
        Series("c", "fastapi", "wrk -t1", None, wrk_measure(pools["wrk"], fastapi, args.duration)),
        Series("c", f"openinfer_{c_path}", f"cwire{' --direct' if cwire['available'] else ''}", c_path, pool_measure(c_pool, daemon.address, openinfer_roles(daemon), d, w)),
    ]
    if cwire["available"]:
        series.append(Series("c", "openinfer_frontdoor", "cwire", "frontdoor", pool_measure(pools["cwire"], daemon.address, openinfer_roles(daemon), d, w)))
    series += [
        Series("c", "openinfer_no_sandbox", f"cwire{' --direct' if cwire['available'] else ''}", c_path, pool_measure(c_pool, plain.address, openinfer_roles(plain), d, w)),
        Series("python", "fastapi", "aiohttp", None, pool_measure(py, f"http {fastapi.url}", {"server": fastapi.pids}, d, w)),
        Series("python", "openinfer_direct", "AsyncClient", "direct", pool_measure(py, f"openinfer {daemon.address}", openinfer_roles(daemon), d, w)),
        Series("python", "openinfer_frontdoor", "AsyncClient(direct=False)", "frontdoor", pool_measure(py, f"openinfer-door {daemon.address}", openinfer_roles(daemon), d, w)),
        Series("floor", "unix_echo", "python echo client", None, pool_measure(pools["echo"], echo.path, {"server": lambda: [echo.pid]}, d, w)),
    ]
    return series


# -- the run -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    cwire = cwire_direct_mode()
    results: dict[str, Any] = {"benchmark": "peers", "config": config(args, cwire), "machine": machine_info(), "targets": TARGETS}
    workdir = world_readable_tempdir("oi-bench-peers-")
    models = world_readable_copy([MODEL], parent=workdir)
    servers: dict[str, Any] = {}
    pools: dict[str, Any] = {}
    try:
        progress("starting FastAPI+uvicorn, two OpenInfer daemons (sandboxed, --insecure-no-sandbox) and the unix echo")
        servers["fastapi"] = UvicornServer(workdir, WORKERS, models / MODEL / "1" / "model.onnx").start()
        servers["openinfer"] = start_daemon(models, sandbox=True)
        servers["openinfer_no_sandbox"] = start_daemon(models, sandbox=False)
        servers["unix_echo"] = EchoServer(workdir)
        results["config"]["fastapi_command"] = " ".join(servers["fastapi"].command[1:]).replace(str(BENCH) + os.sep, "bench/").replace(str(BENCH), "bench")
        pools["wrk"] = Wrk()
        x = tiny_input()
        pools["cwire"] = CWirePool(MODEL, "x", x, path="front-door")
        if cwire["available"]:
            pools["cwire_direct"] = CWirePool(MODEL, "x", x, path="direct")
        pools["python"] = PythonClients()
        pools["echo"] = EchoClients()
        series = build_series(args, servers, pools, cwire)
        measure_rounds(series, args)
        results["figures"] = collect(series)
    finally:
        for pool in pools.values():
            pool.close()
        for name, server in servers.items():
            server.stop()
            if isinstance(server, DaemonProcess):
                server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    results["batching"] = batching_phase(args)
    results["ratios"] = ratios(results)
    results["verdicts"] = verdicts(results)
    return results


def config(args: argparse.Namespace, cwire: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "examples/models/tiny: x FP32[-1, 64] -> y (64x64 MatMul); every request x = ones FP32[1, 64] (256 bytes)",
        "workers": WORKERS, "levels": args.levels, "duration_s": args.duration, "pool_duration_s": args.pool_duration, "warmup_s": args.warmup, "repeats": args.repeats, "quick": args.quick,
        "openinfer": {"env": DIRECT_ENV, "socket": "ipc:// in a private temp dir", "sandbox": "openinfer: sandboxed; openinfer_no_sandbox: --insecure-no-sandbox"},
        "fastapi": "bench/peers_app.py: onnxruntime in-process, intra_op_num_threads=1, POST raw float32 body -> raw output bytes, tcp 127.0.0.1",
        "generators": {
            "c": "wrk -t1 -cC, bench/peers_post.lua (one warm-up second per server first); bench/cwire, one DEALER socket, C requests in flight",
            "python": "one process, one asyncio loop, C coroutines in closed loops: aiohttp.ClientSession / openinfer AsyncClient",
            "floor": "bench/unix_echo.py: one Python echo process, one Python client process (blocking at c = 1, epoll above), 256 bytes each way",
        },
        "cwire_direct": cwire,
        "batching": {"levels": args.batching_levels, "duration_s": args.batching_duration, "repeats": args.repeats, "skipped": args.no_batching},
        "statistic": "each figure is the median over rounds of that figure; rounds interleave servers (order reversed every other round)",
    }


def measure_rounds(series: list[Series], args: argparse.Namespace) -> None:
    groups = ["c", "python", "floor"]
    total = args.repeats * len(args.levels) * len(series)
    done = 0
    for repeat in range(args.repeats):
        for level in args.levels:
            for group in groups:
                members = [s for s in series if s.group == group]
                for s in members if repeat % 2 == 0 else reversed(members):
                    figures = s.measure(level)
                    figures["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other tenants of this machine show here
                    s.runs.setdefault(level, []).append(figures)
                    done += 1
                    path = f"  direct {figures['direct_share']:.0%}" if "direct_share" in figures else ""
                    progress(f"[{done:>3}/{total}] round {repeat + 1} c={level:<3} {group:6s} {s.name:22s} {s.generator:26s}"
                             f" p50 {figures['p50_us'] or 0:>8,.0f} us  p99 {figures['p99_us'] or 0:>8,.0f} us  {figures['throughput_rps']:>8,.0f} req/s{path}"
                             + (f"  errors {figures['errors']}" if figures["errors"] else ""))


def collect(series: list[Series]) -> dict[str, Any]:
    """{group: {name: {generator, path, levels: {c: medians + summed errors + runs}}}}."""
    out: dict[str, Any] = {}
    for s in series:
        levels = {}
        for level, runs in s.runs.items():
            errors: dict[str, int] = {}
            for r in runs:
                for code, n in r["errors"].items():
                    errors[code] = errors.get(code, 0) + n
            levels[str(level)] = median_of_runs(runs) | {"errors": errors, "runs": runs}
        out.setdefault(s.group, {})[s.name] = {"generator": s.generator, "path": s.path, "levels": levels}
    return out


def batching_phase(args: argparse.Namespace) -> dict[str, Any]:
    """bench/batching.py's own run (sandboxed daemons, cwire, batching on vs off) at the batching levels,
    reduced to what the report needs; its full figures stay batching.py's to write."""
    if args.no_batching:
        return {"skipped": "--no-batching", "levels": {}}
    import batching

    progress(f"batching phase: bench/batching.py at c = {','.join(map(str, args.batching_levels))}")
    bargs = batching.parse_args(["--levels", ",".join(map(str, args.batching_levels)), "--duration", str(args.batching_duration),
                                 "--repeats", str(args.repeats), "--warmup", str(args.warmup)])
    full = batching.run(bargs)
    levels = {}
    for c in map(str, args.batching_levels):
        off, on = full["levels"]["off"]["cwire"][c], full["levels"]["on"]["cwire"][c]
        levels[c] = {"off_rps": off["throughput_rps"], "on_rps": on["throughput_rps"], "p99_off_us": off["p99_us"], "p99_on_us": on["p99_us"],
                     "mean_batch": on["batches"]["mean_size"], "runs_off_rps": [r["throughput_rps"] for r in off["runs"]], "runs_on_rps": [r["throughput_rps"] for r in on["runs"]]}
    return {"skipped": None, "source": "bench/batching.py run() (cwire, direct path when granted, sandboxed)", "config": {k: full["config"][k] for k in ("max_batch_size", "max_queue_delay_us", "sandbox", "path")}, "levels": levels}


if __name__ == "__main__":
    raise SystemExit(main())
