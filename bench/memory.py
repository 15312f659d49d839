"""Memory of N workers on one ~256 MiB model: weights shared (prepared once, mapped by every worker) vs
naive (each worker loads its own copy), plus compute time vs in-process onnxruntime and start-up times.

Targets (issue "Weights loaded once"): each extra worker <= 40 MB; compute within 10 % of in-process
defaults; respawn-to-ready <= 1/5 of a cold load. Writes bench/results/memory.json and memory.png.

    python bench/memory.py [--workers 1 2 4 8] [--repeats 1]
    python bench/memory.py --plot-only bench/results/memory.json   # redraw the plot from a results file
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import DaemonProcess, machine_info, pyplot, world_readable_tempdir, write_json  # noqa: E402
import onnx_builders  # noqa: E402

from openinfer.client import Client  # noqa: E402

RESULTS = HERE / "results"
X = np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32)


def tree_pss(pid: int) -> tuple[int, list[int]]:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    uss = []
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        total += info.pss
        if proc.pid != pid:
            uss.append(info.uss)
    return total, uss


def ready_workers(client: Client) -> list[dict[str, Any]]:
    return [w for w in client.status()["workers"] if w["state"] == "ready"]


def measure(repo: Path, n: int, share: bool) -> dict[str, Any]:
    (repo / "large" / "config.toml").write_text(f"workers = {n}\n")
    env = {"OPENINFER_POOL_SHARE_WEIGHTS": "true" if share else "false"}
    started = time.monotonic()
    daemon = DaemonProcess(models=repo, workers=n, label=f"mem-{'shared' if share else 'naive'}-{n}", env=env).start(timeout=600)
    cold_s = time.monotonic() - started
    try:
        with Client(daemon.address, timeout=120) as client:
            compute = []
            for _ in range(10 * n):  # enough that every worker ran (idle workers are used in turn)
                compute.append(client.infer("large", {"x": X}).timing["compute_us"])
            workers = ready_workers(client)
            served = [w["tasks_served"] for w in workers]
            pss, uss = tree_pss(daemon.pid)
            respawn_s = None
            if share:
                victim = workers[0]["pid"]
                killed = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                while True:
                    current = ready_workers(client)
                    if len(current) == n and victim not in [w["pid"] for w in current]:
                        break
                    time.sleep(0.02)
                respawn_s = time.monotonic() - killed
        return {
            "workers": n,
            "shared": share,
            "pss_total_mib": pss / 2**20,
            "worker_uss_mib": [u / 2**20 for u in uss],
            "tasks_served": served,
            "compute_us_median": statistics.median(compute),
            "cold_start_s": cold_s,
            "respawn_to_ready_s": respawn_s,
        }
    finally:
        daemon.stop()
        daemon.cleanup()


def in_process_compute_us(model: Path) -> float:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": X})
    times = []
    for _ in range(30):
        t = time.perf_counter_ns()
        session.run(None, {"x": X})
        times.append((time.perf_counter_ns() - t) / 1000)
    return statistics.median(times)


def slope(points: list[dict[str, Any]]) -> float:
    xs = [p["workers"] for p in points]
    ys = [p["pss_total_mib"] for p in points]
    return float(np.polyfit(xs, ys, 1)[0]) if len(points) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="redraw the plot from a results file")
    args = parser.parse_args(argv)
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0
    repo = world_readable_tempdir("oi-bench-memory-")
    model = onnx_builders.large_matmul_model(repo / "large" / "1" / "model.onnx", layers=4)
    for path in repo.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    weights_mib = model.stat().st_size / 2**20
    try:
        in_process = in_process_compute_us(model)
        shared = [measure(repo, n, True) for n in args.workers]
        naive = [measure(repo, n, False) for n in args.workers]
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    shared_slope, naive_slope = slope(shared), slope(naive)
    compute_ratio = statistics.median(p["compute_us_median"] for p in shared) / in_process
    cold = shared[0]["cold_start_s"]
    respawn = statistics.median(p["respawn_to_ready_s"] for p in shared if p["respawn_to_ready_s"] is not None)
    verdicts = {
        "extra worker <= 40 MB (shared)": (round(shared_slope, 1), shared_slope <= 40),
        "compute within 10 % of in-process": (round(compute_ratio, 3), compute_ratio <= 1.10),
        "respawn-to-ready <= 1/5 of cold start": (round(respawn / cold, 3), respawn <= cold / 5),
    }
    result = {
        "machine": machine_info(),
        "weights_mib": weights_mib,
        "in_process_compute_us": in_process,
        "shared": shared,
        "naive": naive,
        "pss_mib_per_extra_worker": {"shared": shared_slope, "naive": naive_slope},
        "verdicts": {k: {"value": v, "pass": ok} for k, (v, ok) in verdicts.items()},
    }
    write_json(RESULTS / "memory.json", result)
    plot(result, RESULTS / "memory.png")
    print(f"weights {weights_mib:.0f} MiB; PSS per extra worker: shared {shared_slope:.1f} MiB, naive {naive_slope:.1f} MiB")
    for p in shared + naive:
        print(f"  {'shared' if p['shared'] else 'naive '} n={p['workers']}: PSS {p['pss_total_mib']:.0f} MiB, worker USS {[round(u) for u in p['worker_uss_mib']]}, compute {p['compute_us_median']:.0f} µs, cold {p['cold_start_s']:.1f} s")
    print(f"in-process compute {in_process:.0f} µs; respawn {respawn:.2f} s vs cold {cold:.2f} s")
    for name, (value, ok) in verdicts.items():
        print(f"  {name:45s} {value!s:>10}  {'PASS' if ok else 'FAIL'}")
    return 0


def plot(result: dict[str, Any], path: Path) -> bool:
    """Draw `path` from a memory.json; False when matplotlib is missing (common.pyplot says so)."""
    plt = pyplot()
    if plt is None:
        return False
    shared, naive = result["shared"], result["naive"]
    slopes = result["pss_mib_per_extra_worker"]
    respawns = [p["respawn_to_ready_s"] for p in shared if p["respawn_to_ready_s"] is not None]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.2))
    a1.plot([p["workers"] for p in shared], [p["pss_total_mib"] for p in shared], "o-", label=f"shared ({slopes['shared']:.0f} MiB/worker)")
    a1.plot([p["workers"] for p in naive], [p["pss_total_mib"] for p in naive], "s-", label=f"naive ({slopes['naive']:.0f} MiB/worker)")
    a1.set_xlabel("workers")
    a1.set_ylabel("PSS of daemon + workers (MiB)")
    a1.set_title(f"{result['weights_mib']:.0f} MiB model")
    a1.legend()
    a2.bar(["in-process", *[f"shared n={p['workers']}" for p in shared]], [result["in_process_compute_us"], *[p["compute_us_median"] for p in shared]])
    a2.set_ylabel("compute µs (median)")
    a2.tick_params(axis="x", rotation=30)
    a3.bar(["cold start (1 worker)", "respawn (median)"], [shared[0]["cold_start_s"], statistics.median(respawns)])
    a3.set_ylabel("seconds to ready")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
