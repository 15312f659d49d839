"""Attacks on the supervisor <-> worker boundary (issue #16, findings 4 and 6): an impostor process that
tries to join the worker channel, and a compromised worker that lies on it. The compromised worker is
tests/attack/hostile_worker.py, started by tests/attack/hostile_daemon.py in place of the real worker of
models named "hostile-<attack>"; the supervisor and everything else is the real daemon.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from other_uid import NOBODY, start_as
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack

HOSTILE_DAEMON = (str(Path(__file__).resolve().parent / "hostile_daemon.py"),)
X4 = np.arange(8, dtype=np.float32).reshape(2, 4)
# Requests through the front door reach the workers over their channels, the boundary attacked here (the
# direct path is off: with it on, clients would send infer to the workers' endpoints instead).
THROUGH_THE_CHANNEL = {"OPENINFER_POOL_DIRECT": "0"}


def daemon_sockets(daemon: RunningDaemon) -> set[str]:
    """Paths of the Unix sockets the supervisor and its workers hold (bound or connected by path)."""
    inodes: set[str] = set()
    root = psutil.Process(daemon.process.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            for fd in os.listdir(f"/proc/{process.pid}/fd"):
                target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    paths = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes:
                paths.add(fields[7])
    return paths


# -- finding 4: anything that reaches the worker channel can pose as a worker ---------------------------
IMPOSTOR = """
import stat
public, first_id, supervisor_pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# What an attacker knows from ps and the docs: where the old daemon put its worker channel.
guesses = [os.path.join(top, sub, f"instance-{supervisor_pid}", "workers.sock") for top in sys.argv[4:-1] for sub in ("", "run")]
found = [path for path in guesses if os.path.exists(path)]
for top in sys.argv[4:-1]:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode) and path != public and path not in found:
                    found.append(path)
            except OSError:
                pass
context = zmq.Context()
claims = []
for path in found:  # claim the ids the next workers will get, on every socket we can reach
    for worker_id in range(first_id, first_id + 6):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, str(worker_id).encode())
        try:
            sock.connect("ipc://" + path)
        except zmq.ZMQError:
            sock.close()
            continue
        claims.append(sock)
print(json.dumps({"sockets": found}), flush=True)
spec = {"name": "x", "datatype": "FP32", "shape": [-1, 64]}
hello = msgpack.packb({"pid": os.getpid(), "inputs": [spec], "outputs": [dict(spec, name="y")], "load_ms": 1.0, "warmup_ms": 1.0, "warmup_error": None})
tasks = 0
deadline = time.monotonic() + float(sys.argv[-1])
told_to_stop = zmq.Poller()  # the test closes our stdin when its requests are done (EOF: readable)
told_to_stop.register(sys.stdin.fileno(), zmq.POLLIN)
while time.monotonic() < deadline:
    for sock in claims:
        try:
            sock.send_multipart([b"H", hello], zmq.NOBLOCK)  # "I am worker N, model loaded"
        except zmq.ZMQError:
            pass
        while sock.poll(0):
            frames = sock.recv_multipart()
            if frames[0] == b"A":
                sock.send_multipart([b"Y", msgpack.packb({})])
            elif frames[0][:1] == b"T":  # a client's task: forge its result
                tasks += 1
                now = time.monotonic_ns()
                meta = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64]}], "recv_ns": now, "prep_us": 1.0, "compute_us": 1.0, "encode_us": 1.0, "cpu_us": 1.0, "send_ns": now}
                sock.send_multipart([b"R" + frames[0][1:], msgpack.packb(meta), np.full((1, 64), 1337, np.float32).tobytes()])
    if told_to_stop.poll(50):
        break
print(json.dumps({"tasks": tasks}), flush=True)
"""


def test_no_process_can_join_the_worker_channel(daemon_factory: Any, tiny_repo: Path) -> None:
    """The channel was an ipc:// file (root:nogroup 0660): a process of uid 65534 that claimed the ids
    of the next workers and said HELLO was taken for a respawned worker and got client tasks. Now each
    worker's channel is a socketpair made at spawn: the only socket path the daemon's processes hold is
    the public one, and the impostor finds nothing to join, whatever it claims."""
    daemon = daemon_factory(tiny_repo, env={**THROUGH_THE_CHANNEL, "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    public = daemon.address[len("ipc://") :]
    admin = daemon.client()
    workers = admin.status()["workers"]
    next_id = max(w["id"] for w in workers) + 1
    impostor = start_as(NOBODY, IMPOSTOR, public, str(next_id), str(daemon.process.pid), str(daemon.workdir), "15")
    try:
        assert impostor.stdout is not None
        json.loads(impostor.stdout.readline())  # it has claimed what it could find
        victim = next(w for w in workers if w["model"] == "tiny")
        os.kill(victim["pid"], 9)  # a worker is replaced: the impostor's chance, on the old channel
        deadline = time.monotonic() + 30
        while not any(w["model"] == "tiny" and w["id"] >= next_id and w["state"] in ("ready", "busy") for w in admin.status()["workers"]):
            assert time.monotonic() < deadline, "the replacement worker never became ready"
            time.sleep(0.05)
        with Client(daemon.address, timeout=30) as client:  # tasks now go to both tiny workers
            for _ in range(40):
                client.infer("tiny", {"x": np.ones((1, 64), np.float32)})
    finally:
        out, err = impostor.communicate(timeout=60)  # (which closes its stdin: it stops)
    assert json.loads(out.strip().splitlines()[-1])["tasks"] == 0, (out, err)
    assert daemon_sockets(daemon) == {public}


# -- finding 6: messages from workers are trusted --------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_repo() -> Iterator[Path]:
    root = world_readable_dir("oi-hostile-")
    for attack in ("garbage-meta", "missing-send-ns", "wrong-task", "short-output", "claimed-hit", "claimed-stages", "forged-error", "stderr-forgery", "oversized", "bad-hello", "twice-hello", "list-datatype", "list-datatype-hello", "cache-pong", "honest"):
        onnx_builders.matmul_model(root / f"hostile-{attack}" / "1" / "model.onnx", size=4)  # never loaded: the hostile worker answers
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile(hostile_repo: Path) -> Iterator[RunningDaemon]:
    from daemon_harness import cleanup_workdir, start_daemon

    policy = hostile_repo.parent / f"{hostile_repo.name}-clients.toml"
    policy.write_text("[default]\nmax_in_flight = 1\n")  # a leaked in-flight slot would refuse the next request
    running = start_daemon(hostile_repo, entry=HOSTILE_DAEMON, env={**THROUGH_THE_CHANNEL, "OPENINFER_SERVER_CLIENT_POLICY": str(policy), "OPENINFER_POOL_CRASH_LOOP_LIMIT": "1000"}, wait=False)
    wait_serving(running, ["hostile-honest", "tiny"])
    yield running
    running.stop()
    cleanup_workdir(running)
    policy.unlink()


def wait_serving(daemon: RunningDaemon, models: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with Client(daemon.address, timeout=2) as client:
        while time.monotonic() < deadline:
            assert daemon.process.poll() is None, daemon.log_text()[-2000:]
            try:
                ready = {row["name"] for row in client.models() if row["ready_workers"]}
                if set(models) <= ready:
                    return
            except OpenInferError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"{models} not serving:\n{daemon.log_text()[-2000:]}")


def answer_of(daemon: RunningDaemon, model: str, timeout: float = 10) -> tuple[str, str]:
    """(code or OK, message) of one request; the client's own deadline is never what answers it."""
    with Client(daemon.address, timeout=timeout, retries=3) as client:
        try:
            client.infer(model, {"x": X4})
            return "OK", ""
        except OpenInferError as exc:
            assert "no reply" not in exc.message, f"{model}: the request was never answered: {exc}"
            return exc.code, exc.message


def test_an_honest_worker_of_the_same_protocol_is_served(hostile: RunningDaemon) -> None:
    """The control: the stand-in worker itself works; what fails below fails because of each lie."""
    with Client(hostile.address) as client:
        np.testing.assert_array_equal(client.infer("hostile-honest", {"x": X4}).outputs["y"], 2 * X4)


@pytest.mark.parametrize("attack", ["garbage-meta", "missing-send-ns", "wrong-task", "short-output", "claimed-hit", "claimed-stages", "list-datatype"])
def test_a_malformed_result_fails_exactly_its_task_and_retires_the_worker(hostile: RunningDaemon, attack: str) -> None:
    """A RESULT that does not fit what the worker was given: the task is answered WORKER_CRASHED at
    once (it was never answered, its client slot leaked and the worker stayed BUSY), the worker is
    replaced, and the client's next request is admitted (max_in_flight = 1: a leaked slot would refuse it)."""
    wait_serving(hostile, [f"hostile-{attack}"])
    code, message = answer_of(hostile, f"hostile-{attack}")
    assert code == "WORKER_CRASHED" and "invalid message" in message, (code, message)
    wait_serving(hostile, [f"hostile-{attack}"])  # a fresh (equally hostile) worker took its place
    code, _ = answer_of(hostile, f"hostile-{attack}")
    assert code == "WORKER_CRASHED"  # not RESOURCE_EXHAUSTED: the first request's slot was released
    assert '"reason":' in hostile.log_text() and "worker sent an invalid message; retiring it" in hostile.log_text()
    with Client(hostile.address) as client:  # everyone else is served throughout
        assert client.infer("tiny", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape == (1, 64)


def test_a_forged_error_is_mapped_to_a_protocol_code_and_bounded(hostile: RunningDaemon) -> None:
    code, message = answer_of(hostile, "hostile-forged-error")
    assert code == "INTERNAL" and len(message) <= 2000, (code, len(message))


def test_worker_stderr_cannot_forge_supervisor_log_lines(hostile: RunningDaemon) -> None:
    assert answer_of(hostile, "hostile-stderr-forgery")[0] == "OK"
    deadline = time.monotonic() + 10
    while "FORGED supervisor line" not in hostile.log_text():
        assert time.monotonic() < deadline, "the worker's stderr line never reached the log"
        time.sleep(0.05)
    for line in hostile.log_text().splitlines():
        if "FORGED supervisor line" not in line:
            continue
        record = json.loads(line)
        assert record["logger"] == "openinfer.worker.output" and record["msg"] == "worker output", record
        assert record["record"]["logger"] == "openinfer.supervisor" and isinstance(record["worker"], int)


def test_a_worker_that_announces_a_huge_message_is_retired_without_the_supervisor_holding_it(hostile: RunningDaemon) -> None:
    supervisor = psutil.Process(hostile.process.pid)
    before = supervisor.memory_info().rss
    code, message = answer_of(hostile, "hostile-oversized")
    assert code == "WORKER_CRASHED", (code, message)
    assert supervisor.memory_info().rss - before < 64 << 20


def test_a_hello_with_malformed_metadata_never_serves(hostile: RunningDaemon) -> None:
    with Client(hostile.address) as client:
        rows = {row["name"]: row for row in client.models()}
    assert rows["hostile-bad-hello"]["ready_workers"] == 0
    assert rows["hostile-twice-hello"]["ready_workers"] == 0
    assert rows["hostile-list-datatype-hello"]["ready_workers"] == 0
    assert "HELLO" in hostile.log_text() and "HELLO names a tensor twice" in hostile.log_text()
    assert "HELLO: unknown datatype []" in hostile.log_text()  # retired as it arrived (round 64: a TypeError, the worker left waiting for its ACK)


def test_a_cache_report_from_a_worker_without_a_cache_retires_it(hostile: RunningDaemon) -> None:
    """Its PONG claims 7 entries and 1 TiB held for a model without [cache]: nothing of it reaches
    status or stats, and the worker is replaced."""
    wait_for(lambda: "PONG reports a cache its model does not have" in hostile.log_text(), 30, "the lying PONG refused", daemon=hostile)
    with Client(hostile.address) as client:
        assert all("cache" not in w for w in client.status()["workers"])
        assert "cache" not in client.stats()["models"].get("hostile-cache-pong", {})


def test_pongs_no_ping_asked_for_retire_the_worker() -> None:
    """Round 14's attacker: a worker sending PONG after PONG, unasked, each parsed and followed by a read
    of its /proc statm, held the supervisor's loop at 100 % CPU (an honest client of another model: 21
    answers in 5 s instead of 8,354) and was never retired. A PONG beyond the PINGs sent is now
    something the worker was not asked for: it is retired at the first."""
    from daemon_harness import cleanup_workdir, start_daemon

    root = world_readable_dir("oi-hostile-pong-")
    for name in ("hostile-pong-flood", "tiny"):
        onnx_builders.matmul_model(root / name / "1" / "model.onnx")
    running = start_daemon(make_world_readable(root), entry=HOSTILE_DAEMON, env=THROUGH_THE_CHANNEL, wait=False)
    try:
        wait_serving(running, ["tiny"])
        wait_for(lambda: "PONG without a PING" in running.log_text(), 30, "the unasked PONG refused", daemon=running)
        with Client(running.address, timeout=10) as client:
            assert client.infer("tiny", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape == (1, 64)
    finally:
        running.stop()
        cleanup_workdir(running)
        shutil.rmtree(root, ignore_errors=True)
