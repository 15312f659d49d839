"""Soak: a fixed request rate for N minutes while workers are SIGKILLed and the repository reloaded.

Reports requests sent / answered / failed by code (every request must get exactly one answer: lost = sent -
answered), the supervisor's RSS, fds and threads over time, and writes bench/results/soak.json + soak.png.
Targets (issue "Nothing lost under faults"): 0 lost requests, supervisor memory flat.

    python bench/soak.py --minutes 2 --rate 300 --kill-every 5 --reload-every 20
    python bench/soak.py --plot-only bench/results/soak.json    # redraw the plot from a results file
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DaemonProcess, machine_info, pyplot, world_readable_copy, write_json  # noqa: E402

from openinfer.client import Client, OpenInferError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load_thread(address: str, rate: float, stop: threading.Event, outcomes: Counter[str], lock: threading.Lock, seed: int) -> None:
    """Open loop at `rate` req/s from one client: a request is sent every 1/rate s whatever happens."""
    rng = np.random.default_rng(seed)
    interval = 1.0 / rate
    next_at = time.monotonic()
    with Client(address, timeout=10, client_name=f"soak-{seed}") as client:
        while not stop.is_set():
            x = rng.standard_normal((1, 64)).astype(np.float32)
            try:
                client.infer("tiny", {"x": x})
                code = "OK"
            except OpenInferError as exc:
                code = exc.code
            with lock:
                outcomes[code] += 1
                outcomes["sent"] += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=300.0, help="total requests per second")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between worker SIGKILLs")
    parser.add_argument("--reload-every", type=float, default=20.0, help="seconds between SIGHUP reloads")
    parser.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="redraw the plot from a results file")
    args = parser.parse_args(argv)
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0

    models = world_readable_copy(["tiny"])
    daemon = DaemonProcess(models=models, workers=2, label="soak").start(timeout=120)
    supervisor = psutil.Process(daemon.pid)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=load_thread, args=(daemon.address, args.rate / args.clients, stop, outcomes, lock, i)) for i in range(args.clients)]
    samples: list[dict[str, float]] = []
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    for t in threads:
        t.start()
    next_kill = started + args.kill_every
    next_reload = started + args.reload_every
    end = started + args.minutes * 60
    rng = random.Random(1)
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            samples.append(
                {
                    "t": round(now - started, 2),
                    "rss_mib": supervisor.memory_info().rss / 2**20,
                    "fds": supervisor.num_fds(),
                    "threads": supervisor.num_threads(),
                    "answered": sum(v for k, v in outcomes.items() if k != "sent"),
                }
            )
            if now >= next_kill:
                pids = daemon.worker_pids()
                if pids:
                    victim = rng.choice(pids)
                    os.kill(victim, signal.SIGKILL)
                    events.append({"t": round(now - started, 2), "event": "kill", "pid": victim})
                next_kill += args.kill_every
            if now >= next_reload:
                # Touch the model (new inode, same content) so the reload really replaces it.
                path = models / "tiny" / "1" / "model.onnx"
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(path.read_bytes())
                tmp.chmod(0o644)
                tmp.rename(path)
                os.kill(daemon.pid, signal.SIGHUP)
                events.append({"t": round(now - started, 2), "event": "reload"})
                next_reload += args.reload_every
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        with Client(daemon.address) as admin:
            stats = admin.stats()
        daemon.stop()
    answered = sum(v for k, v in outcomes.items() if k != "sent")
    first = samples[len(samples) // 10] if samples else {}
    last = samples[-1] if samples else {}
    result = {
        "machine": machine_info(),
        "params": vars(args),
        "sent": outcomes["sent"],
        "answered": answered,
        "lost": outcomes["sent"] - answered,
        "by_code": {k: v for k, v in outcomes.items() if k != "sent"},
        "daemon_counted": stats["models"].get("tiny", {}).get("requests"),
        "kills": sum(1 for e in events if e["event"] == "kill"),
        "reloads": sum(1 for e in events if e["event"] == "reload"),
        "supervisor_rss_mib": {"after_warmup": first.get("rss_mib"), "end": last.get("rss_mib")},
        "supervisor_fds": {"after_warmup": first.get("fds"), "end": last.get("fds")},
        "samples": samples,
        "events": events,
    }
    write_json(RESULTS / "soak.json", result)
    plot(result, RESULTS / "soak.png")
    print(f"sent {result['sent']}  answered {answered}  lost {result['lost']}  by code {result['by_code']}")
    print(f"kills {result['kills']}  reloads {result['reloads']}  supervisor RSS {result['supervisor_rss_mib']}  fds {result['supervisor_fds']}")
    print(f"target: 0 lost -> {'PASS' if result['lost'] == 0 else 'FAIL'}")
    return 0


def plot(result: dict[str, Any], path: Path) -> bool:
    """Draw `path` from a soak.json; False when matplotlib is missing (common.pyplot says so)."""
    plt = pyplot()
    if plt is None:
        return False
    samples, events = result["samples"], result["events"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ts = [s["t"] for s in samples]
    ax1.plot(ts, [s["rss_mib"] for s in samples], label="supervisor RSS (MiB)")
    ax1.set_ylabel("MiB")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="lower right")
    ax2.plot(ts, [s["answered"] for s in samples], label="requests answered")
    for e in events:
        ax2.axvline(e["t"], color="red" if e["event"] == "kill" else "green", alpha=0.3, lw=1)
    ax2.set_xlabel("seconds (red: worker SIGKILL, green: reload)")
    ax2.legend(loc="lower right")
    fig.suptitle(f"soak: {result['sent']} sent, {result['lost']} lost, {result['kills']} kills, {result['reloads']} reloads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
