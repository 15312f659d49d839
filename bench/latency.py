"""Latency and throughput of the real daemon on the tiny model, against the two floors, in one run.

    .venv/bin/python bench/latency.py                      # sandboxed daemon (default)
    .venv/bin/python bench/latency.py --no-sandbox         # --insecure-no-sandbox
    .venv/bin/python bench/latency.py --compare-sandbox    # both, interleaved, with the ratio

Measures floor A (in-process `session.run`), floor B (bare pyzmq+msgpack through a Python broker and an
echo worker) and `openinfer serve --workers 2` under closed-loop load from separate client processes at
each concurrency level. Each figure is the median of `--repeats` runs; runs are interleaved
(repeat -> level -> target) so drift on this shared machine hits every target alike. Writes
bench/results/latency.json and latency.png and prints a summary with the issue's targets. It is a
benchmark: it reports pass/fail, it never asserts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, also for spawned children

from common import (  # noqa: E402
    PEERS,
    pyplot,
    RESULTS_DIR,
    TINY_MODEL,
    DaemonNotReady,
    DaemonProcess,
    cpu_seconds,
    latency_summary,
    machine_info,
    median_of_runs,
    ratio,
    world_readable_copy,
    world_readable_tempdir,
    write_json,
)
from floors import BareBroker, measure_inprocess, message_sizes  # noqa: E402
from loadgen import ClientPool, RunResult, concurrency_levels  # noqa: E402

TARGET_P50_C1_US = 150.0
TARGET_RPS_C8 = 10_000.0
SANDBOX_TOLERANCE = 0.05
# Server-side stages in request order; `result` is what the supervisor spends between receiving the
# worker's result and stamping total_us (total minus the sum of the others).
STAGES = ("decode", "queue", "dispatch", "prep", "compute", "encode", "return", "result")


@dataclass
class Target:
    name: str
    kind: str  # "bare" or "daemon"
    address: str
    roles: dict[str, Callable[[], list[int]]]  # role -> its pids now, for CPU accounting
    runs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=True, help="Run the daemon sandboxed (default) or with --insecure-no-sandbox.")
    p.add_argument("--compare-sandbox", action="store_true", help="Run the daemon both ways in this run and report sandboxed/unsandboxed ratios.")
    p.add_argument("--levels", type=concurrency_levels, default=[1, 4, 8, 16], help="Concurrency levels, e.g. 1,4,8,16.")
    p.add_argument("--duration", type=float, default=3.0, help="Seconds measured per run (default 3).")
    p.add_argument("--warmup", type=float, default=0.25, help="Seconds discarded at the start of each run.")
    p.add_argument("--repeats", type=int, default=3, help="Runs per measurement; figures are their median (default 3).")
    p.add_argument("--client", choices=("openinfer", "raw"), default="openinfer",
                   help="Load the daemon through openinfer.client.Client (default) or a bare DEALER speaking the wire protocol (isolates the server from the client library's cost).")
    p.add_argument("--workers", type=int, default=2, help="Daemon workers (the tiny model's config.toml asks for 2) and floor B echo workers.")
    p.add_argument("--floor-a-duration", type=float, default=1.0, help="Seconds of in-process session.run per repeat.")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "latency.json", help="Results file; the plot goes beside it as .png.")
    p.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="Redraw the plot and summary from an existing results file.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        import json

        results = json.loads(args.plot_only.read_text())
        plot(results, args.plot_only.with_suffix(".png"))
        print_summary(results)
        return 0
    modes = ["sandbox", "no-sandbox"] if args.compare_sandbox else ["sandbox" if args.sandbox else "no-sandbox"]
    results = run(args, modes)
    write_json(args.out, results)
    drawn = plot(results, args.out.with_suffix(".png"))
    print_summary(results)
    print(f"\nwrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if drawn else ""))
    return 0


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    info = machine_info()
    workdir = world_readable_tempdir("oi-bench-latency-")
    models = world_readable_copy(["tiny"], parent=workdir)
    results: dict[str, Any] = {
        "benchmark": "latency",
        "config": {
            "model": "tiny", "input": "x FP32[1,64]", "levels": args.levels, "duration_s": args.duration, "warmup_s": args.warmup,
            "repeats": args.repeats, "workers": args.workers, "modes": modes, "floor_a_duration_s": args.floor_a_duration,
            "floor_b_messages": message_sizes(), "load": "closed loop, one spawned process per concurrent client",
            "client": "openinfer.client.Client.infer" if args.client == "openinfer" else "raw DEALER + msgpack (wire protocol v1)",
            "statistic": "each figure is the median over repeats of that figure",
        },
        "machine": info,
        "targets": {"p50_us_c1_max": TARGET_P50_C1_US, "throughput_rps_c8_min": TARGET_RPS_C8, "sandbox_overhead_max": SANDBOX_TOLERANCE},
        "peers": PEERS,
    }
    progress(f"floor A: in-process session.run, {args.repeats} x {args.floor_a_duration:.1f} s")
    floor_a_runs = [latency_summary(s) | {"calls_per_s": round(s.size / max(s.sum() / 1e9, 1e-9), 1)} for s in measure_inprocess(TINY_MODEL, args.repeats, args.floor_a_duration)]
    results["floor_a"] = median_of_runs(floor_a_runs) | {"runs": floor_a_runs}

    daemons: list[DaemonProcess] = []
    try:
        progress(f"spawning {max(args.levels)} client processes, floor B broker + {args.workers} echo workers")
        with ClientPool(max(args.levels)) as pool, BareBroker(workdir, args.workers) as broker:
            targets = [Target("floor_b", "bare", broker.address, {"broker": lambda: [broker.broker_pid], "workers": lambda: broker.worker_pids, "clients": lambda: pool.pids})]
            results["daemon"] = {}
            for mode in modes:
                daemon = DaemonProcess(models, workers=args.workers, sandbox=(mode == "sandbox"), label=mode)
                progress(f"starting daemon [{mode}]")
                try:
                    daemon.start()
                except DaemonNotReady as exc:
                    progress(f"  daemon [{mode}] did not start: {exc}")
                    results["daemon"][mode] = {"started": False, "error": str(exc)}
                    daemon.cleanup()
                    continue
                daemons.append(daemon)
                results["daemon"][mode] = {"started": True, "error": None, "supervisor_pid": daemon.pid}
                kind = "daemon" if args.client == "openinfer" else "bare"
                roles = {"supervisor": _pids_of(daemon.pid), "workers": daemon.worker_pids, "clients": lambda: pool.pids}
                targets.append(Target(f"daemon[{mode}]", kind, daemon.address, roles))
            for repeat in range(args.repeats):
                for level in args.levels:
                    for target in targets:
                        summary = measure(pool, target, level, args.duration, args.warmup)
                        target.runs.setdefault(level, []).append(summary)
                        progress(f"[{repeat + 1}/{args.repeats}] c={level:<2} {target.name:<20} p50 {summary['p50_us'] or 0:8.1f} us  p99 {summary['p99_us'] or 0:8.1f} us  {summary['throughput_rps']:8.0f} req/s" + (f"  errors {summary['errors']}" if summary["errors"] else ""))
            for target in targets:
                levels = {str(level): median_of_runs(runs) | {"errors": _sum_errors(runs), "runs": runs} for level, runs in target.runs.items()}
                if target.name == "floor_b":
                    results["floor_b"] = {"levels": levels}
                else:
                    results["daemon"][target.name[len("daemon[") : -1]]["levels"] = levels
    finally:
        for daemon in daemons:
            code = daemon.stop()
            if code not in (0, None):
                progress(f"daemon exited with status {code}; log kept at {daemon.log_path}")
            else:
                daemon.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    results["ratios"] = ratios(results)
    results["verdicts"] = verdicts(results)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def _pids_of(pid: int) -> Callable[[], list[int]]:
    return lambda: [pid]


def measure(pool: ClientPool, target: Target, level: int, duration: float, warmup: float) -> dict[str, Any]:
    """One run: closed-loop load at `level`, plus CPU used per request by each role."""
    endpoint = (target.kind, target.address)
    pool.prepare(endpoint, level)
    pids = {role: get() for role, get in target.roles.items()}
    cpu0 = {role: cpu_seconds(p) for role, p in pids.items()}
    wall0 = time.monotonic()
    result = pool.run(endpoint, level, duration, warmup)
    wall = time.monotonic() - wall0
    cpu = {role: cpu_seconds(p) - cpu0[role] for role, p in pids.items()}
    summary: dict[str, Any] = latency_summary(result.latencies_ns)
    summary["throughput_rps"] = round(result.throughput_rps, 1)
    summary["errors"] = result.errors
    # Cores busy during the run, and CPU per request at the run's rate (warm-up included, same rate).
    summary["cores"] = {role: round(c / wall, 3) for role, c in cpu.items()}
    summary["cpu_us_per_req"] = {role: round(c / wall / result.throughput_rps * 1e6, 1) if result.throughput_rps else None for role, c in cpu.items()}
    if result.stages_us:
        summary["stages_us"] = stage_medians(result)
    return summary


def stage_medians(result: RunResult) -> dict[str, float]:
    stages = result.stages_us
    out: dict[str, float] = {}
    accounted = None
    for stage in STAGES[:-1]:
        values = stages.get(f"{stage}_us")
        if values is None or values.size != result.completed:
            continue
        out[stage] = round(float(np.median(values)), 2)
        accounted = values if accounted is None else accounted + values
    total = stages.get("total_us")
    if total is not None and accounted is not None and total.size == accounted.size:
        out["result"] = round(float(np.median(total - accounted)), 2)
    for key in ("total", "cpu", "client", "transport"):
        values = stages.get(f"{key}_us")
        if values is not None and values.size:
            out[key] = round(float(np.median(values)), 2)
    return out


def _sum_errors(runs: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for run in runs:
        for code, n in run.get("errors", {}).items():
            total[code] = total.get(code, 0) + n
    return total


def _level(results: dict[str, Any], *path: str) -> dict[str, Any]:
    node: Any = results
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return {}
    return node


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """daemon / floor for latency and throughput, and sandboxed / unsandboxed when both ran."""
    floor_a = results.get("floor_a", {}).get("p50_us")
    floor_b = _level(results, "floor_b", "levels")
    out: dict[str, Any] = {}
    for mode, data in results.get("daemon", {}).items():
        levels = data.get("levels") or {}
        per_level = {}
        for level, figures in levels.items():
            fb = floor_b.get(level, {})
            per_level[level] = {
                "p50_vs_floor_a": ratio(figures.get("p50_us"), floor_a),
                "p50_vs_floor_b": ratio(figures.get("p50_us"), fb.get("p50_us")),
                "p99_vs_floor_b": ratio(figures.get("p99_us"), fb.get("p99_us")),
                "throughput_vs_floor_b": ratio(figures.get("throughput_rps"), fb.get("throughput_rps")),
            }
        if per_level:
            out[mode] = per_level
    sandboxed = _level(results, "daemon", "sandbox", "levels")
    plain = _level(results, "daemon", "no-sandbox", "levels")
    if sandboxed and plain:
        out["sandbox_vs_no_sandbox"] = {
            level: {
                "p50": ratio(sandboxed[level].get("p50_us"), plain[level].get("p50_us")),
                "p99": ratio(sandboxed[level].get("p99_us"), plain[level].get("p99_us")),
                "throughput": ratio(sandboxed[level].get("throughput_rps"), plain[level].get("throughput_rps")),
            }
            for level in plain
            if level in sandboxed
        }
    return out


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for mode, data in results.get("daemon", {}).items():
        levels = data.get("levels") or {}
        p50 = levels.get("1", {}).get("p50_us")
        rps = levels.get("8", {}).get("throughput_rps")
        out.append({"mode": mode, "target": f"p50 at c=1 <= {TARGET_P50_C1_US:g} us", "value": p50, "pass": None if p50 is None else p50 <= TARGET_P50_C1_US})
        out.append({"mode": mode, "target": f"throughput at c=8 >= {TARGET_RPS_C8:,.0f} req/s", "value": rps, "pass": None if rps is None else rps >= TARGET_RPS_C8})
    compare = results.get("ratios", {}).get("sandbox_vs_no_sandbox")
    if compare is not None:
        p50_ratio = compare.get("1", {}).get("p50")
        rps_ratio = compare.get("8", {}).get("throughput")
        for name, value, worse in (("p50 at c=1", p50_ratio, lambda r: r - 1), ("throughput at c=8", rps_ratio, lambda r: 1 - r)):
            out.append({
                "mode": "sandbox vs no-sandbox", "target": f"{name}: sandbox costs < {SANDBOX_TOLERANCE:.0%}", "value": value,
                "pass": None if value is None else worse(value) < SANDBOX_TOLERANCE,
            })
    return out


# -- output -------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_summary(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print(f"\nOpenInfer latency — tiny model ({cfg['input']}), {cfg['workers']} workers, median of {cfg['repeats']} runs x {cfg['duration_s']:g} s, "
          f"{results['machine']['cpu_count']} cores, {results['machine']['date']}")
    header = f"{'':34}{'p50 us':>9}{'p90 us':>9}{'p99 us':>10}{'req/s':>9}{'server CPU us/req':>19}"
    print(header)
    print("-" * len(header))
    fa = results.get("floor_a", {})
    print(f"{'floor A  in-process session.run':34}{_fmt(fa.get('p50_us')):>9}{_fmt(fa.get('p90_us')):>9}{_fmt(fa.get('p99_us')):>10}{_fmt(fa.get('calls_per_s'), 0):>9}")
    rows = [("floor B  bare broker", _level(results, "floor_b", "levels"), ("broker", "workers"))]
    failed = []
    for mode, data in results.get("daemon", {}).items():
        if data.get("started"):
            rows.append((f"daemon   [{mode}]", data.get("levels") or {}, ("supervisor", "workers")))
        else:
            failed.append(f"daemon   [{mode}] did not start: {str(data.get('error', ''))[:300]}")
    for label, levels, roles in rows:
        for level, f in levels.items():
            cpu = f.get("cpu_us_per_req", {})
            server = " + ".join(_fmt(cpu.get(r), 0) for r in roles)
            errors = f"  errors {f['errors']}" if f.get("errors") else ""
            print(f"{label + '  c=' + level:34}{_fmt(f.get('p50_us')):>9}{_fmt(f.get('p90_us')):>9}{_fmt(f.get('p99_us')):>10}{_fmt(f.get('throughput_rps'), 0):>9}{server:>19}{errors}")
    for line in failed:
        print(line)
    print(f"(server CPU = supervisor + workers, or broker + echo workers; daemon driven by {cfg.get('client', 'openinfer.client.Client.infer')})")
    for mode, per_level in results.get("ratios", {}).items():
        if mode == "sandbox_vs_no_sandbox":
            continue
        print(f"\nratios daemon[{mode}] / floor:")
        for level, r in per_level.items():
            print(f"  c={level:<3} p50/floorA {_fmt(r['p50_vs_floor_a'], 1):>6}x   p50/floorB {_fmt(r['p50_vs_floor_b'], 2):>5}x   "
                  f"p99/floorB {_fmt(r['p99_vs_floor_b'], 2):>5}x   throughput/floorB {_fmt(r['throughput_vs_floor_b'], 2):>5}x")
    compare = results.get("ratios", {}).get("sandbox_vs_no_sandbox")
    if compare:
        print("\nsandbox / no-sandbox:")
        for level, r in compare.items():
            print(f"  c={level:<3} p50 {_fmt(r['p50'], 3)}   p99 {_fmt(r['p99'], 3)}   throughput {_fmt(r['throughput'], 3)}")
    peer = PEERS["fastapi_uvicorn"]
    print(f"\ntargets (FastAPI+uvicorn, 2 workers, here: p50 {peer['p50_us_c1']:g} us at c=1, {peer['throughput_rps_c8']:,.0f} req/s at c=8):")
    for v in results.get("verdicts", []):
        verdict = "n/a" if v["pass"] is None else ("PASS" if v["pass"] else "FAIL")
        print(f"  [{v['mode']}] {v['target']:<45} {_fmt(v['value'], 3 if 'vs' in v['mode'] else 1):>10}   {verdict}")


def plot(results: dict[str, Any], path: Path) -> bool:
    """Draw `path`; False when matplotlib is missing (common.pyplot says so)."""
    plt = pyplot()
    if plt is None:
        return False

    fig, (ax_lat, ax_rps, ax_stage) = plt.subplots(1, 3, figsize=(18, 7.2))
    colors = {"sandbox": "tab:blue", "no-sandbox": "tab:orange"}
    floor_b = _level(results, "floor_b", "levels")
    if floor_b:
        xs = [int(k) for k in floor_b]
        ax_lat.plot(xs, [floor_b[k]["p50_us"] for k in floor_b], color="gray", marker=".", lw=1, label="floor B p50 (bare broker, per level)")
        ax_rps.plot(xs, [floor_b[k]["throughput_rps"] for k in floor_b], color="gray", marker="o", lw=1.5, label="floor B: bare Python broker + 2 echo workers")
    daemons = [(m, d["levels"]) for m, d in results.get("daemon", {}).items() if d.get("levels")]
    for mode, levels in daemons:
        xs = [int(k) for k in levels]
        color = colors.get(mode, "tab:green")
        ax_lat.plot(xs, [levels[k]["p50_us"] for k in levels], color=color, marker="o", lw=2, label=f"daemon [{mode}] p50")
        ax_lat.plot(xs, [levels[k]["p99_us"] for k in levels], color=color, marker="^", lw=1.5, ls="--", label=f"daemon [{mode}] p99")
        ax_rps.plot(xs, [levels[k]["throughput_rps"] for k in levels], color=color, marker="o", lw=2, label=f"daemon [{mode}]")
        for x, k in zip(xs, levels):
            p50, rps = levels[k]["p50_us"], levels[k]["throughput_rps"]
            if p50:
                ax_lat.annotate(f"{p50:,.0f}", (x, p50), textcoords="offset points", xytext=(4, -11), fontsize=7, color=color)
            if rps:
                ax_rps.annotate(f"{rps:,.0f}", (x, rps), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=color)
    fa = results.get("floor_a", {}).get("p50_us")
    if fa:
        ax_lat.axhline(fa, color="tab:green", ls=":", lw=1.5, label=f"floor A: in-process session.run p50 = {fa:.1f} us")
    fb1 = floor_b.get("1", {}).get("p50_us") if floor_b else None
    if fb1:
        ax_lat.axhline(fb1, color="black", ls=":", lw=1.5, label=f"floor B: bare 2-hop zmq p50 at c=1 = {fb1:.0f} us")
    ax_lat.scatter([1], [TARGET_P50_C1_US], marker="*", s=180, color="red", zorder=5, label=f"target: p50 at c=1 <= {TARGET_P50_C1_US:g} us")
    ax_lat.set_yscale("log")
    ax_lat.set_xscale("log", base=2)
    ax_lat.set_title("Client-side latency vs concurrency")
    ax_lat.set_ylabel("microseconds (log scale)")
    peer = PEERS["fastapi_uvicorn"]
    ax_rps.axhline(TARGET_RPS_C8, color="red", ls="--", lw=1, label=f"target at c=8: {TARGET_RPS_C8:,.0f} req/s")
    ax_rps.axhline(peer["throughput_rps_c8"], color="purple", ls=":", lw=1, label=f"FastAPI+uvicorn at c=8: {peer['throughput_rps_c8']:,.0f} req/s")
    ax_rps.set_xscale("log", base=2)
    ax_rps.set_ylim(bottom=0)
    ax_rps.set_title("Throughput vs concurrency (closed loop)")
    ax_rps.set_ylabel("requests / second")
    for ax in (ax_lat, ax_rps):
        levels = results["config"]["levels"]
        ax.set_xticks(levels)
        ax.set_xticklabels([str(x) for x in levels])
        ax.set_xlabel("concurrent client processes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    _plot_stages(ax_stage, daemons)
    machine = results["machine"]
    fig.suptitle(
        f"OpenInfer, tiny model, {results['config']['workers']} workers — median of {results['config']['repeats']} x {results['config']['duration_s']:g} s — "
        f"{machine['cpu_count']} cores, onnxruntime {machine['onnxruntime']}, pyzmq {machine['pyzmq']}, {machine['date'][:10]}",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_stages(ax: Any, daemons: list[tuple[str, dict[str, Any]]]) -> None:
    """Stacked medians of the server-side stages, one bar per (level, mode), plus the client-side
    transport. Queueing grows with concurrency and would hide everything else, so it is stacked last,
    clipped at the top of the axis and labelled with its value."""
    if not daemons:
        ax.text(0.5, 0.5, "no daemon ran", ha="center", va="center", transform=ax.transAxes)
        return
    order = [s for s in STAGES if s != "queue"] + ["transport", "queue"]
    palette = dict(zip(order, ["#8dd3c7", "#bebada", "#fb8072", "#80b1d3", "#b3de69", "#fccde5", "#bc80bd", "#d9d9d9", "#fdb462"]))
    labels = {
        "decode": "decode + validate", "dispatch": "dispatch (supervisor -> worker)", "prep": "worker: decode inputs",
        "compute": "worker: session.run", "encode": "worker: encode outputs", "return": "return (worker -> supervisor)",
        "result": "supervisor: result -> total_us", "transport": "client <-> supervisor (client_us - total_us)",
        "queue": "queue wait (clipped; value printed)",
    }
    width = 0.8 / len(daemons)
    levels = list(daemons[0][1])
    bars = []
    for m, (mode, data) in enumerate(daemons):
        for i, level in enumerate(levels):
            bars.append((i + (m - (len(daemons) - 1) / 2) * width, mode, data.get(level, {}).get("stages_us") or {}))
    top = max((sum(v for k, v in st.items() if k in order and k != "queue" and v) for _, _, st in bars), default=1.0) * 1.45
    seen: set[str] = set()
    for x, mode, stages in bars:
        bottom = 0.0
        for stage in order:
            value = stages.get(stage)
            if value is None or value <= 0:
                continue
            shown = min(value, max(top - bottom, 0.0))
            ax.bar(x, shown, width * 0.92, bottom=bottom, color=palette[stage], edgecolor="white", lw=0.5,
                   hatch="//" if stage == "transport" else None, label=labels[stage] if stage not in seen else None)
            seen.add(stage)
            if stage == "queue" and (value > shown or value > 0.08 * top):
                ax.text(x, min(bottom + value, top) - top * 0.01, f"queue\n{value:,.0f}", ha="center", va="top", fontsize=7)
            bottom += value
        if len(daemons) > 1:
            ax.text(x, top * 0.005, "sandbox" if mode == "sandbox" else "no-sb", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, top)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"c={lv}" for lv in levels])
    ax.set_ylabel("microseconds (median of each stage)")
    ax.set_title("Where a request's time goes (server-side stages)" + (f" [{daemons[0][0]}]" if len(daemons) == 1 else ""))
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)


if __name__ == "__main__":
    sys.exit(main())
