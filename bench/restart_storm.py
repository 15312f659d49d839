"""What a hostile steps module costs the host by getting its own workers replaced (attacker rounds 64, 74).

    .venv/bin/python bench/restart_storm.py                 # ~6 min: 2 interleaved rounds of 4 scenes, 20 s each after 20 s
    .venv/bin/python bench/restart_storm.py --seconds 10 --warmup 10 --rounds 1
    /work/other-tree/.venv/bin/python bench/restart_storm.py --out /tmp/before.json   # another tree's daemon
    .venv/bin/python bench/restart_storm.py --plot-only bench/results/restart_storm.json

One sandboxed daemon per scene serves `canary` (examples/models/tiny, 1 worker) and `hostile` (the same
model, 1 worker, behind a steps module that runs a thread from its setup()). The scenes:
  quiet          the thread does nothing (the control);
  crash          it exits the worker 0.1 s after start - a plain crash loop (UNAVAILABLE after 5);
  forged         it books a successful direct answer in the worker's own ledger, then exits (round 74);
  faked-overrun  max_compute_ms = 1, and its deadline page claims a direct run since boot (rounds 64, 74).
No client ever asks `hostile` anything. Meanwhile a client asks `canary` 100 times a second. After a
warm-up (`--warmup`, 20 s: the replacement delays double up to their ceiling), reports, per scene:
hostile workers booted a second, the supervisor's CPU (its own and its reaped workers') a second, and the
canary's p50 and p99; medians over rounds. Writes bench/results/restart_storm.json and .png;
reports, never asserts. The daemon is the one installed beside the Python that runs this file.

Before the fixes (043cd31, b169800), `forged` booted a worker every 0.6-0.75 s for good and `faked-overrun`
~1.3 a second; now each is replaced after a delay doubling to pool.respawn_backoff_max_ms (10 s).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import add_output_arguments, machine_info, median_of, pyplot, redrawn, world_readable_copy, write_json  # noqa: E402

from openinfer.client import Client, OpenInferError  # noqa: E402

SCENES = ("quiet", "crash", "forged", "faked-overrun")

# The hostile model's steps module: SCENE is replaced by the scene's name. It reaches the worker's
# ledger and deadline page through gc, as a step's code can (it runs in the worker's interpreter).
STEPS = '''
import gc, os, threading
import numpy as np
INPUTS = [{"name": "what", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "got", "datatype": "BYTES", "shape": []}]
SCENE = "%s"

def _found(kind):
    while True:
        found = next((o for o in gc.get_objects() if type(o).__name__ == kind), None)
        if found is not None:
            return found
        threading.Event().wait(0.01)

def _act():
    if SCENE == "quiet":
        return
    if SCENE == "faked-overrun":
        _found("DeadlinePage").running(1, 1)
        threading.Event().wait()
    writer = _found("LedgerWriter")
    threading.Event().wait(0.1)
    if SCENE == "forged":
        writer._slots["x"] = 1024
        writer.answered(0, 1, "x", None, {}, 0, 0)
    os._exit(1)

def setup(files):
    threading.Thread(target=_act, daemon=True).start()

def pre(inputs):
    return {"x": np.ones((1, 64), np.float32)}

def post(outputs):
    return {"got": b"ran"}
'''


def repository(scene: str) -> Path:
    root = world_readable_copy(["tiny"])
    (root / "tiny").rename(root / "canary")
    (root / "canary" / "config.toml").write_text("workers = 1\n")
    hostile = root / "hostile"
    (hostile / "1").mkdir(parents=True)
    (hostile / "1" / "model.onnx").write_bytes((root / "canary" / "1" / "model.onnx").read_bytes())
    compute = "max_compute_ms = 1\n" if scene == "faked-overrun" else ""
    (hostile / "config.toml").write_text(f'workers = 1\n{compute}\n[steps]\nmodule = "steps.py"\n')
    (hostile / "steps.py").write_text(STEPS % scene)
    for path in (hostile, hostile / "1"):
        path.chmod(0o755)
    for path in (hostile / "config.toml", hostile / "steps.py", hostile / "1" / "model.onnx"):
        path.chmod(0o644)
    return root


def one_scene(scene: str, seconds: float, warmup: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="oi-restart-"))
    work.chmod(0o755)
    address = f"ipc://{work}/openinfer.sock"
    env = {**os.environ, "OPENINFER_SERVER_RUNTIME_DIR": str(work / "run"), "OPENINFER_SERVER_CACHE_DIR": str(work / "cache")}
    log_path = work / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "openinfer.daemon.cli", "serve", "--models", str(repository(scene)), "--socket", address], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with Client(address, timeout=30) as client:
            deadline = time.monotonic() + 120
            x = {"x": np.ones((1, 64), np.float32)}
            while True:  # (the first answer: the daemon is up and canary served)
                try:
                    client.infer("canary", x)
                    break
                except OpenInferError:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise RuntimeError(f"the daemon never served canary: {log_path.read_text()[-3000:]}") from None
                    time.sleep(0.1)  # (start-up, not measured)
            warm = time.monotonic() + warmup  # the delays' ramp: what goes on for good is measured after it
            while time.monotonic() < warm:
                client.infer("canary", x)
                time.sleep(0.01)
            process = psutil.Process(daemon.pid)
            cpu_before = sum(process.cpu_times()[:4])
            boots_before = _boots(log_path)
            waits: list[float] = []
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                sent = time.perf_counter()
                client.infer("canary", x)
                waits.append(time.perf_counter() - sent)
                time.sleep(max(0.0, 0.01 - waits[-1]))  # ~100 requests a second
            elapsed = time.monotonic() - started
            cpu = sum(process.cpu_times()[:4]) - cpu_before
            boots = _boots(log_path) - boots_before
            unavailable = '"msg":"model unavailable"' in log_path.read_text()
    finally:
        daemon.terminate()
        daemon.wait(60)
    waits_ms = np.array(waits) * 1000
    return {"hostile_boots_per_s": round(boots / elapsed, 3), "supervisor_cpu_per_s": round(cpu / elapsed, 3),
            "canary_p50_ms": round(float(np.percentile(waits_ms, 50)), 3), "canary_p99_ms": round(float(np.percentile(waits_ms, 99)), 3),
            "hostile_unavailable": unavailable}


def _boots(log_path: Path) -> int:
    count = 0
    for line in log_path.read_text().splitlines():
        if '"msg":"worker ready"' in line:
            try:
                count += json.loads(line).get("model") == "hostile"
            except ValueError:
                continue
    return count


def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {scene: [] for scene in SCENES}
    for index in range(args.rounds):  # interleaved, the order reversed every other round
        order = SCENES if index % 2 == 0 else tuple(reversed(SCENES))
        for scene in order:
            runs[scene].append(one_scene(scene, args.seconds, args.warmup))
            print(f"round {index + 1} {scene}: {runs[scene][-1]}", flush=True)
    figures = {scene: {key: median_of(run[key] for run in values) for key in values[0] if key != "hostile_unavailable"} | {"hostile_unavailable": any(run["hostile_unavailable"] for run in values)} for scene, values in runs.items()}
    quiet_cpu = figures["quiet"]["supervisor_cpu_per_s"] or 0.0
    extra = {scene: round((figures[scene]["supervisor_cpu_per_s"] or 0.0) - quiet_cpu, 3) for scene in SCENES}
    import openinfer.daemon

    tree = Path(openinfer.daemon.__file__ or "").resolve().parent.parent  # the checkout whose daemon ran
    return {"config": {"seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds, "daemon": str(tree)},
            "figures": figures, "cpu_over_quiet_per_s": extra, "runs": runs, "machine": machine_info()}


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figures = results["figures"]
    fig, (boots, cpu) = plt.subplots(1, 2, figsize=(9, 3.8))
    boots.bar(list(figures), [figures[s]["hostile_boots_per_s"] for s in figures], color="tab:red")
    boots.set_ylabel("hostile workers booted / s")
    cpu.bar(list(figures), [figures[s]["supervisor_cpu_per_s"] for s in figures], color="tab:blue")
    cpu.set_ylabel("supervisor + reaped workers, CPU s / s")
    for ax in (boots, cpu):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("a steps module replacing its own workers, no client asking it")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds after canary is served before measuring")
    add_output_arguments(parser, BENCH / "results" / "restart_storm.json")
    args = parser.parse_args()
    if redrawn(args, plot):
        return
    results = measure(args)
    write_json(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    for scene, figures in results["figures"].items():
        print(f"{scene:14s} {figures}")
    print(f"CPU over quiet, s/s: {results['cpu_over_quiet_per_s']}")


if __name__ == "__main__":
    main()
