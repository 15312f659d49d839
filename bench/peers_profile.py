"""Where the time goes in bench/peers.py's figures: py-spy on every process of one server and its generator.

    .venv/bin/python bench/peers_profile.py fastapi-wrk --concurrency 8          # uvicorn workers under wrk
    .venv/bin/python bench/peers_profile.py fastapi-aiohttp --concurrency 8      # + the aiohttp client process
    .venv/bin/python bench/peers_profile.py openinfer-direct --concurrency 8     # workers + AsyncClient process
    .venv/bin/python bench/peers_profile.py openinfer-door --concurrency 8       # supervisor + workers + AsyncClient(direct=False)
    .venv/bin/python bench/peers_profile.py openinfer-direct-cwire --concurrency 1   # workers under cwire --direct

Starts the server as peers.py does (the daemon with --insecure-no-sandbox: a sandboxed worker cannot be
ptraced, and peers.py measures the sandbox's cost separately), runs the load for `--duration` seconds
and meanwhile `py-spy record --format raw` on each process (on-CPU samples only: what each one spends
its CPU on, the figure that bounds throughput on 2 cores). Prints, per process, the busy share and the top
functions by self and inclusive samples; writes bench/results/peers_profile_<target>_c<C>.txt, and keeps
the raw stacks (one file per process, for flamegraph.pl or speedscope.app) in a temp dir it names.
Self time of a Python function includes the system calls it makes (py-spy without --native): a
`send` that wakes another process is charged what the wake-up costs the sender on this VM.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_SETUP, RESULTS_DIR, DaemonProcess, world_readable_copy, world_readable_tempdir  # noqa: E402
from cwireload import CWirePool  # noqa: E402
from peers import MODEL, WORKERS, start_daemon  # noqa: E402
from peers_clients import PythonClients  # noqa: E402
from peers_http import UvicornServer, Wrk  # noqa: E402
from supervisor_profile import function_of, read_raw  # noqa: E402

TARGETS = ("fastapi-wrk", "fastapi-aiohttp", "openinfer-direct", "openinfer-door", "openinfer-door-cwire", "openinfer-direct-cwire")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=int, default=5, help="seconds profiled (default 5)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    p.add_argument("--top", type=int, default=12)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("py-spy") is None and not Path(sys.executable).with_name("py-spy").exists():
        print(f"py-spy is not installed: `{BENCH_SETUP}`", file=sys.stderr)
        return 1
    workdir = world_readable_tempdir("oi-bench-peers-profile-")
    models = world_readable_copy([MODEL], parent=workdir)
    stem = RESULTS_DIR / f"peers_profile_{args.target}_c{args.concurrency}"
    raw_dir = Path(tempfile.mkdtemp(prefix="peers-profile-"))
    server: Any = None
    generator: Any = None
    try:
        server, generator, processes, load = setup(args, workdir, models)
        threads = [threading.Thread(target=record, args=(pid, raw_dir / f"{role}.raw", args)) for role, pid in processes.items()]
        for t in threads:
            t.start()
        figures = load()
        for t in threads:
            t.join()
        text = report(args, processes, raw_dir, figures)
    finally:
        if generator is not None:
            generator.close()
        if server is not None:
            server.stop()
            if isinstance(server, DaemonProcess):
                server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    stem.with_suffix(".txt").write_text(text)
    print(text + f"\nwrote {stem.with_suffix('.txt')}; raw stacks in {raw_dir}")
    return 0


def setup(args: argparse.Namespace, workdir: Path, models: Path) -> tuple[Any, Any, dict[str, int], Callable[[], str]]:
    """The server, the generator, {role: pid} to profile, and the load (runs for the duration, returns a summary)."""
    c, seconds = args.concurrency, args.duration + 1  # the load outlasts the recording
    if args.target.startswith("fastapi"):
        server = UvicornServer(workdir, WORKERS, models / MODEL / "1" / "model.onnx").start()
        workers = {f"uvicorn-worker-{i}": pid for i, pid in enumerate(server.pids()[1:]) if _is_worker(pid)}
        if args.target == "fastapi-wrk":
            wrk = Wrk()
            wrk.prepare(server.url, c)
            return server, wrk, workers, lambda: _wrk_summary(wrk.run(server.url, c, seconds))
        python = PythonClients()
        target = f"http {server.url}"
        python.prepare(target, c)
        return server, python, workers | {"aiohttp-client": python.pids[0]}, lambda: _pool_summary(python.run(target, c, seconds, 0.0))
    daemon = start_daemon(models, sandbox=False)
    processes = {f"worker-{i}": pid for i, pid in enumerate(daemon.worker_pids())}
    if not args.target.startswith("openinfer-direct"):
        processes["supervisor"] = daemon.pid
    if args.target.endswith("-cwire"):
        path = "direct" if args.target == "openinfer-direct-cwire" else "front-door"
        cwire = CWirePool(MODEL, "x", __import__("numpy").ones((1, 64), "float32"), path=path)
        cwire.prepare(daemon.address, c)
        return daemon, cwire, processes, lambda: _pool_summary(cwire.run(daemon.address, c, seconds, 0.0))
    python = PythonClients()
    target = f"{'openinfer' if args.target == 'openinfer-direct' else 'openinfer-door'} {daemon.address}"
    python.prepare(target, c)
    return daemon, python, processes | {"asyncclient": python.pids[0]}, lambda: _pool_summary(python.run(target, c, seconds, 0.0))


def _is_worker(pid: int) -> bool:
    """uvicorn's worker processes (not the multiprocessing resource tracker it also starts)."""
    try:
        return "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def _wrk_summary(figures: dict[str, Any]) -> str:
    return f"{figures['requests'] / (figures['duration_us'] / 1e6):,.0f} req/s, p50 {figures['p50_us']:,.0f} us (wrk)"


def _pool_summary(result: Any) -> str:
    import numpy as np

    p50 = float(np.median(result.latencies_ns)) / 1000 if result.completed else 0.0
    return f"{result.throughput_rps:,.0f} req/s, p50 {p50:,.0f} us, errors {result.errors or 'none'}"


def record(pid: int, raw: Path, args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    subprocess.run([spy, "record", "--format", "raw", "--rate", str(args.rate), "--duration", str(args.duration), "--nonblocking", "-p", str(pid), "-o", str(raw)],
                   capture_output=True, text=True)


def report(args: argparse.Namespace, processes: dict[str, int], raw_dir: Path, load: str) -> str:
    lines = [f"peers profile: {args.target}, c={args.concurrency}, {args.duration} s at {args.rate} Hz (on-CPU samples; {args.duration * args.rate} = one busy core)", f"load: {load}", ""]
    for role in processes:
        raw = raw_dir / f"{role}.raw"
        stacks = read_raw(raw) if raw.exists() else Counter()
        total = sum(stacks.values())
        lines.append(f"== {role}: {total} samples ({100 * total / max(1, args.duration * args.rate):.0f} % of a core)")
        self_time: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        for stack, n in stacks.items():
            self_time[function_of(stack[-1])] += n
            for fn in {function_of(f) for f in stack}:
                inclusive[fn] += n
        lines.append("  self:")
        lines += [f"    {100 * n / total:5.1f}%  {fn}" for fn, n in self_time.most_common(args.top)] if total else ["    (no samples: ptrace refused?)"]
        lines.append("  inclusive:")
        lines += [f"    {100 * n / total:5.1f}%  {fn}" for fn, n in inclusive.most_common(args.top)] if total else []
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
