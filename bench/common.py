"""Helpers every benchmark shares: where things are, machine facts, percentiles and medians of repeats,
a world-readable model repository, and a real `openinfer serve` in a subprocess.

Benchmarks are scripts (`python bench/NAME.py`), so siblings import each other by plain module name.
Durations are taken with `time.monotonic_ns` (CLOCK_MONOTONIC: one clock for every process on the host).
"""
from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import argparse

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
EXAMPLE_MODELS = REPO_ROOT / "examples" / "models"
TINY_MODEL = EXAMPLE_MODELS / "tiny" / "1" / "model.onnx"
RESULTS_DIR = BENCH_DIR / "results"

# Reference points from the issue / DESIGN.md §5 (same machine kind, 2 workers, tiny model).
PEERS = {"fastapi_uvicorn": {"p50_us_c1": 230.0, "throughput_rps_c8": 7500.0}}


# -- machine ----------------------------------------------------------------------------------------
def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files: host, versions, load, relevant env vars."""
    import zmq

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": package_version("onnxruntime"),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": package_version("msgpack"),
        "numpy": np.__version__,
        "openinfer": package_version("openinfer"),
        "git_commit": _git_commit(),
        # Set on some hosts for OpenBLAS correctness; benchmarks never change them (see env README).
        "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS") if k in os.environ},
    }
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# -- statistics -------------------------------------------------------------------------------------
def latency_summary(samples_ns: np.ndarray | Sequence[int]) -> dict[str, float | int | None]:
    """p50/p90/p99/mean in microseconds of one run's per-request latencies (nanoseconds in)."""
    arr = np.asarray(samples_ns, dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "p50_us": None, "p90_us": None, "p99_us": None, "mean_us": None}
    p50, p90, p99 = np.percentile(arr, (50, 90, 99)) / 1000.0
    return {"count": int(arr.size), "p50_us": round(float(p50), 2), "p90_us": round(float(p90), 2), "p99_us": round(float(p99), 2), "mean_us": round(float(arr.mean()) / 1000.0, 2)}


def median_of(values: Iterable[float | int | None]) -> float | None:
    """Median that ignores missing values (a run that produced nothing); None when all are missing."""
    kept = [float(v) for v in values if v is not None]
    return round(float(np.median(kept)), 2) if kept else None


def median_of_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Figure-by-figure median over repeated runs of the same measurement (nested dicts of numbers).

    Each figure is the median of that figure, so p50 and p99 of the result may come from different runs:
    that is the point (one noisy run cannot move the reported value)."""
    out: dict[str, Any] = {}
    keys: list[str] = []
    for run in runs:
        for key in run:
            if key not in keys:
                keys.append(key)
    for key in keys:
        values = [run.get(key) for run in runs]
        if any(isinstance(v, Mapping) for v in values):
            out[key] = median_of_runs([v for v in values if isinstance(v, Mapping)])
        elif all(v is None or isinstance(v, (int, float)) for v in values):
            out[key] = median_of(values)  # type: ignore[arg-type]
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


# -- files ------------------------------------------------------------------------------------------
def world_readable_copy(models: Sequence[str], parent: Path | None = None) -> Path:
    """A model repository holding only `models`, copied from examples/models with 0755 dirs and 0644
    files: workers drop to `nobody` when the daemon runs as root and must still read it."""
    root = world_readable_tempdir("oi-bench-models-", parent)
    for name in models:
        shutil.copytree(EXAMPLE_MODELS / name, root / name)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return root


def world_readable_tempdir(prefix: str, parent: Path | None = None) -> Path:
    """A 0755 temp dir, removed when the benchmark exits (one per daemon and repository added up to
    hundreds in /tmp)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    atexit.register(shutil.rmtree, path, True)
    return path


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.rename(path)


# -- plots ------------------------------------------------------------------------------------------
BENCH_SETUP = "bash examples/bootstrap.sh bench"  # .venv with the `bench` extra (matplotlib, py-spy)


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed: then the plot is
    skipped, with a note on stderr. Every benchmark writes its JSON before plotting (and can redraw
    later with --plot-only), so a missing matplotlib never costs a measurement."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: plot skipped (the JSON has every figure; `{BENCH_SETUP}` installs it, "
              "then redraw with --plot-only JSON)", file=sys.stderr, flush=True)
        return None
    return plt


def two_bars(path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str) -> None:
    """A two-bar comparison (the daemon beside its peer), drawn to `path` when matplotlib is there."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(labels), list(values), color=["tab:orange", "tab:blue"])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


def add_output_arguments(parser: "argparse.ArgumentParser", default_out: Path) -> None:
    """--out (the results JSON; the plot goes beside it) and --plot-only (redraw from a results file)."""
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="redraw the plot from a results file")


def redrawn(args: "argparse.Namespace", plot: Callable[[dict[str, Any], Path], None]) -> bool:
    """With --plot-only: the plot drawn again from that results file (True: nothing else to do)."""
    if args.plot_only is None:
        return False
    plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
    return True


# -- processes --------------------------------------------------------------------------------------
def run_together(target: Callable[..., None], args_for: Sequence[tuple[Any, ...]], timeout_s: float = 600) -> list[Any]:
    """Spawned processes started together, `target(*args, queue)` each, which puts one result on the queue;
    the results (in the order they came)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out)) for args in args_for]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=timeout_s) for _ in procs]
    for proc in procs:
        proc.join(30)
    return results


def cpu_seconds(pids: Iterable[int]) -> float:
    """User+system CPU seconds consumed so far by these processes (vanished ones count 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def openinfer_command() -> list[str]:
    """The `openinfer` console script of this interpreter's environment, else `python -m`."""
    script = Path(sys.executable).with_name("openinfer")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "openinfer.daemon.cli"]


class DaemonNotReady(RuntimeError):
    """The daemon exited or did not report ready in time; the message holds the log's tail."""


@dataclass
class DaemonProcess:
    """`openinfer serve` in its own session (process group), on an ipc:// path in a private temp dir.

    Use as a context manager or call start()/stop(). The supervisor is the subprocess itself, so
    `pid` is what py-spy or psutil should look at; `worker_pids()` are its children."""

    models: Path
    workers: int = 2
    sandbox: bool = True
    label: str = "daemon"
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    command: Sequence[str] | None = None  # instead of `openinfer` (e.g. a wrapper script or another checkout)
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        assert self.workdir is not None
        return f"ipc://{self.workdir}/oi.sock"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "daemon.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> "DaemonProcess":
        self.workdir = world_readable_tempdir(f"oi-bench-{self.label}-")
        env = dict(os.environ)
        env.pop("OPENINFER_SOCKET", None)
        env["OPENINFER_SERVER_RUNTIME_DIR"] = str(self.workdir / "run")
        env.update(self.env)
        args = [*(self.command or openinfer_command()), "serve", "--models", str(self.models), "--socket", self.address, "--workers", str(self.workers)]
        if not self.sandbox:
            args.append("--insecure-no-sandbox")
        args.extend(self.extra_args)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Poll `health` through the real client until it says ready (no bare sleeps as readiness)."""
        from openinfer.client import Client, OpenInferError

        assert self.process is not None
        deadline = time.monotonic() + timeout
        last: object = None
        with Client(self.address, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise DaemonNotReady(f"daemon exited with status {self.process.returncode}: {self.failure_reason()}")
                try:
                    health = client.health()
                    if health.get("ready"):
                        return health
                    last = health
                    if health.get("failed"):
                        raise DaemonNotReady(self.failure_reason() or f"model failed to load: {health}")
                except OpenInferError as exc:
                    last = exc
                time.sleep(0.05)
        raise DaemonNotReady(f"not ready after {timeout:.0f} s (last health: {last}): {self.failure_reason()}")

    def failure_reason(self) -> str:
        """The most telling line of the daemon's JSON log: the last error's `reason`, else the tail."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") == "error" and entry.get("reason"):
                return f"{entry.get('msg')}: {entry['reason']}"
        return " | ".join(lines[-3:])

    def worker_pids(self) -> list[int]:
        import psutil

        try:
            return [child.pid for child in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL of the process group if the supervisor does not exit in time; workers
        it leaves behind (identified before the stop, by pid and start time) are killed too."""
        import psutil

        if self.process is None:
            return None
        try:
            workers = psutil.Process(self.pid).children(recursive=True) if self.process.poll() is None else []
        except psutil.Error:
            workers = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the leader is still alive: the group is ours
                self.process.wait()
        for worker in workers:
            try:
                if worker.is_running():  # same pid *and* start time as before the stop
                    worker.kill()
            except psutil.Error:
                pass
        return self.process.returncode

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "DaemonProcess":
        # `with DaemonProcess(...).start(timeout=...) as daemon:` must not start a second daemon (the first
        # would be left running, unreferenced).
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()


def tiny_input(seed: int = 0, batch: int = 1) -> np.ndarray:
    """The tiny model's input `x`: FP32[batch, 64] (256 bytes at batch 1)."""
    return np.random.default_rng(seed).standard_normal((batch, 64), dtype=np.float32)
