"""Dynamic batching on vs off: throughput and p99 of the tiny model at rising concurrency, one run.

Two daemons serve the same tiny model (x FP32[batch,64]) with 2 workers; one has
`[batching] max_batch_size = 32, max_queue_delay_us = 500`. Closed-loop client processes (loadgen.ClientPool;
16 processes is the most these 2 cores carry without measuring the clients). Median of --repeats runs.
Target (issue "Scheduling"): >= 3x throughput with batching at concurrency >= 16, p99 bounded by the queue
delay plus one batch's compute. Writes bench/results/batching.json and batching.png.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import DaemonProcess, machine_info, world_readable_copy, write_json  # noqa: E402
from loadgen import ClientPool  # noqa: E402

from openinfer.client import Client  # noqa: E402

RESULTS = HERE / "results"
BATCHING = "workers = 2\nintra_op_threads = 1\n[batching]\nmax_batch_size = 32\nmax_queue_delay_us = 500\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plain_repo = world_readable_copy(["tiny"])
    batch_repo = world_readable_copy(["tiny"])
    (batch_repo / "tiny" / "config.toml").write_text(BATCHING)
    daemons = {
        "off": DaemonProcess(models=plain_repo, workers=2, label="batch-off").start(timeout=120),
        "on": DaemonProcess(models=batch_repo, workers=2, label="batch-on").start(timeout=120),
    }
    runs: dict[str, dict[int, list[dict[str, float]]]] = {k: {c: [] for c in args.levels} for k in daemons}
    try:
        with ClientPool(max(args.levels)) as pool:
            for _ in range(args.repeats):
                for c in args.levels:
                    for name, daemon in daemons.items():
                        result = pool.run(("daemon", daemon.address), c, args.duration)
                        lat = result.latencies_ns / 1000
                        runs[name][c].append(
                            {
                                "throughput_rps": result.throughput_rps,
                                "p50_us": float(np.percentile(lat, 50)) if lat.size else float("nan"),
                                "p99_us": float(np.percentile(lat, 99)) if lat.size else float("nan"),
                                "compute_us": float(np.median(result.stages_us["compute_us"])) if "compute_us" in result.stages_us else float("nan"),
                                "queue_us": float(np.median(result.stages_us["queue_us"])) if "queue_us" in result.stages_us else float("nan"),
                                "errors": sum(result.errors.values()),
                            }
                        )
                        print(f"c={c:<3} batching {name:3s}  {runs[name][c][-1]['throughput_rps']:8.0f} req/s  p99 {runs[name][c][-1]['p99_us']:8.0f} µs")
        with Client(daemons["on"].address) as client:
            batch_sizes = client.stats()["models"]["tiny"].get("batch_sizes", {}).get("1", {})
    finally:
        for daemon in daemons.values():
            daemon.stop()
            daemon.cleanup()
        shutil.rmtree(plain_repo, ignore_errors=True)
        shutil.rmtree(batch_repo, ignore_errors=True)
    summary: dict[str, dict[int, dict[str, float]]] = {
        name: {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in per.items()} for name, per in runs.items()
    }
    verdicts: dict[str, Any] = {}
    for c in args.levels:
        if c >= 16:
            ratio = summary["on"][c]["throughput_rps"] / summary["off"][c]["throughput_rps"]
            verdicts[f"throughput x{ratio:.2f} at c={c} (>= 3x)"] = ratio >= 3
    result_json = {"machine": machine_info(), "params": vars(args), "batching_config": BATCHING, "summary": summary, "batch_sizes": batch_sizes, "verdicts": verdicts}
    write_json(RESULTS / "batching.json", result_json)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.2))
    for name in ("off", "on"):
        a1.plot(args.levels, [summary[name][c]["throughput_rps"] for c in args.levels], "o-", label=f"batching {name}")
        a2.plot(args.levels, [summary[name][c]["p99_us"] / 1000 for c in args.levels], "o-", label=f"batching {name}")
    a1.set_xlabel("concurrency")
    a1.set_ylabel("req/s")
    a1.legend()
    a2.set_xlabel("concurrency")
    a2.set_ylabel("p99 ms")
    a2.legend()
    sizes = sorted((int(k), v) for k, v in batch_sizes.items())
    a3.bar([str(k) for k, _ in sizes], [v for _, v in sizes])
    a3.set_xlabel("batch size (requests per run)")
    a3.set_ylabel("runs")
    fig.tight_layout()
    fig.savefig(RESULTS / "batching.png", dpi=110)
    for c in args.levels:
        on, off = summary["on"][c], summary["off"][c]
        print(f"c={c:<3} off {off['throughput_rps']:7.0f} req/s p99 {off['p99_us']:7.0f} µs | on {on['throughput_rps']:7.0f} req/s p99 {on['p99_us']:7.0f} µs (x{on['throughput_rps'] / off['throughput_rps']:.2f})")
    for name, ok in verdicts.items():
        print(f"  {name}: {'PASS' if ok else 'FAIL'}")
    print(f"batch sizes: {batch_sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
