"""A hostile steps module (issue #19): the code a model's repository ships beside its config.toml runs in
the model's worker, so it is contained exactly like a hostile model - same seccomp policy, uid, Landlock,
rlimits and deadline - and never in the supervisor.

One sandboxed daemon serves `hostile` (its steps.py does, on request, what an attacker's step would: open
sockets, write or read files, fork, exec, spin, allocate 10 GB) and `canary` (a plain model). Each attack
is performed from inside the step; the test asserts what it was after did not happen (no file written, no
connection made, no secret returned), that its request got a typed error rather than a result, and that
the daemon goes on serving: the canary answers correctly throughout, and so does `hostile` itself once its
worker has been replaced. The module's own code first runs when the worker loads it: a `loader` whose
setup() reaches for a file and a socket is stopped there, and reported."""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
import select
import socket
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, log_records, start_daemon, wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from reference import run_reference
from repo_builder import ModelRepo
from steps_daemon import hostile_steps_daemon

pytestmark = pytest.mark.attack

HOSTILE_STEPS = '''
import os, socket
import numpy as np
from openinfer.daemon.steps.contract import Answer

INPUTS = [{{"name": "what", "datatype": "BYTES", "shape": []}}]
OUTPUTS = [{{"name": "got", "datatype": "BYTES", "shape": []}}]
WRITE_TARGET = {write_target!r}
UNIX_TARGET = {unix_target!r}
TCP_PORT = {tcp_port!r}
SECRET = {secret!r}
OTHER_MODEL = {other_model!r}

def pre(inputs):
    what = inputs["what"].item().decode()
    if what == "fine":
        return {{"x": np.ones((1, 64), np.float32)}}
    if what == "write":
        with open(WRITE_TARGET, "w") as f:
            f.write("owned")
    elif what == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(UNIX_TARGET)
    elif what == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", TCP_PORT))
    elif what == "read-secret":
        return Answer(got=open(SECRET, "rb").read())
    elif what == "read-other-model":
        return Answer(got=open(OTHER_MODEL, "rb").read()[:64])
    elif what == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
    elif what == "exec":
        os.execv("/bin/sh", ["/bin/sh", "-c", "touch " + WRITE_TARGET])
    elif what == "spin":
        while True:
            pass
    elif what == "allocate":
        block = bytearray(10 * 1024 ** 3)
        return Answer(got=bytes(block[:1]))
    elif what == "stderr-flood":  # 2,000,000 lines on stderr, which the supervisor relays to its log
        for _ in range(64):
            os.write(2, b"a\\n" * 32768)
    elif what == "burst-and-exit":  # 40 lines of 8 KiB of invalid UTF-8 on stderr, then the worker dies
        os.write(2, (b"\\xff" * 8191 + b"\\n") * 40)
        os._exit(1)
    elif what == "nested-status":  # the boot status pipe (fd 3) is still open: a line nested 5,000 deep, then die
        os.write(3, b"[" * 5000 + b"\\n")
        os._exit(1)
    elif what == "claim-mismatch":  # say the shared weights gave wrong numbers, then die
        os.write(3, b'{{"error": "prepared artefact mismatch: claimed by a serving worker"}}\\n')
        os._exit(1)
    elif what == "fake-page":  # the worker's deadline page says a direct run is long overdue
        import gc, threading
        # A step is Python in the worker's own interpreter: it reaches the page through the worker's
        # objects (writing its memfd is stopped by RLIMIT_FSIZE, a new writable mapping by seccomp).
        next(o for o in gc.get_objects() if type(o).__name__ == "DeadlinePage").running(1, 1)
        threading.Event().wait()  # still running when the supervisor kills the worker for it
    return Answer(got=b"done")

def post(outputs):
    return {{"got": b"ran"}}
'''

LOADER_STEPS = '''
import socket
INPUTS = [{{"name": "x", "datatype": "FP32", "shape": [-1, 64]}}]
tried = []

def setup(files):
    for attempt in (lambda: open({secret!r}, "rb").read(), lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect({unix_target!r})):
        try:
            attempt()
            tried.append("worked")
        except OSError as exc:
            tried.append(type(exc).__name__)

def pre(inputs):
    if "worked" in tried:
        raise RuntimeError("an attempt at load time worked")
    return {{"x": inputs["x"]}}
'''


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Path]]:
    """Targets an attacker would go for, each within the worker user's reach if nothing else stopped it:
    a world-writable directory, a world-connectable Unix socket, a TCP listener, a root-only secret."""
    base = world_readable_dir("oi-hostile-steps-")
    drop = base / "drop"
    drop.mkdir()
    os.chmod(drop, 0o777)
    secret = base / "secret.txt"
    secret.write_text("root's secret\n")
    os.chmod(secret, 0o644)  # readable by anyone: only the sandbox can keep a step from it
    yield {"base": base, "drop": drop, "secret": secret}
    import shutil

    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def listeners(world: dict[Path, Path]) -> Iterator[tuple[socket.socket, socket.socket]]:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(world["drop"] / "listener.sock")
    unix.bind(path)
    os.chmod(path, 0o777)
    unix.listen(8)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    yield unix, tcp
    unix.close()
    tcp.close()


@pytest.fixture(scope="module")
def daemon(world: dict[str, Path], listeners: tuple[socket.socket, socket.socket]) -> Iterator[RunningDaemon]:
    unix, tcp = listeners
    config = 'workers = 1\nmax_compute_ms = 1500\nmemory_limit_mb = 1024\n\n[steps]\nmodule = "steps.py"\n'

    def steps(root: Path) -> str:
        return HOSTILE_STEPS.format(
            write_target=str(world["drop"] / "written.txt"), unix_target=unix.getsockname(), tcp_port=tcp.getsockname()[1],
            secret=str(world["secret"]), other_model=str(root / "canary" / "1" / "model.onnx"),
        )

    with hostile_steps_daemon("oi-hostile-steps-repo-", config, steps) as running:
        yield running


def nothing_connected(listener: socket.socket) -> bool:
    return not select.select([listener], [], [], 0)[0]


def canary_answers(client: Client, repo: Path) -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    want = run_reference(repo / "canary" / "1" / "model.onnx", {"x": x})["y"]
    np.testing.assert_allclose(client.infer("canary", {"x": x}).outputs["y"], want, rtol=1e-5)


def hostile_serves_again(client: Client) -> None:
    """The step's worker is replaced when the attack killed it: the model answers again."""
    wait_for(lambda: _fine(client), 60, "the hostile model's replacement worker answering")


def _fine(client: Client) -> bool:
    try:
        return client.infer("hostile", {"what": "fine"}, timeout=10).outputs["got"].item() == b"ran"
    except OpenInferError:
        return False


CONTAINED = {"WORKER_CRASHED", "INTERNAL", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
@pytest.mark.parametrize("what", ["write", "exec", "unix", "tcp", "fork", "read-secret", "read-other-model", "allocate", "spin"])
def test_a_hostile_step_is_contained_like_a_hostile_model(daemon: RunningDaemon, world: dict[str, Path], listeners: tuple[socket.socket, socket.socket], what: str, direct: bool) -> None:
    unix, tcp = listeners
    repo: Path = daemon.repo  # type: ignore[attr-defined]
    with Client(daemon.address, timeout=30, direct=direct) as client:
        hostile_serves_again(client)
        with pytest.raises(OpenInferError) as caught:
            client.infer("hostile", {"what": what}, timeout=10)
        assert caught.value.code in CONTAINED, (what, caught.value.code, str(caught.value))
        if what == "allocate":  # the memory limit, as for a model: the request fails alone, typed
            assert caught.value.code in ("RESOURCE_EXHAUSTED", "WORKER_CRASHED"), str(caught.value)
        if what == "spin":  # stopped at max_compute_ms (1.5 s) by the worker's replacement, not left running
            assert caught.value.code in ("DEADLINE_EXCEEDED", "WORKER_CRASHED"), str(caught.value)
        assert not (world["drop"] / "written.txt").exists()
        assert nothing_connected(unix) and nothing_connected(tcp)
        assert "root's secret" not in str(caught.value)
        canary_answers(client, repo)
        hostile_serves_again(client)


def test_a_step_that_fakes_a_direct_overstay_cannot_bounce_its_request_between_workers(daemon: RunningDaemon) -> None:
    """The supervisor kills a worker whose deadline page shows a direct run past its deadline and moves the
    front door's requests it held to another worker: they waited behind that run. The page is the worker's
    own word, so a step that fakes it while running a front-door request has its worker killed, and its
    request moved - once. On the next worker it does the same and the request fails (WORKER_CRASHED)
    instead of bouncing from worker to worker, each one killed, until its deadline.
    And no worker is killed for it sooner than max_compute_ms (1.5 s here) after it became ready: no run
    of it started earlier, whatever it claims (round 64's suspicion, reproduced: the replacement was killed
    8-40 ms after its READY, for a start the step dated to the machine's boot - a model could have its
    workers booted twice a second, ~0.25 s of the host's CPU each)."""
    kills = '"a direct request ran past max_compute_ms; killing the worker"'
    with Client(daemon.address, timeout=30, direct=False) as client:
        hostile_serves_again(client)
        before = daemon.log_text().count(kills)
        with pytest.raises(OpenInferError) as caught:
            client.infer("hostile", {"what": "fake-page"}, timeout=25)
        assert caught.value.code == "WORKER_CRASHED" and "the second worker" in caught.value.message, str(caught.value)
        assert daemon.log_text().count(kills) - before == 2
        records = log_records(daemon)
        ready = {r["worker"]: _seconds(r["ts"]) for r in records if r.get("msg") == "worker ready"}
        killed = [(r["worker"], _seconds(r["ts"])) for r in records if r.get("msg") == kills.strip('"')][-2:]
        assert all(at - ready[worker] >= 1.5 for worker, at in killed), [(worker, at - ready[worker]) for worker, at in killed]
        canary_answers(client, daemon.repo)  # type: ignore[attr-defined]
        hostile_serves_again(client)


def test_a_steps_module_runs_its_load_time_code_inside_the_sandbox(world: dict[str, Path], listeners: tuple[socket.socket, socket.socket]) -> None:
    """setup() tries to read a file outside its model, then to connect a socket, while the worker loads:
    the worker is stopped there by the boot policy (the same one onnxruntime parses a model under), the
    model is reported failed with that reason, nothing connected, and the other model serves."""
    unix, _ = listeners
    repo = ModelRepo("oi-hostile-steps-loader-")
    repo.model("canary", onnx_builders.matmul_model, config="workers = 1\n")
    repo.model("loader", onnx_builders.matmul_model, config='workers = 1\n\n[steps]\nmodule = "steps.py"\n')
    (repo.root / "loader" / "steps.py").write_text(LOADER_STEPS.format(secret=str(world["secret"]), unix_target=unix.getsockname()))
    root = repo.ready()
    running = start_daemon(root, wait=False)
    try:
        client = running.client()
        rows = wait_for(lambda: _settled(client), 90, "canary ready and loader failed", daemon=running)
        assert "SIGSYS" in rows["loader"]["reason"], rows["loader"]
        assert nothing_connected(unix)
        canary_answers(client, root)
    finally:
        running.stop()
        cleanup_workdir(running)
        repo.remove()


def _settled(client: Client) -> dict[str, dict[str, object]] | None:
    try:
        rows = {row["name"]: row for row in client.models()}
    except OpenInferError:
        return None
    if rows.get("canary", {}).get("state") == "ready" and rows.get("loader", {}).get("state") in ("failed", "unavailable"):
        return rows
    return None


def test_a_step_flooding_stderr_costs_the_log_and_the_loop_a_bounded_share(daemon: RunningDaemon) -> None:
    """Round 63: a step writing "a\\n" without pause became one log record per line (82,000 a second, 13 MB of
    log in 10 s), and the supervisor's loop, logging them, kept other clients' requests waiting up to 11.8 s.
    Past a budget its lines are counted, and the count logged."""
    repo: Path = daemon.repo  # type: ignore[attr-defined]
    with Client(daemon.address, timeout=30) as client:
        hostile_serves_again(client)
        assert client.infer("hostile", {"what": "stderr-flood"}, timeout=30).outputs["got"].item() == b"done"
        dropped = lambda: sum(r.get("lines", 0) for r in log_records(daemon) if r.get("msg") == "worker output dropped: over its budget")  # noqa: E731
        wait_for(lambda: dropped() > 1_000_000, 60, "the flood counted, not logged", daemon=daemon)
        canary_answers(client, repo)
    logged = sum(1 for r in log_records(daemon) if r.get("msg") == "worker output" and r.get("line") == "a")
    assert logged <= 10_000, logged  # the burst (2,048 lines) and 128 lines a second after it


DEEP_READY_STEPS = '''
import openinfer.sandbox.hardening as hardening

INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
described = hardening.describe_sandbox


def deeply(*args, **kwargs):
    """What READY carries: the sandbox's description, and a list nested 1,021 deep (msgpack reads 1,024)."""
    nested = None
    for _ in range(1021):
        nested = [nested]
    return {**described(*args, **kwargs), "deep": nested}


hardening.describe_sandbox = deeply  # the module's own code runs in the worker before it sends READY


def pre(inputs):
    return {"x": inputs["x"]}
'''


def test_a_deeply_nested_ready_retires_its_worker_and_harms_nothing_else(tmp_path: Path) -> None:
    """Round 63: a steps module's import-time code made its worker's READY carry a list nested 1,021 deep.
    Logging it raised RecursionError out of the supervisor's handling of READY - systemd never got READY=1
    - and every later `status` failed INTERNAL (msgpack writes fewer levels than it reads). READY is now
    checked where it arrives: plain data nested at most 4 deep, or the worker is retired."""
    repo = ModelRepo("oi-deep-ready-")
    repo.model("canary", onnx_builders.matmul_model, config="workers = 1\n")
    repo.model("hostile", onnx_builders.matmul_model, config='workers = 1\n\n[steps]\nmodule = "steps.py"\n')
    (repo.root / "hostile" / "steps.py").write_text(DEEP_READY_STEPS)
    root = repo.ready()
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    systemd.settimeout(0.5)
    running = start_daemon(root, env={"NOTIFY_SOCKET": str(notify_path), "OPENINFER_POOL_CRASH_LOOP_LIMIT": "1"}, wait=False)
    try:
        said: list[str] = []
        deadline = time.monotonic() + 90
        while not any("READY=1" in m for m in said):
            assert time.monotonic() < deadline and running.process.poll() is None, said
            try:
                said.append(systemd.recv(4096).decode())
            except socket.timeout:
                pass
        with Client(running.address, timeout=30) as client:
            assert "hostile:1" in next(m for m in said if "READY=1" in m)  # "not serving: hostile:1"
            canary_answers(client, root)
            status = client.status()  # INTERNAL before
            assert all("deep" not in (w.get("sandbox") or {}) for w in status["workers"])
        assert "READY description nested deeper than 4" in running.log_text()
        assert "internal error" not in running.log_text()
    finally:
        running.stop()
        cleanup_workdir(running)
        systemd.close()
        repo.remove()


def test_a_step_that_writes_a_burst_and_dies_gets_one_budget_for_all_its_replacements(daemon: RunningDaemon) -> None:
    """Round 64: the log budget was per process and charged a line's raw bytes: a step writing 40 lines of
    8 KiB of invalid UTF-8 (each written six times as long, as \\u escapes) and exiting, a good request
    between to keep the crash count at zero, put 2-3 MB/s into the log. The budget is the model's now, and
    charged what the log writes."""
    with Client(daemon.address, timeout=30) as client:
        hostile_serves_again(client)
        before = len(daemon.log_text().splitlines())
        for _ in range(5):
            with pytest.raises(OpenInferError):
                client.infer("hostile", {"what": "burst-and-exit"}, timeout=10)
            hostile_serves_again(client)
    written = sum(len(line) for line in daemon.log_text().splitlines()[before:] if '"msg":"worker output"' in line and '"model":"hostile:1"' in line)
    assert written <= 1 << 20, written  # one burst (256 KiB) and 16 KiB a second; before: ~1.9 MB a cycle


@pytest.mark.parametrize("what", ["nested-status", "claim-mismatch"])
def test_what_a_serving_worker_writes_to_its_status_pipe_is_not_believed(daemon: RunningDaemon, what: str) -> None:
    """Round 66: the boot status pipe stays open while a worker serves. A line nested 5,000 deep raised
    RecursionError out of the reaping of its exit: the dead worker stayed `busy` for good, its model got no
    replacement (every request DEADLINE_EXCEEDED) and SIGTERM no longer stopped the daemon. The line is
    read as text now, and only a worker that never became ready is believed at all (one that was serving
    could claim a prepared-weights mismatch and have its model's shared weights thrown away)."""
    with Client(daemon.address, timeout=30) as client:
        hostile_serves_again(client)
        with pytest.raises(OpenInferError) as caught:
            client.infer("hostile", {"what": what}, timeout=10)
        assert caught.value.code == "WORKER_CRASHED", str(caught.value)  # before: DEADLINE_EXCEEDED, the worker never reaped
        hostile_serves_again(client)
    assert "internal error" not in daemon.log_text()
    assert "prepared weights failed verification" not in daemon.log_text()


def _seconds(ts: str) -> float:
    """A log record's time ("2026-12-07T13:59:01.123Z"), in seconds."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


FORGING_STEPS = '''
import gc, os, threading, time
import numpy as np
from openinfer.daemon.steps.contract import Answer
INPUTS = [{"name": "what", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "got", "datatype": "BYTES", "shape": []}]

def _forge_and_exit():
    # Once its worker is serving: a successful direct answer booked in its own ledger, then a crash.
    while True:
        writer = next((o for o in gc.get_objects() if type(o).__name__ == "LedgerWriter"), None)
        if writer is not None:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.1)
    writer._slots["x"] = 1024  # the shared "other" row
    writer.answered(0, 1, "x", None, {}, 0, 0)
    os._exit(1)

def setup(files):
    threading.Thread(target=_forge_and_exit, daemon=True).start()

def pre(inputs):
    return {"x": np.ones((1, 64), np.float32)}

def post(outputs):
    return {"got": b"ran"}
'''


def test_a_step_that_books_a_success_before_each_crash_still_has_its_replacements_slowed(tmp_path: Path) -> None:
    """Round 74: a step, with no client at all, booked a successful direct answer in its worker's own
    ledger and exited, in every worker: each "success" reset the model's crash count, so the respawn delay
    stayed at 100 ms and the model never went UNAVAILABLE - a worker booted every 0.6-0.75 s for good (~0.45
    of a core), another model's p99 2.5x. A worker's ledger is its word: the delay now doubles until the
    supervisor itself sees a request answered (or a minute passes without a crash or an overrun)."""
    config = 'workers = 1\nmax_compute_ms = 1500\n\n[steps]\nmodule = "steps.py"\n'
    with hostile_steps_daemon("oi-hostile-forge-", config, lambda root: FORGING_STEPS) as running:
        def scheduled() -> list[int]:
            return [r["delay_ms"] for r in log_records(running) if r.get("msg") == "worker replacement scheduled" and r.get("model") == "hostile:1"]

        wait_for(lambda: len(scheduled()) >= 4, 60, "four replacements of the forging worker", daemon=running)
        assert scheduled()[:4] == [100, 200, 400, 800], scheduled()  # before: [100, 100, 100, 100]
        with Client(running.address, timeout=30) as client:
            canary_answers(client, running.repo)  # type: ignore[attr-defined]


PAGE_FAKING_STEPS = FORGING_STEPS.replace('''    threading.Event().wait(0.1)
    writer._slots["x"] = 1024  # the shared "other" row
    writer.answered(0, 1, "x", None, {}, 0, 0)
    os._exit(1)''', '''    page = next(o for o in gc.get_objects() if type(o).__name__ == "DeadlinePage")
    page.running(1, 1)  # "a direct run, since the machine booted": killed for it at READY + max_compute_ms
    threading.Event().wait()''')


def test_a_step_that_fakes_an_overrun_in_every_worker_has_their_replacements_slowed(tmp_path: Path) -> None:
    """Round 74: a worker killed for a run past max_compute_ms was replaced at once (an expected exit, not
    a crash); with max_compute_ms = 1 in its own config.toml and a deadline page claiming a run since
    boot, a step had each worker killed half a second after its READY, for good. Such replacements now
    wait as a crash's do, the delay doubling until the supervisor sees a request answered."""
    config = 'workers = 1\nmax_compute_ms = 1\n\n[steps]\nmodule = "steps.py"\n'
    assert PAGE_FAKING_STEPS != FORGING_STEPS
    with hostile_steps_daemon("oi-hostile-overrun-", config, lambda root: PAGE_FAKING_STEPS) as running:
        def scheduled() -> list[int]:
            return [r["delay_ms"] for r in log_records(running) if r.get("msg") == "worker replacement scheduled" and r.get("model") == "hostile:1"]

        wait_for(lambda: len(scheduled()) >= 4, 60, "four replacements of the overrunning worker", daemon=running)
        assert scheduled()[:4] == [100, 200, 400, 800], scheduled()  # before: replaced at once, no delay
        assert "ran past max_compute_ms; killing the worker" in running.log_text()
        with Client(running.address, timeout=30) as client:
            canary_answers(client, running.repo)  # type: ignore[attr-defined]
