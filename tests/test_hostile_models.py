"""Hostile models on a live daemon, seen from the attacker's side: each one fails alone, quickly, without
taking the host's memory, while a good model next to it keeps answering correctly.

One daemon serves, from a world-readable repository:
  good      a 64x64 MatMul + bias (the canary; its expected output is computed here with numpy)
  bomb      ConstantOfShape of ~10 GB floats at request time, `memory_limit_mb = 1024`
  warmbomb  ConstantOfShape of 2 GiB that fires on the warm-up's all-zero input, `memory_limit_mb = 1024`
  spin      a Loop of 10^12 iterations, `max_compute_ms = 1500`

A `MemoryWatch` samples every child of the daemon from before the first worker starts until the end of
the module: the high-water mark of each worker's RSS (VmHWM, which the kernel keeps, so no peak is lost
between samples) and the lowest memory the host had available.

The last test stops the daemon under strace (sessions are torn down, which is when onnxruntime's
telemetry would write): keep it last.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, log_records, start_daemon, wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from repo_builder import make_world_readable

pytestmark = pytest.mark.live

MiB = 1024 * 1024
LIMIT_MB = 1024
SPIN_MAX_COMPUTE_MS = 1500
GOOD_SEED = 3
X = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(1, 64)


def expected_good(x: np.ndarray) -> np.ndarray:
    """What onnx_builders.matmul_model(seed=GOOD_SEED) computes, redone with numpy."""
    rng = np.random.default_rng(GOOD_SEED)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    bias = rng.standard_normal((64,)).astype(np.float32)
    return x @ weight + bias


def warm_up_bomb_model(path: Path, elements: int = 2 * 1024**3 // 4) -> Path:
    """Like memory_bomb_model, but the shape is `scale + x`: the warm-up's all-zero input sets it off too."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["scale", "x"], ["dims"]),
            helper.make_node("ConstantOfShape", ["dims"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "warm_bomb",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array([elements], dtype=np.int64), "scale")],
    )
    model = helper.make_model(graph, opset_imports=onnx_builders.OPSET)
    model.ir_version = 10
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# -- observation helpers ------------------------------------------------------------------------------
def vm_hwm_bytes(pid: int) -> int | None:
    """The kernel's high-water mark of the process's RSS, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def address_space_limit(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_AS of the process from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            soft, hard = line[len("Max address space"):].split()[:2]
            return int(soft), int(hard)
    raise AssertionError(f"no address-space line in /proc/{pid}/limits")


class MemoryWatch:
    """Samples the daemon's children every 10 ms: peak RSS per pid, lowest host MemAvailable."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.peak_rss: dict[int, int] = {}
        self.min_available = psutil.virtual_memory().available
        self.samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def start(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            parent = psutil.Process(self.daemon_pid)
            while not self._stop.is_set():
                try:
                    children = parent.children(recursive=True)
                except psutil.Error:
                    children = []
                for child in children:
                    hwm = vm_hwm_bytes(child.pid)
                    if hwm is not None:
                        with self._lock:
                            self.peak_rss[child.pid] = max(self.peak_rss.get(child.pid, 0), hwm)
                available = psutil.virtual_memory().available
                with self._lock:
                    self.min_available = min(self.min_available, available)
                    self.samples += 1
                self._stop.wait(0.01)
        except Exception as exc:  # never let a thread exception turn into a warning-as-error elsewhere
            self.error = repr(exc)

    def reset_available(self) -> int:
        with self._lock:
            self.min_available = psutil.virtual_memory().available
            return self.min_available

    def peak_of(self, pid: int) -> int:
        with self._lock:
            peak = self.peak_rss.get(pid, 0)
        live = vm_hwm_bytes(pid)
        return max(peak, live or 0)


# -- the daemon ---------------------------------------------------------------------------------------
class HostileDaemon:
    def __init__(self, running: RunningDaemon, watch: MemoryWatch) -> None:
        self.running = running
        self.watch = watch
        self.admin = running.client(timeout=10)

    def workers(self, model: str, states: tuple[str, ...] = ("ready", "busy")) -> list[dict[str, Any]]:
        return [w for w in self.admin.status()["workers"] if w["model"] == model and w["state"] in states]

    def pids(self, model: str, states: tuple[str, ...] = ("ready", "busy")) -> list[int]:
        return [w["pid"] for w in self.workers(model, states)]


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileDaemon]:
    root = world_readable_dir("oi-hostile-models-")
    onnx_builders.matmul_model(root / "good" / "1" / "model.onnx", seed=GOOD_SEED)
    onnx_builders.memory_bomb_model(root / "bomb" / "1" / "model.onnx")
    (root / "bomb" / "config.toml").write_text(f"memory_limit_mb = {LIMIT_MB}\n")
    warm_up_bomb_model(root / "warmbomb" / "1" / "model.onnx")
    (root / "warmbomb" / "config.toml").write_text(f"memory_limit_mb = {LIMIT_MB}\n")
    onnx_builders.endless_loop_model(root / "spin" / "1" / "model.onnx")
    (root / "spin" / "config.toml").write_text(f"max_compute_ms = {SPIN_MAX_COMPUTE_MS}\n")
    make_world_readable(root)
    running = start_daemon(root, wait=False)
    watch = MemoryWatch(running.process.pid).start()  # before any worker can have allocated anything
    try:
        running.wait_ready(90)
        yield HostileDaemon(running, watch)
    finally:
        watch.stop()
        running.stop()
        cleanup_workdir(running)
        shutil.rmtree(root, ignore_errors=True)


class GoodTraffic:
    """A background client hammering the good model; records (monotonic time, outcome) per request."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.outcomes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)
        self._expected = expected_good(X)

    def _run(self) -> None:
        try:
            with Client(self.address, timeout=30) as client:
                while not self._stop.is_set():
                    try:
                        y = client.infer("good", {"x": X}).outputs["y"]
                        ok = np.allclose(y, self._expected, rtol=1e-4, atol=1e-4)
                        self.outcomes.append((time.monotonic(), "OK" if ok else "WRONG"))
                    except OpenInferError as exc:
                        self.outcomes.append((time.monotonic(), exc.code))
        except Exception as exc:
            self.outcomes.append((time.monotonic(), f"client error: {exc!r}"))

    def successes_between(self, start: float, end: float) -> int:
        return sum(1 for t, outcome in list(self.outcomes) if start <= t <= end and outcome == "OK")

    def failures(self) -> list[str]:
        return [outcome for _, outcome in self.outcomes if outcome != "OK"]

    def __enter__(self) -> "GoodTraffic":
        self._thread.start()
        wait_for(lambda: len(self.outcomes) >= 20, 15, "the good model's first 20 answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# -- (a) memory bomb ----------------------------------------------------------------------------------
def test_memory_bomb_fails_alone_inside_its_memory_limit(hostile: HostileDaemon) -> None:
    """10 GB asked, RLIMIT_AS = 1 GiB: the request fails on its own, the host keeps its memory."""
    (bomb,) = hostile.workers("bomb")
    pid = bomb["pid"]
    assert address_space_limit(pid) == (LIMIT_MB * MiB, LIMIT_MB * MiB)  # config.toml's limit, not the default
    with GoodTraffic(hostile.running.address) as good, Client(hostile.running.address, timeout=60) as client:
        available_before = hostile.watch.reset_available()
        with pytest.raises(OpenInferError) as info:
            client.infer("bomb", {"x": np.array([1], np.int64)})
        ended = time.monotonic()
        sampled = hostile.watch.samples
        wait_for(lambda: hostile.watch.samples >= sampled + 3, 10, "a few more samples of the host's memory after the reply")
        drop = available_before - hostile.watch.min_available
        wait_for(lambda: good.successes_between(ended, float("inf")) >= 20, 15, "the good model after the bomb")
    # Stopped by its memory limit: an allocation that thrashed on until max_compute_ms would have been
    # DEADLINE_EXCEEDED (no wall-clock bound here: that is a speed figure, and flaky on a busy machine).
    assert info.value.code in ("RESOURCE_EXHAUSTED", "WORKER_CRASHED"), info.value
    if info.value.code == "WORKER_CRASHED":  # it died: it must be replaced
        wait_for(lambda: [p for p in hostile.pids("bomb") if p != pid], 20, "a replacement bomb worker", daemon=hostile.running)
    else:  # it survived its own failure: still healthy, fails the same way again
        assert hostile.pids("bomb") == [pid]
        with pytest.raises(OpenInferError) as again, Client(hostile.running.address, timeout=60) as client:
            client.infer("bomb", {"x": np.array([1], np.int64)})
        assert again.value.code == "RESOURCE_EXHAUSTED"
        assert hostile.pids("bomb") == [pid]
    assert hostile.watch.error is None, hostile.watch.error
    peak = hostile.watch.peak_of(pid)
    assert 0 < peak <= LIMIT_MB * MiB, f"bomb worker's RSS peaked at {peak / MiB:.0f} MiB (limit {LIMIT_MB})"
    # Other processes share this host: only a drop of the bomb's order of size counts.
    assert drop < 2048 * MiB, f"host MemAvailable dropped by {drop / MiB:.0f} MiB while the bomb ran"
    assert good.failures() == [], good.failures()[:5]


def test_a_bomb_set_off_by_the_warm_up_is_held_by_the_memory_limit(hostile: HostileDaemon) -> None:
    """The model file is attacker-controlled: a bomb that fires on the warm-up's all-zero input must be
    bounded like one fired by a request (the warm-up runs the model before the worker serves)."""
    spawned = [r["pid"] for r in log_records(hostile.running) if r.get("msg") == "worker spawned" and r.get("model") == "warmbomb"]
    assert spawned, "no warmbomb worker was ever spawned"
    assert hostile.watch.samples > 0 and hostile.watch.error is None, hostile.watch.error
    peaks = {pid: hostile.watch.peak_of(pid) for pid in spawned}
    assert all(peak > 0 for peak in peaks.values()), f"the watch never saw a warmbomb worker: {peaks}"
    over = {pid: f"{peak / MiB:.0f} MiB" for pid, peak in peaks.items() if peak > LIMIT_MB * MiB}
    assert not over, f"warmbomb workers exceeded memory_limit_mb = {LIMIT_MB} while warming up: {over}"
    np.testing.assert_allclose(hostile.running.client().infer("good", {"x": X}).outputs["y"], expected_good(X), rtol=1e-4, atol=1e-4)


# -- (b) endless loop ---------------------------------------------------------------------------------
def test_endless_loop_on_the_direct_path_is_stopped_by_its_worker_which_serves_on(hostile: HostileDaemon) -> None:
    """A direct run past max_compute_ms is stopped inside the worker (run_watch.py: onnxruntime's
    terminate flag, which a Loop checks every iteration): DEADLINE_EXCEEDED, and the same worker lives on."""
    (pid,) = hostile.pids("spin")
    with GoodTraffic(hostile.running.address) as good, Client(hostile.running.address, timeout=60) as client:
        started = time.monotonic()
        with pytest.raises(OpenInferError) as info:
            client.infer("spin", {"x": np.zeros(1, np.float32)})
        ended = time.monotonic()
        assert info.value.code == "DEADLINE_EXCEEDED" and "max_compute_ms" in info.value.message, info.value
        assert SPIN_MAX_COMPUTE_MS / 1000 * 0.9 <= ended - started < 5, f"{ended - started:.2f} s"
        wait_for(lambda: good.successes_between(ended, float("inf")) >= 5, 10, "the good model after the stop")
    assert hostile.pids("spin") == [pid]  # the worker was not killed
    assert good.failures() == [], good.failures()[:5]


def test_endless_loop_hits_its_deadline_is_stopped_there_and_its_worker_serves_on(hostile: HostileDaemon) -> None:
    """Through the front door the worker stops a run that overstays its deadline (onnxruntime's stop flag,
    checked in every Loop iteration) and answers it; the worker is not killed (a run that cannot be
    stopped is: tests/test_faults.py), and the good model answers throughout."""
    (old,) = hostile.pids("spin")
    with GoodTraffic(hostile.running.address) as good, Client(hostile.running.address, timeout=60, direct=False) as client:
        started = time.monotonic()
        with pytest.raises(OpenInferError) as info:
            client.infer("spin", {"x": np.zeros(1, np.float32)})
        ended = time.monotonic()
        assert info.value.code == "DEADLINE_EXCEEDED" and "the worker was kept" in info.value.message, info.value
        assert SPIN_MAX_COMPUTE_MS / 1000 * 0.9 <= ended - started < 5, f"{ended - started:.2f} s"
        assert hostile.pids("spin") == [old]
        wait_for(lambda: good.successes_between(ended, float("inf")) >= 5, 10, "the good model after the stop")
    during = good.successes_between(started, ended)
    assert during >= 10, f"the good model answered only {during} times while the loop spun"
    assert good.failures() == [], good.failures()[:5]
    assert not [r for r in log_records(hostile.running) if r.get("msg") == "worker exited" and r.get("pid") == old]


# -- (c) death by SIGSYS ------------------------------------------------------------------------------
def test_a_sigsys_death_is_logged_with_the_policy_and_the_model_keeps_serving(hostile: HostileDaemon) -> None:
    """From outside, the kernel's seccomp kill looks exactly like this signal (status -31)."""
    (victim,) = hostile.workers("good")
    pid, worker_id = victim["pid"], victim["id"]
    os.kill(pid, signal.SIGSYS)
    wait_for(lambda: not psutil.pid_exists(pid), 5, f"worker {pid} to die of SIGSYS", daemon=hostile.running)
    replacement = wait_for(lambda: [p for p in hostile.pids("good") if p != pid], 20, "a ready replacement good worker", daemon=hostile.running)
    records = log_records(hostile.running)
    exits = [r for r in records if r.get("msg") == "worker exited" and r.get("pid") == pid]
    assert len(exits) == 1 and exits[0]["exit"] == "was killed by SIGSYS" and exits[0]["state"] == "ready", exits
    seccomp = [r for r in records if "killed by seccomp (SIGSYS)" in str(r.get("msg")) and r.get("worker") == worker_id]
    assert len(seccomp) == 1, seccomp
    assert seccomp[0]["level"] == "error" and seccomp[0]["policy"] == "worker", seccomp[0]  # a READY worker runs the serve policy
    with Client(hostile.running.address, timeout=30) as client:
        for _ in range(3):
            np.testing.assert_allclose(client.infer("good", {"x": X}).outputs["y"], expected_good(X), rtol=1e-4, atol=1e-4)
    assert hostile.pids("good") == replacement


# -- (d) no telemetry, no network -------------------------------------------------------------------
def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def unix_socket_inodes(pid: int) -> set[int]:
    """Every AF_UNIX socket of the process's network namespace and of ours (/proc/.../net/unix lists
    unbound ones too): a worker's channel (a socketpair) and its direct endpoint were made by the
    supervisor before the worker entered its own namespace, so they are listed in the host's."""
    lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:] + Path("/proc/self/net/unix").read_text().splitlines()[1:]
    return {int(line.split()[6]) for line in lines}


def non_unix_sockets(pid: int) -> set[int]:
    return socket_inodes(pid) - unix_socket_inodes(pid)


def test_the_socket_detector_sees_an_inet_socket() -> None:
    """The control for the next test: an AF_INET socket (even unbound) is not mistaken for a Unix one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        inode = os.fstat(inet.fileno()).st_ino
        assert inode in non_unix_sockets(os.getpid())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        inode = os.fstat(unix.fileno()).st_ino
        assert inode in socket_inodes(os.getpid()) and inode not in non_unix_sockets(os.getpid())


def test_the_socket_detector_sees_an_inet_socket_in_another_network_namespace() -> None:
    """Workers live in their own network namespace, where psutil is blind: it matches the process's socket
    inodes against the *caller's* /proc/net tables. /proc/PID/net/unix is the process's own namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to create a network namespace with")
    code = "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); print(s.fileno(), flush=True); sys.stdin.read()"
    holder = subprocess.Popen([unshare, "--net", sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        if not line:
            pytest.skip(f"this kernel/container refuses a new network namespace: {holder.communicate(timeout=10)[1].strip()}")
        inode = os.stat(f"/proc/{holder.pid}/fd/{int(line)}").st_ino
        assert os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert psutil.Process(holder.pid).net_connections(kind="inet") == []  # blind, as said
        assert inode in non_unix_sockets(holder.pid)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()


TELEMETRY_TRACES = ("Microsoft", "onnxruntime.db", "/.cache/")  # where onnxruntime's telemetry writes (DESIGN §4)


def open_paths(pid: int) -> list[str]:
    """What the process holds open right now (files, sockets, pipes), from /proc/PID/fd."""
    paths = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
    return paths


def tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (tests/run.sh installs it as root)")
def test_workers_hold_no_network_sockets_and_onnxruntime_telemetry_never_writes(hostile: HostileDaemon, tmp_path: Path) -> None:
    """Keep last: stops the daemon, because onnxruntime's telemetry also writes when a session ends.

    Only the daemon's own processes are looked at, never machine-wide state (another onnxruntime
    process on the machine may write its own telemetry): the workers' environment and open files, and
    strace of the supervisor and every worker, from a fresh worker's spawn (session creation, warm-up)
    through serving to the daemon's exit."""
    with Client(hostile.running.address, timeout=30) as client:  # every model has run at least once by now
        client.infer("good", {"x": X})
    # A respawned spin worker is ready only after its warm-up has spun for the warm-up timeout.
    def serving_workers() -> list[dict[str, Any]]:
        workers = [w for w in hostile.admin.status()["workers"] if w["state"] in ("ready", "busy")]
        return workers if {w["model"] for w in workers} >= {"good", "bomb", "spin"} else []

    workers = wait_for(serving_workers, 30, "ready good, bomb and spin workers", daemon=hostile.running)
    for worker in workers:
        pid = worker["pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"HOME=/nonexistent" in environ and b"ORT_DISABLE_TELEMETRY=1" in environ, (worker["model"], environ)
        assert psutil.Process(pid).net_connections(kind="inet") == []  # host namespace view only (see above)
        sockets = socket_inodes(pid)
        assert sockets, f"worker {pid} holds no socket at all: it cannot be serving"
        assert non_unix_sockets(pid) == set(), f"worker {pid} ({worker['model']}) holds non-Unix sockets"
        held = [path for path in open_paths(pid) if any(mark in path for mark in TELEMETRY_TRACES)]
        assert held == [], f"worker {pid} holds telemetry files open: {held}"

    supervisor = hostile.running.process.pid
    pids = [supervisor, *(w["pid"] for w in workers)]
    trace = tmp_path / "strace.log"
    strace = subprocess.Popen(["strace", "-f", "-q", "-s", "256", "-e", "trace=%file,%network", "-o", str(trace),
                               *(arg for pid in pids for arg in ("-p", str(pid)))], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: all(tracer_of(pid) == strace.pid for pid in pids) or strace.poll() is not None, 30, "strace to attach to the daemon")
        assert strace.poll() is None, strace.communicate()[1]
        # A new worker, traced from its spawn: onnxruntime's telemetry also writes at session creation.
        (old,) = [w["pid"] for w in workers if w["model"] == "good"]
        os.kill(old, signal.SIGKILL)
        fresh = wait_for(lambda: [p for p in hostile.pids("good") if p != old], 60, "a traced replacement good worker", daemon=hostile.running)
        with Client(hostile.running.address, timeout=30) as client:
            np.testing.assert_allclose(client.infer("good", {"x": X}).outputs["y"], expected_good(X), rtol=1e-4, atol=1e-4)
        graceful = hostile.running.stop()
        assert strace.wait(60) == 0, strace.communicate()[1]
    finally:
        if strace.poll() is None:
            strace.kill()
            strace.wait()
        if strace.stderr is not None:
            strace.stderr.close()
    assert graceful == 0, hostile.running.log_text()[-3000:]
    served = {w["pid"] for w in workers if w["pid"] != old} | set(fresh)
    exits = [r for r in log_records(hostile.running) if r.get("msg") == "worker exited" and r.get("pid") in served]
    assert len(exits) == len(served) and all(r["exit"] == "exited with code 0" for r in exits), exits

    lines = trace.read_text(errors="replace").splitlines()
    calls = [(int(pid), rest) for pid, rest in (line.split(None, 1) for line in lines if line.strip())]  # "PID  call(...)"
    # The control: the trace saw the new worker start (exec, its policy file) and every worker exit.
    assert any(pid == fresh[0] and rest.startswith("execve(") for pid, rest in calls), "strace did not follow the new worker from its spawn"
    assert any(pid == fresh[0] and "policies/boot.toml" in rest for pid, rest in calls)
    for worker_pid in served:
        assert (worker_pid, "+++ exited with 0 +++") in calls, f"strace did not see worker {worker_pid} exit"
    telemetry = [line for line in lines if any(mark in line for mark in TELEMETRY_TRACES)]
    assert telemetry == [], f"the daemon's processes touched telemetry paths: {telemetry[:5]}"
    network = [line for line in lines if "AF_INET" in line or "AF_NETLINK" in line]
    assert network == [], f"the daemon's processes used the network: {network[:5]}"
