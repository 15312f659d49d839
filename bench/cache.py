"""The verdict cache (issue #19): how long a hit takes against a miss, for the tiny model and for magika
(a file's bytes through its steps), through the daemon a user runs (sandboxed, direct path, Python Client).

    .venv/bin/python bench/cache.py                  # ~40 s: 5 interleaved rounds
    .venv/bin/python bench/cache.py --rounds 2 --requests 100
    .venv/bin/python bench/cache.py --plot-only bench/results/cache.json   # redraw the plot

Each round sends, per model, `requests` misses (inputs never seen: tiny's x shifted by a counter; a real
file with the round's and request's number appended) and `requests` hits (one input, asked again), the
two alternating in order every other round. Figures: client-measured p50 of each, and their ratio per
round (median over rounds); and the same from the daemon's side, the replies' `timing.total_us` (the
worker's read of the request to its reply): what a hit saves, without the round trip both pay. Targets (the issue's): a hit <= 0.5 x a miss for tiny, <= 0.1 x for magika.
Writes bench/results/cache.json and cache.png; reports, never asserts.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

from common import DaemonProcess, add_output_arguments, machine_info, median_of, pyplot, redrawn, world_readable_copy, write_json  # noqa: E402
from real_files import real_files  # noqa: E402

from openinfer.client import Client  # noqa: E402

TARGETS = {"tiny": 0.5, "magika": 0.1}


def _timed(call: Callable[[], Any]) -> tuple[float, float]:
    """The call's latency seen by the client, and the daemon's own (the reply's timing.total_us: from
    the worker reading the request to its reply), in microseconds."""
    start = time.perf_counter_ns()
    result = call()
    return (time.perf_counter_ns() - start) / 1000, float(result.timing["total_us"])


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    models = [m for m in (*TARGETS, "tiny_c") if m in result]  # tiny_c: tiny with the C generator
    labels = {"tiny": "tiny (Python)", "magika": "magika (Python)", "tiny_c": "tiny (C)"}
    ax.bar([f"{labels[m]}\nmiss" for m in models] + [f"{labels[m]}\nhit" for m in models], [result[m]["miss_p50_us"] for m in models] + [result[m]["hit_p50_us"] for m in models],
           color=["tab:blue"] * len(models) + ["tab:orange"] * len(models))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency, µs (log)")
    ax.set_title("verdict cache: hit vs miss (sandboxed, direct path)")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    add_output_arguments(parser, BENCH / "results" / "cache.json")
    args = parser.parse_args(argv)
    if redrawn(args, plot):
        return 0

    repo = world_readable_copy(["tiny", "magika"])
    (repo / "tiny" / "config.toml").write_text("workers = 1\nintra_op_threads = 1\n\n[cache]\nentries = 100000\nmax_bytes = 268435456\n")
    blobs = [p.read_bytes() for p in real_files()]
    rounds: list[dict[str, Any]] = []
    with DaemonProcess(models=repo, workers=1, label="cache").start(timeout=120) as daemon, Client(daemon.address, timeout=30) as client:
        x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
        client.infer("tiny", {"x": x})
        client.infer("magika", {"bytes": blobs[0]})
        for round_index in range(args.rounds):
            figures: dict[str, Any] = {}
            for model in ("tiny", "magika"):
                def miss(i: int) -> Any:
                    if model == "tiny":
                        return lambda: _expect(client.infer("tiny", {"x": x + (round_index * 100_000 + i + 1)}), "miss")
                    return lambda: _expect(client.infer("magika", {"bytes": blobs[i % len(blobs)] + f"\n{round_index}.{i}\n".encode()}), "miss")

                hit_input: dict[str, Any] = {"x": x} if model == "tiny" else {"bytes": blobs[1]}
                client.infer(model, hit_input)

                def hit(i: int) -> Any:
                    return lambda: _expect(client.infer(model, hit_input), "hit")

                order = [("miss", miss), ("hit", hit)] if round_index % 2 == 0 else [("hit", hit), ("miss", miss)]
                samples: dict[str, list[tuple[float, float]]] = {}
                for kind, make in order:
                    samples[kind] = [_timed(make(i)) for i in range(args.requests)]
                figures[model] = {f"{kind}_p50_us": float(np.median([seen for seen, _ in values])) for kind, values in samples.items()}
                figures[model].update({f"{kind}_daemon_p50_us": float(np.median([daemon for _, daemon in values])) for kind, values in samples.items()})
                figures[model]["ratio"] = figures[model]["hit_p50_us"] / figures[model]["miss_p50_us"]
                figures[model]["daemon_ratio"] = figures[model]["hit_daemon_p50_us"] / figures[model]["miss_daemon_p50_us"]
            rounds.append(figures)
            print(f"round {round_index + 1}: " + "; ".join(f"{m} hit {f['hit_p50_us']:.0f} us / miss {f['miss_p50_us']:.0f} us = x{f['ratio']:.3f}" for m, f in figures.items()))
        stats = client.stats()["models"]
    result: dict[str, Any] = {
        "config": {"rounds": args.rounds, "requests": args.requests, "client": "openinfer.client.Client (sync, direct path)", "sandboxed": True},
        "machine": machine_info(),
        "rounds": rounds,
        "targets": {model: f"hit p50 <= {bound} x miss p50" for model, bound in TARGETS.items()},
        "daemon_stats": {model: stats[model].get("cache") for model in TARGETS},
    }
    for model, bound in TARGETS.items():
        ratio = median_of(r[model]["ratio"] for r in rounds)
        daemon_ratio = median_of(r[model]["daemon_ratio"] for r in rounds)
        result[model] = {"hit_p50_us": median_of(r[model]["hit_p50_us"] for r in rounds), "miss_p50_us": median_of(r[model]["miss_p50_us"] for r in rounds), "ratio": ratio, "met": ratio is not None and ratio <= bound,
                         "hit_daemon_p50_us": median_of(r[model]["hit_daemon_p50_us"] for r in rounds), "miss_daemon_p50_us": median_of(r[model]["miss_daemon_p50_us"] for r in rounds), "daemon_ratio": daemon_ratio,
                         "daemon_met": daemon_ratio is not None and daemon_ratio <= bound}
        print(f"{model}: hit {result[model]['hit_p50_us']:.0f} us vs miss {result[model]['miss_p50_us']:.0f} us: x{ratio:.3f} (target <= {bound}: {'met' if result[model]['met'] else 'NOT met'}); "
              f"in the daemon (timing.total_us) hit {result[model]['hit_daemon_p50_us']:.0f} us vs miss {result[model]['miss_daemon_p50_us']:.0f} us: x{daemon_ratio:.3f} ({'met' if result[model]['daemon_met'] else 'NOT met'})")
    result["tiny_c"] = _c_generator(repo, args.rounds)
    shutil.rmtree(repo, ignore_errors=True)
    c = result["tiny_c"]
    print(f"tiny, C generator: hit {c['hit_p50_us']:.0f} us vs miss {c['miss_p50_us']:.0f} us: x{c['ratio']:.3f} (target <= 0.5: {'met' if c['met'] else 'NOT met'})")
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    return 0


def _c_generator(repo: Path, rounds: int) -> dict[str, Any]:
    """tiny again with bench/cwire (~5 us of CPU per request, direct path, c = 1): misses with
    --distinct (each request's x carries its id), hits with one x throughout. A fresh daemon."""
    from cwireload import CWirePool

    x = np.ones((1, 64), np.float32)
    ratios, hits, misses = [], [], []
    with DaemonProcess(models=repo, workers=1, label="cache-c").start(timeout=120) as daemon, \
            CWirePool("tiny", "x", x, path="direct", distinct=True) as missing, CWirePool("tiny", "x", x, path="direct") as hitting:
        for round_index in range(rounds):
            pair = {}
            for kind, pool in ([("miss", missing), ("hit", hitting)] if round_index % 2 == 0 else [("hit", hitting), ("miss", missing)]):
                run = pool.run(daemon.address, 1, 1.0, 0.2)
                pair[kind] = float(np.median(run.latencies_ns)) / 1000
            hits.append(pair["hit"])
            misses.append(pair["miss"])
            ratios.append(pair["hit"] / pair["miss"])
            print(f"round {round_index + 1}: tiny (C) hit {pair['hit']:.0f} us / miss {pair['miss']:.0f} us = x{ratios[-1]:.3f}")
        with Client(daemon.address) as client:
            stats = client.stats()["models"]["tiny"]["cache"]
    ratio = median_of(ratios)
    return {"hit_p50_us": median_of(hits), "miss_p50_us": median_of(misses), "ratio": ratio, "met": ratio is not None and ratio <= TARGETS["tiny"], "daemon_stats": stats,
            "generator": "bench/cwire, direct path, c = 1, 1 s per figure"}


def _expect(result: Any, outcome: str) -> Any:
    if result.cache != outcome:
        raise SystemExit(f"expected a cache {outcome}, got {result.cache}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
