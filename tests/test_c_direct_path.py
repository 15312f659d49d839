"""The C client (client/c) on the direct path (docs/PROTOCOL.md section 17), against real daemons started
with OPENINFER_POOL_DIRECT=1, and against a scripted daemon and workers for the rules a real daemon only
shows by chance (an expired lease answered by a worker, GOAWAY with a request outstanding, a connection
that closes under a request, a front door connection that drops).

How a test knows the C client went straight to a worker, from the daemon's side: the front door counts
each `lease` it grants (`stats` operations), and a request that came through the front door has a
`dispatch` stage in the model's cumulative stages (the supervisor handed it to a worker) while one sent to
a worker directly has none; its reply's `timing` has no `dispatch_us` / `return_us` either.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import psutil
import pytest
import zmq

import onnx_builders
from daemon_harness import EXAMPLE_MODELS, RunningDaemon, cleanup_workdir, start_daemon, wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from openinfer.wire.tensors import DATATYPE_TO_NUMPY
from repo_builder import make_world_readable
from test_c_client import EXAMPLE, VECTORS, X, c_example, example_daemon, parse_infer_output, run_example  # noqa: F401  (fixtures)

pytestmark = pytest.mark.live

DIRECT: dict[str, str | None] = {"OPENINFER_POOL_DIRECT": "1"}
DIRECT_TIMING = {"decode_us", "queue_us", "prep_us", "compute_us", "encode_us", "cpu_us", "total_us"}
REQUEST_KEYS = {"v", "id", "op", "model", "version", "inputs"}  # what oi_infer can say


# -- daemons ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def direct_daemon() -> Iterator[RunningDaemon]:
    """The example models (what the conformance vectors assume) plus `small_limit` (max_request_bytes =
    1024), sandboxed, with the direct path on."""
    repo = world_readable_dir("oi-c-direct-")
    for model_dir in EXAMPLE_MODELS.iterdir():
        shutil.copytree(model_dir, repo / model_dir.name)
    onnx_builders.matmul_model(repo / "small_limit" / "1" / "model.onnx")
    (repo / "small_limit" / "config.toml").write_text("max_request_bytes = 1024\n")
    make_world_readable(repo)
    try:
        running = start_daemon(repo, env=DIRECT)
    except BaseException:
        shutil.rmtree(repo, ignore_errors=True)
        raise
    yield running
    running.stop()
    cleanup_workdir(running)
    shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture
def busy_repo() -> Iterator[Path]:
    """tiny (2 workers) and `busy` (y = x + n by a Loop of n iterations: n sets how long it runs; 2 workers)."""
    root = world_readable_dir("oi-c-busy-")
    shutil.copytree(EXAMPLE_MODELS / "tiny", root / "tiny")
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 2\nmax_compute_ms = 600000\n")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


# -- what the daemon saw ------------------------------------------------------------------------------
def leases_granted(daemon: RunningDaemon) -> int:
    with Client(daemon.address, direct=False) as client:
        return int(client.stats()["operations"].get("lease", {}).get("OK", 0))


def counts(daemon: RunningDaemon, model: str) -> tuple[int, int]:
    """(requests answered, requests that went through the front door's dispatch) for `model` version 1."""
    with Client(daemon.address, direct=False) as client:
        version = client.stats()["models"].get(model, {}).get("versions", {}).get("1", {})
    return int(version.get("requests", 0)), int(version.get("stages", {}).get("dispatch", {}).get("count", 0))


# -- the example's requests mode ----------------------------------------------------------------------
def request_spec(model: str, inputs: list[tuple[str, str, list[int], bytes]], version: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": model, "inputs": [{"name": n, "datatype": d, "shape": s, "hex": b.hex()} for n, d, s, b in inputs]}
    if version is not None:
        spec["version"] = version
    return spec


def reloads_done(daemon: RunningDaemon) -> int:
    """How many times the daemon logged that it synced the repository (at start, then once per reload)."""
    count = 0
    for line in daemon.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        count += isinstance(record, dict) and record.get("msg") == "repository synced"
    return count


def parse_request_lines(stdout: str) -> list[dict[str, Any]]:
    rows = []
    for line in stdout.splitlines():
        if not line.startswith("request\t"):
            continue
        _, index, status, rc, local, path, timing, outputs, details, message = line.split("\t", 9)
        parsed_outputs = []
        for item in filter(None, outputs.removeprefix("outputs=").split(";")):
            name, datatype, shape, data = item.split(":")
            parsed_outputs.append((name, datatype, [int(d) for d in shape.split(",") if d], bytes.fromhex(data)))
        rows.append({
            "index": int(index), "status": status, "rc": rc.removeprefix("rc="), "local": int(local.removeprefix("local=")),
            "path": path.removeprefix("path="), "timing": set(filter(None, timing.removeprefix("timing=").split(","))),
            "outputs": parsed_outputs, "details": details.removeprefix("details="), "message": message,
        })
    return rows


def run_requests(address: str, specs: list[dict[str, Any]], tmp_path: Path, *options: str, timeout: float = 300) -> list[dict[str, Any]]:
    path = tmp_path / f"requests-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(specs))
    done = run_example(*options, "requests", address, str(path), timeout=timeout)
    rows = parse_request_lines(done.stdout)
    assert [r["index"] for r in rows] == list(range(len(specs))), done.stdout[-3000:] + done.stderr
    return rows


def quiet_summary(stdout: str) -> dict[str, Any]:
    """`rounds N ok N direct N errors CODE=COUNT,...` of the example's --quiet mode."""
    line = next(line for line in stdout.splitlines() if line.startswith("rounds "))
    words = line.split()
    errors = {} if words[7] == "-" else {k: int(v) for k, v in (item.split("=") for item in words[7].split(","))}
    return {"rounds": int(words[1]), "ok": int(words[3]), "direct": int(words[5]), "errors": errors}


# -- tests against a real daemon ------------------------------------------------------------------------
def test_infer_goes_straight_to_a_worker(c_example: Path, direct_daemon: RunningDaemon) -> None:
    leases, (requests, dispatched) = leases_granted(direct_daemon), counts(direct_daemon, "tiny")
    done = run_example("--all", "--repeat", "20", direct_daemon.address, "tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    rounds = parse_infer_output(done.stdout)
    assert len(rounds) == 20 and done.stdout.count("\npath direct\n") == 20, done.stdout[-2000:]
    # the daemon's side: a lease was granted, 20 more requests answered, none of them dispatched by the supervisor
    assert leases_granted(direct_daemon) > leases
    after_requests, after_dispatched = counts(direct_daemon, "tiny")
    assert after_requests - requests == 20 and after_dispatched == dispatched, (requests, after_requests, dispatched, after_dispatched)
    with Client(direct_daemon.address, timeout=20) as client:
        want = client.infer("tiny", {"x": X})
    for got in rounds:
        assert np.array_equal(got["outputs"]["y"], want.outputs["y"]), got["outputs"]["y"][0, :4]
        assert set(got["timing"]) == DIRECT_TIMING, got["timing"]  # the worker's stages: no supervisor hop


def test_off_switch_sends_everything_to_the_front_door(c_example: Path, direct_daemon: RunningDaemon) -> None:
    leases, (requests, dispatched) = leases_granted(direct_daemon), counts(direct_daemon, "tiny")
    for option, env in ((["--front-door"], None), ([], {"OPENINFER_DIRECT": "0"})):
        done = run_example(*option, "--repeat", "3", direct_daemon.address, "tiny", env=env)
        assert done.returncode == 0 and done.stdout.count("\npath front-door\n") == 3, done.stdout
    assert leases_granted(direct_daemon) == leases
    after_requests, after_dispatched = counts(direct_daemon, "tiny")
    assert after_requests - requests == 6 and after_dispatched - dispatched == 6


def _python_inputs(spec: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The same request for the Python client, when its API can say it (numpy datatypes, unique names,
    data that fits the shape)."""
    arrays: dict[str, np.ndarray] = {}
    for item in spec["inputs"]:
        dtype = DATATYPE_TO_NUMPY.get(item["datatype"])
        data = bytes.fromhex(item["hex"])
        if dtype is None or dtype.kind == "O" or item["name"] in arrays or len(data) != dtype.itemsize * int(np.prod(item["shape"], dtype=np.int64)):
            return None
        arrays[item["name"]] = np.frombuffer(data, dtype).reshape(item["shape"])
    return arrays


def _c_expressible(vector: dict[str, Any]) -> dict[str, Any] | None:
    """A conformance vector as an oi_infer call (model, version, one tensor per input), or None when the
    C API cannot say it (malformed headers, `outputs`, `timeout_ms`, `priority`, `client`, frame counts
    that differ from the inputs...)."""
    frames = [bytes.fromhex(h) for h in vector["request"]["frames_hex"]]
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:
        return None
    if not isinstance(header, dict) or header.get("op") != "infer" or set(header) - REQUEST_KEYS or not isinstance(header.get("model"), str):
        return None
    version, inputs = header.get("version"), header.get("inputs")
    if (version is not None and (type(version) is not int or version < 0)) or not isinstance(inputs, list) or len(inputs) != len(frames) - 1:
        return None
    specs = []
    for item, data in zip(inputs, frames[1:]):
        if not isinstance(item, dict) or set(item) != {"name", "datatype", "shape"} or not isinstance(item["name"], str) or not isinstance(item["datatype"], str):
            return None
        shape = item["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return None
        specs.append((item["name"], item["datatype"], shape, data))
    return request_spec(header["model"], specs, version)


def test_conformance_vectors_same_outputs_and_codes_as_the_python_client(c_example: Path, direct_daemon: RunningDaemon, tmp_path: Path) -> None:
    cases = [(vector, spec) for vector in VECTORS if (spec := _c_expressible(vector)) is not None]
    assert len(cases) >= 30, [v["name"] for v, _ in cases]  # the infer vectors oi_infer can say
    leases = leases_granted(direct_daemon)
    rows = run_requests(direct_daemon.address, [spec for _, spec in cases], tmp_path, "--timeout", "30000")
    assert leases_granted(direct_daemon) > leases
    compared = 0
    with Client(direct_daemon.address, timeout=30) as client:
        for (vector, spec), row in zip(cases, rows):
            name, expect = vector["name"], vector["expect"]
            assert row["status"] == expect.get("error", "OK"), (name, row)  # what the front door answers, said by a worker
            if row["status"] == "OK":
                assert row["path"] == "direct" and row["timing"] == DIRECT_TIMING, (name, row)
                assert [(n, d, s) for n, d, s, _ in row["outputs"]] == [(o["name"], o["datatype"], o["shape"]) for o in expect["outputs"]], name
            arrays = _python_inputs(spec)
            if arrays is None:
                continue
            try:
                want = client.infer(spec["model"], arrays, version=spec.get("version"))
            except OpenInferError as exc:
                assert row["status"] == exc.code, (name, row, exc)
            else:
                assert row["status"] == "OK", (name, row)
                assert [n for n, *_ in row["outputs"]] == list(want.outputs), name
                for out_name, _, shape, data in row["outputs"]:
                    got = want.outputs[out_name]
                    assert list(got.shape) == shape and data == np.ascontiguousarray(got).tobytes(), (name, out_name)
            compared += 1
    assert compared >= 20, compared


def test_over_the_lease_limit_is_refused_locally(c_example: Path, direct_daemon: RunningDaemon, tmp_path: Path) -> None:
    rows = lambda n: np.ones((n, 64), "<f4").tobytes()  # noqa: E731
    before, _ = counts(direct_daemon, "small_limit")
    got = run_requests(direct_daemon.address, [request_spec("small_limit", [("x", "FP32", [5, 64], rows(5))]),
                                               request_spec("small_limit", [("x", "FP32", [4, 64], rows(4))])], tmp_path)
    over, fits = got
    assert over["status"] == "RESOURCE_EXHAUSTED" and over["local"] == 1, over
    assert "max_request_bytes" in over["message"] and "1024" in over["message"] and "1280" in over["message"], over
    assert fits["status"] == "OK" and fits["path"] == "direct", fits
    after, _ = counts(direct_daemon, "small_limit")
    assert after - before == 1, (before, after)  # the refused one never reached the daemon
    with Client(direct_daemon.address) as client, pytest.raises(OpenInferError) as python_says:
        client.infer("small_limit", {"x": np.ones((5, 64), np.float32)})
    assert python_says.value.code == "RESOURCE_EXHAUSTED"


def test_over_the_front_doors_limit_is_refused_locally(c_example: Path, daemon_factory: Any, busy_repo: Path, tmp_path: Path) -> None:
    """On the front door (direct path off) the client learns the daemon's limit from `health` the first
    time a request is large, and refuses a request over it without sending a byte of it."""
    running = daemon_factory(busy_repo, env={"OPENINFER_POOL_DIRECT": "0", "OPENINFER_SERVER_MAX_REQUEST_BYTES": str(1 << 20)})
    big = np.ones((8192, 64), "<f4").tobytes()  # 2 MiB
    over, fits = run_requests(running.address, [request_spec("tiny", [("x", "FP32", [8192, 64], big)]),
                                                request_spec("tiny", [("x", "FP32", [1, 64], np.ones((1, 64), "<f4").tobytes())])], tmp_path)
    assert over["status"] == "RESOURCE_EXHAUSTED" and over["local"] == 1, over
    assert "server.max_request_bytes" in over["message"] and "1048576" in over["message"] and "2097152" in over["message"], over
    assert fits["status"] == "OK" and fits["path"] == "front-door", fits
    with Client(running.address, direct=False) as admin:
        assert "(oversized)" not in admin.stats()["operations"]  # never sent: the daemon skipped nothing


def test_front_door_when_the_daemon_has_no_direct_path(c_example: Path, example_daemon: RunningDaemon) -> None:
    """example_daemon runs without OPENINFER_POOL_DIRECT: `lease` is UNAVAILABLE with details.direct "off",
    and the client stops asking for its lifetime."""
    def refused() -> int:
        with Client(example_daemon.address, direct=False) as client:
            return int(client.stats()["operations"].get("lease", {}).get("UNAVAILABLE", 0))

    before = refused()
    done = run_example("--all", "--repeat", "5", example_daemon.address, "tiny")
    assert done.returncode == 0 and done.stdout.count("\npath front-door\n") == 5, done.stdout
    assert refused() - before == 1
    assert all("dispatch_us" in r["timing"] for r in parse_infer_output(done.stdout))


def test_lease_expiry_no_failed_request(c_example: Path, daemon_factory: Any, busy_repo: Path) -> None:
    running = daemon_factory(busy_repo, env={**DIRECT, "OPENINFER_SERVER_LEASE_TTL_S": "1"})
    leases = leases_granted(running)
    done = run_example("--quiet", "--duration", "4000", running.address, "tiny", timeout=120)
    summary = quiet_summary(done.stdout)
    assert summary["errors"] == {} and summary["ok"] == summary["rounds"] == summary["direct"] > 100, summary
    assert leases_granted(running) - leases >= 4  # renewed across several expiries (each lease lives 1 s)


def test_reload_and_a_replaced_model_no_failed_request(c_example: Path, daemon_factory: Any, busy_repo: Path, tmp_path: Path) -> None:
    """A busy client across a plain reload (every lease revoked) and a reload that replaces tiny (its
    workers retire: GOAWAY on every connection, new workers at new addresses)."""
    running = daemon_factory(busy_repo, env=DIRECT)
    stop = tmp_path / "stop"
    client = subprocess.Popen([str(EXAMPLE), "--quiet", "--stop-file", str(stop), running.address, "tiny"], stdout=subprocess.PIPE, text=True)
    try:
        def progress(after: int) -> bool:
            return counts(running, "tiny")[0] > after + 200
        with Client(running.address, direct=False) as admin:
            old_pids = {w["pid"] for w in admin.status()["workers"] if w["model"] == "tiny"}
            wait_for(lambda: progress(0), 60, "the C client under way", daemon=running)
            leases, synced = leases_granted(running), reloads_done(running)
            running.process.send_signal(signal.SIGHUP)
            wait_for(lambda: reloads_done(running) > synced, 30, "the plain reload", daemon=running)
            mark = counts(running, "tiny")[0]
            wait_for(lambda: progress(mark), 60, "requests after the plain reload", daemon=running)
            model = busy_repo / "tiny" / "1" / "model.onnx"
            fresh = model.with_name("model.onnx.new")
            shutil.copyfile(model, fresh)
            os.chmod(fresh, 0o644)
            os.replace(fresh, model)  # same bytes, a new file: the version is replaced
            running.process.send_signal(signal.SIGHUP)

            def switched() -> bool:
                status = admin.status()
                pids = {w["pid"] for w in status["workers"] if w["model"] == "tiny" and w["state"] in ("ready", "busy")}
                return bool(pids) and not pids & old_pids and not status["retiring"] and not status["reloading"]

            wait_for(switched, 90, "tiny served by new workers only", daemon=running)
            mark = counts(running, "tiny")[0]
            wait_for(lambda: progress(mark), 60, "requests after the switch", daemon=running)
            assert leases_granted(running) - leases >= 1  # the retired workers said GOAWAY: a new lease
    finally:
        stop.touch()
        out, _ = client.communicate(timeout=60)
    summary = quiet_summary(out)
    assert client.returncode == 0 and summary["errors"] == {} and summary["ok"] == summary["rounds"] > 600, (summary, out)
    assert summary["direct"] > summary["rounds"] * 0.9, summary


def test_killed_worker_fails_only_its_request(c_example: Path, daemon_factory: Any, busy_repo: Path, tmp_path: Path) -> None:
    running = daemon_factory(busy_repo, env=DIRECT)
    with Client(running.address, direct=False) as admin:
        busy_pids = [w["pid"] for w in admin.status()["workers"] if w["model"] == "busy"]
    assert len(busy_pids) == 2
    one = np.ones(1, "<f4").tobytes()
    forever, few = np.array(10**13, "<i8").tobytes(), np.array(3, "<i8").tobytes()
    specs = [request_spec("busy", [("x", "FP32", [1], one), ("n", "INT64", [], forever)]),
             request_spec("busy", [("x", "FP32", [1], one), ("n", "INT64", [], few)])]
    path = tmp_path / "busy.json"
    path.write_text(json.dumps(specs))
    stop = tmp_path / "stop"
    bystander = subprocess.Popen([str(EXAMPLE), "--quiet", "--stop-file", str(stop), running.address, "tiny"], stdout=subprocess.PIPE, text=True)
    victim_client = subprocess.Popen([str(EXAMPLE), "--timeout", "600000", "requests", running.address, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert victim_client.stdout is not None
        assert victim_client.stdout.readline() == "sending\t0\n"
        cpu = {pid: psutil.Process(pid).cpu_times().user for pid in busy_pids}

        def running_it() -> int | None:
            for pid in busy_pids:
                if psutil.Process(pid).cpu_times().user > cpu[pid] + 0.3:
                    return pid
            return None

        victim = wait_for(running_it, 60, "a busy worker running the endless request", daemon=running)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        out, _ = victim_client.communicate(timeout=120)
    finally:
        stop.touch()
        bystander_out, _ = bystander.communicate(timeout=60)
        if victim_client.poll() is None:
            victim_client.kill()
    crashed, after = parse_request_lines(out)
    assert crashed["status"] == "WORKER_CRASHED" and crashed["rc"] == "WORKER_CRASHED" and crashed["local"] == 1 and crashed["path"] == "direct", crashed
    assert after["status"] == "OK" and after["path"] == "direct", after  # a new lease, the surviving worker
    assert np.frombuffer(after["outputs"][0][3], "<f4").tolist() == [4.0]
    summary = quiet_summary(bystander_out)
    assert summary["errors"] == {} and summary["ok"] == summary["rounds"] > 0, summary
    # past its deadline the worker stops the run itself and answers DEADLINE_EXCEEDED (run_watch.py), not
    # WORKER_CRASHED (rc TIMEOUT instead if the client's own 200 ms of grace ran out first on a very busy machine)
    [late] = run_requests(running.address, specs[:1], tmp_path, "--timeout", "1500", timeout=120)
    assert late["status"] == "DEADLINE_EXCEEDED" and late["rc"] in ("DEADLINE_EXCEEDED", "TIMEOUT") and late["path"] == "direct", late
    assert late["local"] == 0 or late["rc"] == "TIMEOUT", late  # the worker's answer, not the client's guess


def test_valgrind_clean_on_the_direct_path(c_example: Path, direct_daemon: RunningDaemon, tmp_path: Path) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    specs = [request_spec("tiny", [("x", "FP32", [1, 64], X.tobytes())]), request_spec("tiny", [("x", "FP32", [1, 63], X[:, :63].tobytes())]),
             request_spec("no_such_model", [("x", "FP32", [1, 64], X.tobytes())]), request_spec("small_limit", [("x", "FP32", [5, 64], np.ones((5, 64), "<f4").tobytes())])]
    path = tmp_path / "valgrind.json"
    path.write_text(json.dumps(specs))
    for args in (["--repeat", "3", direct_daemon.address, "tiny"], ["requests", direct_daemon.address, str(path)]):
        done = run_example(*args, valgrind=True)
        assert done.returncode in (0, 1), f"valgrind reported errors or leaks for {args}:\n{done.stderr}"
        assert "==" not in done.stderr, done.stderr
    assert [r["status"] for r in parse_request_lines(done.stdout)] == ["OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"]


# -- a scripted daemon and workers ----------------------------------------------------------------------
def _success(request_id: int) -> tuple[dict[str, Any], bytes]:
    y = (X * 2).astype("<f4")
    header = {"v": 1, "id": request_id, "model": "tiny", "version": 1, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64]}],
              "timing": {key: 1.0 for key in DIRECT_TIMING}}
    return header, y.tobytes()


class ScriptedDirect:
    """A front door and six workers (pyzmq ROUTERs) playing the rules of PROTOCOL.md 17 for five
    requests of the C client:
      request 0: lease L1 [w1]; w1 answers the infer PERMISSION_DENIED {"lease": "expired"}; the client
                 takes L2 [w1], attaches it and sends the same request again; w1 says GOAWAY, then answers;
      request 1: lease L3 [w2] (w1 retired); w2 closes the connection with the request on it (it died);
      request 2: lease L4 [w3] (w2 is gone); w3 says GOAWAY, then answers;
      request 3: lease L5 [w4]; w4 says GOAWAY and closes with the request on it: a retiring worker
                 answers all it read, so this one was never read; the client takes L6 [w5] and sends it
                 there; w5 says GOAWAY, then answers;
      request 4: lease L7 [w6], whose limits say max_compute_ms 300; w6 says GOAWAY and closes 0.5 s
                 later: the daemon killing a retiring worker whose run passed max_compute_ms;
      request 5: lease L8 [w7]; w7 says GOAWAY listing the request as read, and closes: it died running
                 what it had read, maybe because of it - never sent again.
    Every message is logged as it arrives."""

    def __init__(self, directory: Path) -> None:
        self.context = zmq.Context()
        self.front = self._bind(f"ipc://{directory}/front.sock")
        self.workers = {name: self._bind(f"ipc://{directory}/{name}.sock") for name in ("w1", "w2", "w3", "w4", "w5", "w6", "w7")}
        self.w1_events = self.workers["w1"].get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.address = f"ipc://{directory}/front.sock"
        self.plan = [["w1"], ["w1"], ["w2"], ["w3"], ["w4"], ["w5"], ["w6"], ["w7"]]
        self.log: list[tuple[Any, ...]] = []
        self.w1_disconnected = threading.Event()
        self.error: BaseException | None = None
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _bind(self, address: str) -> zmq.Socket:  # type: ignore[type-arg]
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        return sock

    def _address(self, name: str) -> str:
        return self.address.replace("front.sock", f"{name}.sock")

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.front, self.w1_events, *self.workers.values()):
            poller.register(sock, zmq.POLLIN)
        expired_once = False
        close_w6_at: float | None = None
        try:
            while not self._done.is_set():
                if close_w6_at is not None and time.monotonic() >= close_w6_at:
                    close_w6_at = None
                    poller.unregister(self.workers["w6"])
                    self.workers["w6"].close(linger=0)
                for sock, _ in poller.poll(20):
                    if sock is self.w1_events:
                        self.w1_events.recv_multipart()
                        self.w1_disconnected.set()
                        continue
                    peer, *frames = sock.recv_multipart()
                    header = msgpack.unpackb(frames[0], raw=False)
                    if sock is self.front:
                        assert header["op"] == "lease" and header["model"] == "tiny", header
                        names = self.plan[len([e for e in self.log if e[0] == "lease"])]
                        token = f"L{len([e for e in self.log if e[0] == 'lease']) + 1}".encode()
                        self.log.append(("lease", token))
                        limits = {"max_request_bytes": 1 << 20, "max_header_bytes": 65536, "max_frames": 257}
                        if names == ["w6"]:
                            limits["max_compute_ms"] = 300
                        result = {"model": "tiny", "version": 1, "lease": token, "expires_in_ms": 5000,
                                  "workers": [{"address": self._address(n), "worker": i} for i, n in enumerate(names)], "limits": limits}
                        sock.send_multipart([peer, msgpack.packb({"v": 1, "id": header["id"], "result": result})])
                        continue
                    name = next(n for n, s in self.workers.items() if s is sock)
                    if header["op"] == "attach":
                        self.log.append(("attach", name, header["lease"]))
                        sock.send_multipart([peer, msgpack.packb({"v": 1, "id": header["id"], "result": {"model": "tiny", "version": 1, "worker": 1, "expires_in_ms": 5000}})])
                        continue
                    assert header["op"] == "infer", header
                    self.log.append(("infer", name, header["id"], frames))
                    if name == "w1" and not expired_once:
                        expired_once = True
                        error = {"code": "PERMISSION_DENIED", "message": "the lease has expired", "details": {"lease": "expired"}}
                        sock.send_multipart([peer, msgpack.packb({"v": 1, "id": header["id"], "error": error, "timing": {"total_us": 1.0}})])
                    elif name == "w2":
                        poller.unregister(sock)
                        sock.close(linger=0)  # the worker dies with the request on it
                    elif name == "w7":
                        sock.send_multipart([peer, msgpack.packb({"v": 1, "id": None, "goaway": True, "reason": "retiring", "read": [header["id"]]})])
                        poller.unregister(sock)
                        sock.close(linger=5000)
                    elif name in ("w4", "w6"):
                        sock.send_multipart([peer, msgpack.packb({"v": 1, "id": None, "goaway": True, "reason": "retiring", "read": []})])
                        if name == "w4":  # retires without reading it: the GOAWAY leaves (linger), then the close
                            poller.unregister(sock)
                            sock.close(linger=5000)
                        else:  # retiring, and killed while running it past max_compute_ms
                            close_w6_at = time.monotonic() + 0.5
                    else:  # w1, w3, w5: GOAWAY, then the answer (the next request takes a new lease)
                        sock.send_multipart([peer, msgpack.packb({"v": 1, "id": None, "goaway": True, "reason": "retiring"})])
                        reply, data = _success(header["id"])
                        sock.send_multipart([peer, msgpack.packb(reply), data])
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self._done.set()
        self.thread.join(10)
        self.w1_events.close(linger=0)
        for sock in (self.front, *self.workers.values()):
            sock.close(linger=0)
        self.context.term()


def test_direct_path_rules_against_a_scripted_daemon(c_example: Path, tmp_path: Path) -> None:
    scripted = ScriptedDirect(tmp_path)
    try:
        spec = request_spec("tiny", [("x", "FP32", [1, 64], X.tobytes())])
        rows = run_requests(scripted.address, [spec] * 6, tmp_path, "--timeout", "20000", timeout=60)
        assert scripted.w1_disconnected.wait(10), "the client never closed its connection to the worker that said GOAWAY"
    finally:
        scripted.close()
    assert scripted.error is None, repr(scripted.error)
    first, lost, third, unread, overran, read = rows
    assert first["status"] == "OK" and first["path"] == "direct", first
    assert np.array_equal(np.frombuffer(first["outputs"][0][3], "<f4"), (X * 2).ravel())
    assert lost["status"] == "WORKER_CRASHED" and lost["local"] == 1 and lost["path"] == "direct" and "w2.sock" in lost["message"], lost
    assert third["status"] == "OK" and third["path"] == "direct", third
    # closed after its GOAWAY with the request unanswered: never read, so sent to the next worker
    assert unread["status"] == "OK" and unread["path"] == "direct", unread
    assert np.array_equal(np.frombuffer(unread["outputs"][0][3], "<f4"), (X * 2).ravel())
    # closed after its GOAWAY once max_compute_ms had passed: it was running it, and is never sent again
    assert overran["status"] == "DEADLINE_EXCEEDED" and overran["local"] == 1 and "max_compute_ms (300 ms)" in overran["message"], overran
    # closed after a GOAWAY that listed it as read: the worker died while it could run it, never sent again
    assert read["status"] == "WORKER_CRASHED" and read["local"] == 1 and "had read this request when it retired" in read["message"], read
    log = scripted.log
    assert [e[1] for e in log if e[0] == "lease"] == [b"L1", b"L2", b"L3", b"L4", b"L5", b"L6", b"L7", b"L8"], log
    assert [(e[1], e[2]) for e in log if e[0] == "attach"] == [
        ("w1", b"L1"), ("w1", b"L2"), ("w2", b"L3"), ("w3", b"L4"), ("w4", b"L5"), ("w5", b"L6"), ("w6", b"L7"), ("w7", b"L8")], log
    infers = [e for e in log if e[0] == "infer"]
    assert [e[1] for e in infers] == ["w1", "w1", "w2", "w3", "w4", "w5", "w6", "w7"], infers
    assert infers[0][2] == infers[1][2] and infers[0][3] == infers[1][3]  # the same request sent again, once
    assert infers[4][2] == infers[5][2] and infers[4][3] == infers[5][3]  # the unread one, sent again once
    assert len({e[2] for e in infers}) == 6  # never resent after a worker that did not retire closed, nor after one that had read it


def test_front_door_drop_fails_the_request_at_once(c_example: Path, tmp_path: Path) -> None:
    """On the front door (here an older daemon: no `lease`), a connection that drops with the request in
    flight fails it at once (libzmq socket monitor), not at the client's 20 s timeout."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/front.sock"
    router.bind(address)
    seen: list[str] = []

    def serve() -> None:
        while router.poll(20_000):
            peer, *frames = router.recv_multipart()
            header = msgpack.unpackb(frames[0], raw=False)
            seen.append(header["op"])
            if header["op"] == "lease":
                error = {"code": "INVALID_ARGUMENT", "message": "unknown operation 'lease'"}
                router.send_multipart([peer, msgpack.packb({"v": 1, "id": header["id"], "error": error})])
            else:
                router.close(linger=0)  # the daemon goes away with the request in flight
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        done = run_example("--timeout", "20000", address, "tiny", timeout=60)
    finally:
        thread.join(10)
        if not router.closed:
            router.close(linger=0)
        context.term()
    assert seen == ["lease", "infer"], seen
    # TRANSPORT, not TIMEOUT: the call ended on the dropped connection, not at its 20 s timeout
    assert done.stdout.startswith("error UNAVAILABLE rc=TRANSPORT local=1: the connection to the daemon"), done.stdout
    assert "in flight" in done.stdout, done.stdout
