"""Processing steps (issue #19): magika, a file's bytes in and its content type out, through the daemon
(its built-in steps run inside the sandboxed workers) against the `magika` package in process, on the same
real files (tests/real_files.py), same answers; and what the steps cost a request's CPU.

    .venv/bin/python bench/steps.py                 # ~1.5 min: 3 interleaved rounds x 4 s per figure
    .venv/bin/python bench/steps.py --rounds 1 --duration 2     # a quick look
    .venv/bin/python bench/steps.py --plot-only bench/results/steps.json   # redraw the plot

Figures (each the median over rounds; the ratio the median of per-round ratios, both sides back to back):
  daemon_files_per_s    2 sandboxed workers (magika, `workers = 2`); 4 client processes, closed loop, each
                        a sync Client sending whole files (`{"bytes": data}`), files in turn
  library_files_per_s   2 processes, each `magika.Magika().identify_bytes(data)` over the same files in
                        turn (the library's own onnxruntime session, its defaults)
  steps_cpu_ratio       median worker `cpu_us` of `magika` (steps in the worker) over that of
                        `magika_scores` (the same model, features made by the client) on the same files
Targets (the issue's): daemon >= 0.7 x the library; steps add < 5 % to a request's CPU. Reported, never asserted.
Writes bench/results/steps.json and steps.png.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from common import DaemonProcess, add_output_arguments, machine_info, median_of, redrawn, run_together, two_bars, world_readable_copy, write_json  # noqa: E402
from real_files import real_files  # noqa: E402

CLIENT_PROCESSES = 4
LIBRARY_PROCESSES = 2
WORKERS = 2


def _daemon_loop(address: str, paths: list[str], offset: int, duration: float, out: Any) -> None:
    from openinfer.client import Client

    blobs = [Path(p).read_bytes() for p in paths]
    done = 0
    labels: dict[str, str] = {}
    with Client(address, timeout=30) as client:
        client.infer("magika", {"bytes": blobs[0]})
        start = time.monotonic()
        i = offset
        while time.monotonic() - start < duration:
            index = i % len(blobs)
            result = client.infer("magika", {"bytes": blobs[index]})
            labels[paths[index]] = result.outputs["label"].item().decode()
            done += 1
            i += 1
        out.put((done, time.monotonic() - start, labels))


def _library_loop(paths: list[str], offset: int, duration: float, out: Any) -> None:
    from magika import Magika

    blobs = [Path(p).read_bytes() for p in paths]
    magika = Magika()
    magika.identify_bytes(blobs[0])
    done = 0
    labels: dict[str, str] = {}
    start = time.monotonic()
    i = offset
    while time.monotonic() - start < duration:
        index = i % len(blobs)
        labels[paths[index]] = str(magika.identify_bytes(blobs[index]).output.label)
        done += 1
        i += 1
    out.put((done, time.monotonic() - start, labels))


def _run(target: Any, args_for: list[tuple[Any, ...]]) -> tuple[float, dict[str, str]]:
    """Processes started together; files per second summed over them, and the labels they saw."""
    results = run_together(target, args_for, timeout_s=300)
    labels: dict[str, str] = {}
    for _, _, seen in results:
        labels.update(seen)
    return sum(done / elapsed for done, elapsed, _ in results), labels


def _cpu_per_request(address: str, blobs: list[bytes]) -> tuple[float, float]:
    """Median worker cpu_us: magika (steps in the worker) and magika_scores (features made here)."""
    from openinfer.client import Client

    sys.path.insert(0, str(REPO / "examples"))
    from sample_inputs import magika_features

    steps, bare = [], []
    with Client(address, timeout=30) as client:
        for data in blobs:
            if len(data) < 8:
                continue  # no model run with steps: nothing to compare
            steps.append(client.infer("magika", {"bytes": data}).timing["cpu_us"])
            bare.append(client.infer("magika_scores", {"bytes": magika_features(data)[np.newaxis, :]}).timing["cpu_us"])
    return float(np.median(steps)), float(np.median(bare))


def plot(result: dict[str, Any], path: Path) -> None:
    two_bars(path, ["daemon (2 workers)", "magika library (2 processes)"], [result["daemon_files_per_s"], result["library_files_per_s"]],
             "files / s", f"magika, bytes -> label: x{result['ratio']:.2f} (target >= 0.7)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    add_output_arguments(parser, BENCH / "results" / "steps.json")
    args = parser.parse_args(argv)
    if redrawn(args, plot):
        return 0

    files = [str(p) for p in real_files()]
    repo = world_readable_copy(["magika", "magika_scores"])
    # 2 workers each, and no [cache]: the steps and the model run for every file, every time.
    (repo / "magika" / "config.toml").write_text(f'workers = {WORKERS}\nintra_op_threads = 1\n\n[steps]\nmodule = "openinfer:magika"\n')
    (repo / "magika_scores" / "config.toml").write_text(f"workers = {WORKERS}\nintra_op_threads = 1\n")
    rounds: list[dict[str, Any]] = []
    with DaemonProcess(models=repo, workers=WORKERS, label="steps").start(timeout=120) as daemon:
        for round_index in range(args.rounds):
            order = ["daemon", "library"] if round_index % 2 == 0 else ["library", "daemon"]
            figures: dict[str, Any] = {}
            for side in order:
                if side == "daemon":
                    rate, labels = _run(_daemon_loop, [(daemon.address, files, k * 37, args.duration) for k in range(CLIENT_PROCESSES)])
                else:
                    rate, labels = _run(_library_loop, [(files, k * 37, args.duration) for k in range(LIBRARY_PROCESSES)])
                figures[f"{side}_files_per_s"] = rate
                figures[f"{side}_labels"] = labels
            shared = set(figures["daemon_labels"]) & set(figures["library_labels"])
            figures["same_labels"] = sum(figures["daemon_labels"][p] == figures["library_labels"][p] for p in shared)
            figures["compared"] = len(shared)
            figures["ratio"] = figures["daemon_files_per_s"] / figures["library_files_per_s"]
            del figures["daemon_labels"], figures["library_labels"]
            rounds.append(figures)
            print(f"round {round_index + 1}: daemon {figures['daemon_files_per_s']:.0f} files/s, library {figures['library_files_per_s']:.0f} files/s, "
                  f"x{figures['ratio']:.2f}, same labels {figures['same_labels']}/{figures['compared']}")
        steps_cpu, bare_cpu = _cpu_per_request(daemon.address, [Path(p).read_bytes() for p in files])
    result = {
        "config": {"rounds": args.rounds, "duration_s": args.duration, "files": len(files), "workers": WORKERS,
                   "client_processes": CLIENT_PROCESSES, "library_processes": LIBRARY_PROCESSES},
        "machine": machine_info(),
        "rounds": rounds,
        "daemon_files_per_s": median_of(r["daemon_files_per_s"] for r in rounds),
        "library_files_per_s": median_of(r["library_files_per_s"] for r in rounds),
        "ratio": median_of(r["ratio"] for r in rounds),
        "same_labels": f"{sum(r['same_labels'] for r in rounds)}/{sum(r['compared'] for r in rounds)}",
        "steps_cpu_us": steps_cpu,
        "bare_cpu_us": bare_cpu,
        "steps_cpu_ratio": steps_cpu / bare_cpu,
        "targets": {"ratio": ">= 0.7", "steps_cpu_ratio": "< 1.05"},
    }
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"daemon {result['daemon_files_per_s']:.0f} files/s vs library {result['library_files_per_s']:.0f}: x{result['ratio']:.2f} (target >= 0.7); "
          f"same labels {result['same_labels']}; steps CPU {steps_cpu:.0f} us vs bare model {bare_cpu:.0f} us: x{result['steps_cpu_ratio']:.3f} (target < 1.05)")
    shutil.rmtree(repo, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
