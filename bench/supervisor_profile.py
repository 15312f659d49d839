"""Where the supervisor's time goes under load: py-spy on the supervisor process at a fixed concurrency.

    .venv/bin/python bench/supervisor_profile.py --no-sandbox                # c=8, 5 s
    .venv/bin/python bench/supervisor_profile.py --concurrency 16 --duration 10 --native

Starts `openinfer serve --workers 2` on the tiny model, drives it with closed-loop client processes (as
latency.py does), and records the supervisor with `py-spy record --idle --format raw` (needs ptrace:
root, or CAP_SYS_PTRACE). Samples taken while the main thread waits in `poll()` are idle time; the rest
is the supervisor's per-request Python work. Writes bench/results/supervisor_profile.txt (tables),
.json (figures) and .raw (collapsed stacks: `flamegraph.pl` or speedscope.app read it).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_SETUP, RESULTS_DIR, DaemonProcess, cpu_seconds, machine_info, world_readable_copy, world_readable_tempdir, write_json  # noqa: E402
from loadgen import ClientPool, RunResult  # noqa: E402

# Functions of the supervisor's per-request path, reported inclusively even when they are not hot.
HOT_PATH = (
    "run", "_drain_frontend", "_drain_backend", "_on_request", "_accept_infer", "decode_header", "check_envelope",
    "check_infer", "lookup", "_enqueue", "_dispatch", "_next_for", "_on_worker_message", "_on_result", "_finish",
    "record", "_reply", "pack", "unpack", "_any_busy", "_expire_running", "run_due", "timeout_ms",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=True, help="Sandboxed daemon (default) or --insecure-no-sandbox.")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0, help="Seconds py-spy records.")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second.")
    p.add_argument("--native", action="store_true", help="Also sample C frames (libzmq, msgpack, CPython).")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="Rows per table.")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "supervisor_profile.txt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print(f"py-spy not found: `{BENCH_SETUP}` installs it (the bench extra)", file=sys.stderr)
        return 2
    workdir = world_readable_tempdir("oi-bench-profile-")
    models = world_readable_copy(["tiny"], parent=workdir)
    raw_path = args.out.with_suffix(".raw")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    mode = "sandbox" if args.sandbox else "no-sandbox"
    try:
        with ClientPool(args.concurrency) as pool, DaemonProcess(models, workers=args.workers, sandbox=args.sandbox, label=mode) as daemon:
            target = ("daemon", daemon.address)
            baseline = pool.run(target, args.concurrency, 2.0)  # unprofiled reference
            box: dict[str, RunResult] = {}
            pool.prepare(target, args.concurrency)
            cpu0, wall0 = cpu_seconds([daemon.pid]), time.monotonic()
            loader = threading.Thread(target=lambda: box.setdefault("run", pool.run(target, args.concurrency, args.duration + 1.5, warmup_s=0.5)))
            loader.start()
            time.sleep(0.8)
            cmd = [py_spy, "record", "--pid", str(daemon.pid), "--duration", str(int(round(args.duration))), "--rate", str(args.rate),
                   "--idle", "--format", "raw", "--output", str(raw_path)] + (["--native"] if args.native else [])
            spy = subprocess.run(cmd, capture_output=True, text=True)
            loader.join()
            sup_cores = (cpu_seconds([daemon.pid]) - cpu0) / (time.monotonic() - wall0)
            if spy.returncode != 0:
                print(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()}", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    profiled = box["run"]
    stacks = read_raw(raw_path)
    report = analyse(stacks, args.top)
    report.update({
        "mode": mode, "concurrency": args.concurrency, "duration_s": args.duration, "rate_hz": args.rate, "native": args.native,
        "throughput_rps_unprofiled": round(baseline.throughput_rps, 1), "throughput_rps_profiled": round(profiled.throughput_rps, 1),
        "supervisor_cores": round(sup_cores, 3), "machine": machine_info(), "raw": str(raw_path),
    })
    text = render(report, args.top)
    args.out.write_text(text)
    write_json(args.out.with_suffix(".json"), report)
    print(text)
    print(f"wrote {args.out}, {args.out.with_suffix('.json')} and {raw_path}")
    return 0


def read_raw(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's collapsed format: `frame;frame;...;leaf COUNT` per line, root first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def function_of(frame: str) -> str:
    """`_on_result (openinfer/daemon/supervisor.py:312)` -> `_on_result (supervisor.py)`; lines merged."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1] if where else ""
    return f"{name} ({file})" if file else name


def is_idle(stack: tuple[str, ...]) -> bool:
    """Waiting for events: inside zmq's Poller.poll (the syscall itself is counted as waiting)."""
    return any(frame.startswith("Poller.poll (") for frame in stack)


def trimmed(stack: tuple[str, ...]) -> tuple[str, ...]:
    """Drop the CLI frames above the supervisor's loop (they are in every sample)."""
    for index, frame in enumerate(stack):
        if frame.startswith("Supervisor.run ("):
            return stack[index:]
    return stack


def source_line(stack: tuple[str, ...]) -> str:
    """The deepest frame in the daemon's own code, with its line: where the supervisor asked for the work."""
    for frame in reversed(stack):
        if "daemon/" in frame or "client/" in frame:
            name, _, where = frame.partition(" (")
            return f"{where.rstrip(')').split('/', 1)[-1] if 'daemon/' in where else where.rstrip(')')}  {name}"
    return stack[-1]


def analyse(stacks: Counter[tuple[str, ...]], top: int) -> dict[str, Any]:
    total = sum(stacks.values())
    idle = sum(n for s, n in stacks.items() if is_idle(s))
    busy = total - idle
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for stack, n in stacks.items():
        if is_idle(stack):
            continue
        stack = trimmed(stack)
        self_time[function_of(stack[-1])] += n
        lines[source_line(stack)] += n
        for fn in {function_of(f) for f in stack}:
            inclusive[fn] += n

    def pct(n: int, of: int) -> float:
        return round(100.0 * n / of, 1) if of else 0.0

    def rows(counter: Counter[str], limit: int | None) -> list[dict[str, Any]]:
        return [{"function": fn, "samples": n, "pct_busy": pct(n, busy), "pct_wall": pct(n, total)} for fn, n in counter.most_common(limit)]

    hot_path = [row for row in rows(inclusive, None) if row["function"].split(" (")[0].rsplit(".", 1)[-1] in HOT_PATH]
    return {
        "samples": total,
        "idle_pct": pct(idle, total),
        "busy_pct": pct(busy, total),
        "self": rows(self_time, top),
        "inclusive": rows(inclusive, top),
        "lines": rows(lines, top),
        "hot_path": hot_path,
    }


def render(report: dict[str, Any], top: int) -> str:
    lines = [
        f"supervisor profile: daemon [{report['mode']}], c={report['concurrency']}, {report['duration_s']:g} s at {report['rate_hz']} Hz"
        + (" (native frames)" if report["native"] else ""),
        f"throughput {report['throughput_rps_profiled']:,.0f} req/s while profiled, {report['throughput_rps_unprofiled']:,.0f} req/s without; "
        f"supervisor busy {report['supervisor_cores']:.2f} cores (CPU time / wall time)",
        f"{report['samples']} samples: {report['busy_pct']}% working, {report['idle_pct']}% waiting in poll()",
        "",
        f"top {top} by self time (% of working samples / % of all samples):",
    ]
    for row in report["self"]:
        lines.append(f"  {row['pct_busy']:5.1f}%  {row['pct_wall']:5.1f}%  {row['function']}")
    lines += ["", f"top {top} inclusive (function and everything it calls):"]
    for row in report["inclusive"]:
        lines.append(f"  {row['pct_busy']:5.1f}%  {row['pct_wall']:5.1f}%  {row['function']}")
    lines += ["", f"top {top} supervisor source lines (deepest daemon/ or client/ frame of each sample):"]
    for row in report["lines"]:
        lines.append(f"  {row['pct_busy']:5.1f}%  {row['pct_wall']:5.1f}%  {row['function']}")
    lines += ["", "per-request path (inclusive):"]
    for row in report["hot_path"]:
        lines.append(f"  {row['pct_busy']:5.1f}%  {row['pct_wall']:5.1f}%  {row['function']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
