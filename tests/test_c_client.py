"""The C client (client/c), written from docs/PROTOCOL.md alone, against a real daemon.

Builds client/c with make (the build dependencies are Debian packages: a missing header is a test
failure naming them, not a skip), then runs client/c/openinfer-c-example:

- `tiny` through oi_infer gives the same outputs as the Python client for the same input;
- every conformance vector replayed through oi_request_raw gets the reply the vector expects;
- a non-infer operation through oi_request;
- no daemon at the address: the local UNAVAILABLE (transport) error within the client's timeout;
- a reply that comes after the client gave up is discarded by id, and a cancel was sent for it
  (against a scripted pyzmq ROUTER standing in for the daemon);
- CURVE over tcp:// with a key the access policy lists, and nothing for a key it does not;
- valgrind: no leaks and no memory errors (when valgrind is installed).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

import onnx_builders
from curve_setup import curve_env
from daemon_harness import EXAMPLE_MODELS, REPO_ROOT, RunningDaemon, cleanup_workdir, start_daemon, wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from repo_builder import make_world_readable

pytestmark = pytest.mark.live

C_DIR = REPO_ROOT / "client" / "c"
EXAMPLE = C_DIR / "openinfer-c-example"
VECTORS_PATH = REPO_ROOT / "tests" / "conformance" / "vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())
APT_PACKAGES = "apt-get install -y libzmq3-dev libmsgpack-dev pkg-config"
APT_HINT = f"{APT_PACKAGES}   (Debian 12 bookworm; on Debian 13 / newer Ubuntu the msgpack package is libmsgpack-c-dev)"

ELEMENT_SIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
                "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}
SUCCESS_TIMING = {"decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us", "cpu_us", "total_us"}
X = (0.01 * np.arange(64)).astype(np.float32).reshape(1, 64)  # what the example sends: x[i] = (float)(0.01 * i)


# -- build ------------------------------------------------------------------------------------------
def _build_deps_present() -> tuple[bool, str]:
    if shutil.which("pkg-config") is None:
        return False, "pkg-config is not installed"
    if subprocess.run(["pkg-config", "--exists", "libzmq"]).returncode != 0:
        return False, "libzmq headers (pkg-config libzmq) not found"
    if all(subprocess.run(["pkg-config", "--exists", name]).returncode != 0 for name in ("msgpack-c", "msgpack")):
        return False, "msgpack-c headers (pkg-config msgpack-c or msgpack) not found"
    return True, ""


@pytest.fixture(scope="module")
def c_example() -> Path:
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.fail(f"the C client needs make and a C compiler (apt-get install -y build-essential) and: {APT_HINT}")
    present, why = _build_deps_present()
    if not present:
        pytest.fail(f"cannot build client/c: {why}. Install the build dependencies: {APT_HINT}")
    done = subprocess.run(["make", "-C", str(C_DIR)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"make -C client/c failed (build dependencies: {APT_HINT}):\n{done.stdout}\n{done.stderr}")
    assert EXAMPLE.is_file()
    return EXAMPLE


@pytest.fixture(scope="module")
def c_example_asan(c_example: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same example program built with AddressSanitizer (run it with ASAN_OPTIONS=detect_leaks=0):
    for attacks whose harm is a memory error the plain build may not show."""
    sources = sorted(path.name for path in c_example.parent.glob("*.c"))  # the library and its example
    binary = tmp_path_factory.mktemp("asan") / "oi-asan"
    build = subprocess.run(["cc", "-std=c11", "-O1", "-g", "-fsanitize=address", "-o", str(binary), *sources, "-lzmq", "-lmsgpackc", "-lm"],
                           cwd=c_example.parent, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return binary


def run_example(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None, valgrind: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(EXAMPLE), *args]
    if valgrind:
        command = ["valgrind", "--quiet", "--leak-check=full", "--show-leak-kinds=all", "--errors-for-leak-kinds=all",
                   "--error-exitcode=99", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


# -- a daemon on the example models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def example_daemon() -> Iterator[RunningDaemon]:
    """Serves exactly the shipped example models (what the conformance vectors assume), sandboxed."""
    repo = world_readable_dir("oi-c-client-")
    for model_dir in EXAMPLE_MODELS.iterdir():
        shutil.copytree(model_dir, repo / model_dir.name)
    make_world_readable(repo)
    try:
        running = start_daemon(repo, env={"OPENINFER_POOL_DIRECT": "0"})  # the front door (the direct path: test_c_direct_path.py)
    except BaseException:
        shutil.rmtree(repo, ignore_errors=True)
        raise
    yield running
    running.stop()
    cleanup_workdir(running)
    shutil.rmtree(repo, ignore_errors=True)


# -- parsing the example's output ------------------------------------------------------------------
def parse_infer_output(stdout: str) -> list[dict[str, Any]]:
    """One dict per round: model, version, outputs {name: array}, timing {key: float}, or error."""
    rounds: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "model":
            name, _, version, _, request_id = rest.split()
            rounds.append({"model": name, "version": int(version), "id": int(request_id), "outputs": {}, "timing": {}})
        elif word == "output":
            name, datatype, shape_text, *values = rest.split()
            shape = tuple(int(d) for d in shape_text.strip("[]").split(",") if d)
            assert datatype == "FP32", line
            rounds[-1]["outputs"][name] = np.array([float(v) for v in values], np.float32).reshape(shape)
        elif word == "timing":
            rounds[-1]["timing"] = {k: float(v) for k, v in (item.split("=") for item in rest.split())}
        elif word == "error":
            rounds.append({"error": rest})
    return rounds


# -- tests ------------------------------------------------------------------------------------------
def test_tiny_outputs_equal_the_python_clients(c_example: Path, example_daemon: RunningDaemon) -> None:
    done = run_example("--all", example_daemon.address, "tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    [got] = parse_infer_output(done.stdout)
    assert got["model"] == "tiny" and got["version"] == 1, got
    assert set(got["outputs"]) == {"y"}
    with Client(example_daemon.address, timeout=20) as client:
        want = client.infer("tiny", {"x": X})
    assert got["outputs"]["y"].shape == want.outputs["y"].shape == (1, 64)
    assert np.allclose(got["outputs"]["y"], want.outputs["y"], rtol=1e-6, atol=1e-6), (got["outputs"]["y"], want.outputs["y"])
    # the reply's timing keys (the Python client adds its own client_us/transport_us; the C client
    # has those as separate fields, printed on the summary line)
    assert set(got["timing"]) == SUCCESS_TIMING == set(want.timing) - {"client_us", "transport_us"}, got["timing"]
    summary = next(line for line in done.stdout.splitlines() if line.startswith("summary "))
    values = dict(item.split("=") for item in summary.split()[1:])
    assert set(values) == {"queue_us", "compute_us", "total_us", "client_us", "transport_us"}, summary
    client_us, total_us, transport_us = (float(values[k]) for k in ("client_us", "total_us", "transport_us"))
    assert total_us == got["timing"]["total_us"] and client_us > 0
    assert abs(transport_us - (client_us - total_us)) < 0.01, summary


def test_default_output_shows_the_first_values(c_example: Path, example_daemon: RunningDaemon) -> None:
    done = run_example(example_daemon.address, "tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("output y FP32 [1,64]"))
    assert line.endswith(" ...") and len(line.split()) == 4 + 8 + 1, line


def test_daemon_errors_are_typed(c_example: Path, example_daemon: RunningDaemon) -> None:
    done = run_example(example_daemon.address, "no_such_model")
    assert done.returncode == 1
    assert done.stdout.startswith("error NOT_FOUND rc=NOT_FOUND local=0: "), done.stdout
    details = next(line for line in done.stdout.splitlines() if line.startswith("details "))
    assert "tiny" in json.loads(details.removeprefix("details "))["models"]
    done = run_example(example_daemon.address, "magika")  # x FP32[1,64] does not fit magika
    assert done.returncode == 1 and done.stdout.startswith("error INVALID_ARGUMENT rc=INVALID_ARGUMENT local=0: "), done.stdout


def test_the_c_client_sends_a_file_and_reads_the_verdict(c_example: Path, example_daemon: RunningDaemon, tmp_path: Path) -> None:
    """oi_infer_bytes and oi_output_text: magika's steps answer a file's content type; the same file
    again comes from the verdict cache (oi_result.cache)."""
    script = tmp_path / "hello.py"
    script.write_text("#!/usr/bin/env python3\nimport sys\n\n\ndef main() -> int:\n    print('hello', sys.argv[1:])\n    return 0\n\n\nraise SystemExit(main())\n")
    first = run_example("verdict", example_daemon.address, "magika", str(script))
    second = run_example("verdict", example_daemon.address, "magika", str(script))
    assert first.returncode == 0 and first.stdout.startswith("OK\tlabel=python\tgroup=code\t"), first.stdout + first.stderr
    assert first.stdout.rstrip().endswith("cache=0") and second.stdout.rstrip().endswith("cache=1"), (first.stdout, second.stdout)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert run_example("verdict", example_daemon.address, "magika", str(empty)).stdout.startswith("OK\tlabel=empty\t")
    refused = run_example("verdict", example_daemon.address, "tiny", str(script))  # tiny takes FP32 x, not bytes
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stdout, refused.stdout


def test_the_c_client_reads_each_line_of_the_ocr_chain(c_example: Path, example_daemon: RunningDaemon, tmp_path: Path) -> None:
    """oi_output_text_at: a BYTES output of several elements (the OCR chain's text lines), each read in
    turn, equal to what the Python client reads from the same picture."""
    from PIL import Image, ImageDraw, ImageFont

    picture = tmp_path / "lines.png"
    image = Image.new("RGB", (700, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 30), "first line of text", fill="black", font=ImageFont.load_default(size=40))
    draw.text((20, 140), "and a second one", fill="black", font=ImageFont.load_default(size=40))
    image.save(picture)
    with example_daemon.client(timeout=60) as client:
        lines = [t.decode() for t in client.infer("ocr", {"image": picture.read_bytes()}).outputs["text"]]
    assert len(lines) == 2, lines
    done = run_example("--timeout", "60000", "verdict", example_daemon.address, "ocr", str(picture), "image")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK\ttext=[" + ", ".join(f'"{line}"' for line in lines) + "]\t"), (done.stdout, lines)


def test_conformance_vectors_through_the_c_client(c_example: Path, example_daemon: RunningDaemon) -> None:
    done = run_example("conformance", example_daemon.address, str(VECTORS_PATH), timeout=600)
    lines = done.stdout.splitlines()
    assert lines[-1] == f"summary\t{len(VECTORS)} vectors\t0 mismatches", done.stdout[-3000:] + done.stderr
    assert lines[-2] == "after\tOK"
    assert done.returncode == 0
    rows = {}
    for line in lines[:-2]:
        name, status, id_field, frames_field, match, header_json = line.split("\t", 5)
        assert name not in rows, f"{name} reported twice"
        rows[name] = (status, id_field, frames_field, match, json.loads(header_json))
    assert set(rows) == {v["name"] for v in VECTORS}
    for vector in VECTORS:
        name, expect = vector["name"], vector["expect"]
        status, id_field, frames_field, match, header = rows[name]
        sizes = [int(s) for s in frames_field.removeprefix("frames=").split(",")]
        assert match == "match", (name, status, header)
        assert header["v"] == 1, name
        assert id_field == ("id=nil" if expect["id"] is None else f"id={expect['id']}"), (name, id_field)
        assert header["id"] == expect["id"], (name, header["id"])  # exact uint64 through the C JSON rendering
        if "error" in expect:
            assert status == expect["error"] == header["error"]["code"], (name, status, header)
            assert isinstance(header["error"]["message"], str) and header["error"]["message"], name
            assert len(sizes) == 1, (name, sizes)
            continue
        assert status == "OK" and "error" not in header, (name, header)
        if "outputs" in expect:
            assert header["outputs"] == expect["outputs"], (name, header["outputs"])
            assert set(header["timing"]) == SUCCESS_TIMING, (name, header["timing"])
            # BYTES elements have no fixed size: at least their 4-byte lengths
            want = [ELEMENT_SIZE.get(o["datatype"], 4) * int(np.prod(o["shape"], dtype=np.int64)) for o in expect["outputs"]]
            fixed = [o["datatype"] != "BYTES" for o in expect["outputs"]]
            assert len(sizes) == 1 + len(want) and all(got == w if exact else got >= w for got, w, exact in zip(sizes[1:], want, fixed)), (name, sizes, want)
        else:
            assert len(sizes) == 1, (name, sizes)
            assert set(expect["result_keys"]) <= set(header["result"]), (name, header["result"])
            for key, value in expect.get("result_values", {}).items():
                assert header["result"][key] == value, (name, key, header["result"][key])


def test_other_operations_through_oi_request(c_example: Path, example_daemon: RunningDaemon) -> None:
    done = run_example("op", example_daemon.address, "metadata", "tiny")
    assert done.returncode == 0 and done.stdout.startswith("OK\t"), done.stdout + done.stderr
    result = json.loads(done.stdout.split("\t", 1)[1])["result"]
    assert result["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert result["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}]
    done = run_example("op", example_daemon.address, "health")
    assert done.returncode == 0 and json.loads(done.stdout.split("\t", 1)[1])["result"]["ready"] is True
    done = run_example("op", example_daemon.address, "metadata", "no_such_model")
    assert done.returncode == 1 and done.stdout.startswith("error NOT_FOUND rc=NOT_FOUND local=0: "), done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_no_daemon_is_unavailable_within_the_timeout(c_example: Path, tmp_path: Path, kind: str) -> None:
    address = f"ipc://{tmp_path}/nobody-here.sock" if kind == "ipc" else f"tcp://127.0.0.1:{_free_port()}"
    timeout_ms = 700
    # A hang guard, not a speed figure: a client ignoring --timeout would wait out its 30 s default.
    try:
        done = run_example("--timeout", str(timeout_ms), address, "tiny", timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still waiting after 15 s: the client ignored --timeout {timeout_ms} (default budget 30 s)")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("error UNAVAILABLE rc=TRANSPORT local=1: no daemon connected"), done.stdout


class ScriptedDaemon:
    """A pyzmq ROUTER standing in for an older daemon (one without `lease`: the C client asks once on
    ipc://, then sends everything to the front door): holds the first infer past the client's timeout,
    and answers it only after the client's next request arrived, so that the late reply must be dropped."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        self.received: list[list[bytes]] = []
        self.leases: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _recv(self) -> tuple[bytes, dict[str, Any], list[bytes]]:
        while True:
            assert self.router.poll(20_000), "the C client sent nothing"
            routing_id, *frames = self.router.recv_multipart()
            header = msgpack.unpackb(frames[0], raw=False)
            if header.get("op") != "lease":
                self.received.append(frames)
                return routing_id, header, frames
            self.leases.append(header)  # what a daemon before PROTOCOL.md 17 answers:
            self._send(routing_id, {"v": 1, "id": header["id"], "error": {"code": "INVALID_ARGUMENT", "message": "unknown operation 'lease'; known: cancel, health, infer, ..."}, "timing": {"total_us": 1.0}})

    def _send(self, routing_id: bytes, header: dict[str, Any], *data: bytes) -> None:
        self.router.send_multipart([routing_id, msgpack.packb(header), *data])

    @staticmethod
    def _success(request_id: Any, y: np.ndarray) -> dict[str, Any]:
        timing = {key: 1.0 for key in SUCCESS_TIMING}
        return {"v": 1, "id": request_id, "model": "tiny", "version": 1, "timing": timing,
                "outputs": [{"name": "y", "datatype": "FP32", "shape": list(y.shape)}]}

    def _run(self) -> None:
        try:
            peer, first, frames = self._recv()
            assert first["op"] == "infer", first
            peer, cancel, _ = self._recv()  # the client gave up on `first`: it cancels it
            assert cancel["op"] == "cancel" and cancel["target"] == first["id"], cancel
            peer, second, frames = self._recv()
            assert second["id"] not in (first["id"], cancel["id"]), (first, cancel, second)
            # now everything the client must ignore, then its answer
            self._send(peer, {"v": 1, "id": cancel["id"], "result": {"cancelled": False}})
            self._send(peer, self._success(first["id"], np.full((1, 64), 99, np.float32)), np.full((1, 64), 99, np.float32).tobytes())
            self._send(peer, {"v": 1, "id": None, "error": {"code": "INVALID_ARGUMENT", "message": "no id"}, "timing": {"total_us": 1.0}})
            self._send(peer, {"v": 1, "id": second["id"] + 12345, "error": {"code": "INTERNAL", "message": "not yours"}})
            y = np.frombuffer(frames[1], "<f4").reshape(1, 64) * 2
            self._send(peer, {**self._success(second["id"], y), "future_key": [1, 2]}, y.tobytes())
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.thread.join(30)
        self.router.close()
        self.context.term()


@pytest.mark.parametrize("under_valgrind", [False, True], ids=["plain", "valgrind"])
def test_late_reply_is_discarded_by_id(c_example: Path, tmp_path: Path, under_valgrind: bool) -> None:
    if under_valgrind and shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    address = f"ipc://{tmp_path}/scripted.sock"
    daemon = ScriptedDaemon(address)
    try:
        # A hang guard (not a speed figure): the client must give up on round 1 by its 300 ms timeout.
        done = run_example("--timeout", "300", "--repeat", "2", "--all", address, "tiny", valgrind=under_valgrind, timeout=120 if under_valgrind else 15)
    finally:
        daemon.close()
    assert daemon.error is None, repr(daemon.error)
    assert done.returncode == 1, done.stdout + done.stderr  # round 1 failed (timeout), round 2 succeeded
    # ipc://: the client asked for a lease once, and after "unknown operation" never again (PROTOCOL.md 17.1)
    assert [lease["model"] for lease in daemon.leases] == ["tiny"], daemon.leases
    first, second = parse_infer_output(done.stdout)
    assert first == {"error": first["error"]} and first["error"].startswith("DEADLINE_EXCEEDED rc=TIMEOUT local=1: "), first
    assert np.array_equal(second["outputs"]["y"], X * 2), second["outputs"]["y"][0, :4]
    # what the C client put on the wire (PROTOCOL.md 4, 6): its encoder, checked against the document
    infer_frames = daemon.received[0]
    header = msgpack.unpackb(infer_frames[0], raw=False, strict_map_key=True)
    request_id = header.pop("id")
    assert isinstance(request_id, int) and 0 <= request_id < 2**64
    assert header == {"v": 1, "op": "infer", "model": "tiny", "timeout_ms": 300,
                      "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}
    assert infer_frames[1] == X.astype("<f4").tobytes() and len(infer_frames) == 2
    cancel = msgpack.unpackb(daemon.received[1][0])
    assert len(daemon.received[1]) == 1 and cancel == {"v": 1, "id": cancel["id"], "op": "cancel", "target": request_id}
    assert cancel["id"] != request_id


def test_valgrind_clean_against_the_daemon(c_example: Path, example_daemon: RunningDaemon) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    for args in (["--all", example_daemon.address, "tiny"], [example_daemon.address, "no_such_model"],
                 ["op", example_daemon.address, "status"]):
        done = run_example(*args, valgrind=True)
        assert done.returncode in (0, 1), f"valgrind reported errors or leaks for {args}:\n{done.stderr}"
        assert "==" not in done.stderr, done.stderr


def test_curve_over_tcp(c_example: Path, daemon_factory: Any, tmp_path: Path) -> None:
    repo = world_readable_dir("oi-c-curve-")
    shutil.copytree(EXAMPLE_MODELS / "tiny", repo / "tiny")
    make_world_readable(repo)
    try:
        known_public, known_secret = (k.decode() for k in zmq.curve_keypair())
        stranger_public, stranger_secret = (k.decode() for k in zmq.curve_keypair())
        env, server_public = curve_env(tmp_path, known_public.encode(), ["infer", "health"])
        address = f"tcp://127.0.0.1:{_free_port()}"
        daemon_factory(repo, "--socket", address, wait=False, address=address, env=env)
        keys = {"OPENINFER_CURVE_SERVER_KEY": server_public.decode(), "OPENINFER_CURVE_PUBLIC_KEY": known_public, "OPENINFER_CURVE_SECRET_KEY": known_secret}
        def ready_through_the_c_client() -> bool:  # its own health call is the readiness probe
            done = run_example("--timeout", "2000", "op", address, "health", env=keys)
            return done.returncode == 0 and bool(json.loads(done.stdout.split("\t", 1)[1])["result"]["ready"])

        wait_for(ready_through_the_c_client, 90, "the daemon ready, asked by the C client over CURVE")
        done = run_example("--all", address, "tiny", env=keys)
        assert done.returncode == 0, done.stdout + done.stderr
        [got] = parse_infer_output(done.stdout)
        assert got["outputs"]["y"].shape == (1, 64)
        stranger = {**keys, "OPENINFER_CURVE_PUBLIC_KEY": stranger_public, "OPENINFER_CURVE_SECRET_KEY": stranger_secret}
        done = run_example("--timeout", "1000", address, "tiny", env=stranger)
        assert done.returncode == 1 and done.stdout.startswith("error UNAVAILABLE rc=TRANSPORT local=1"), done.stdout
        plain = {k: "" for k in keys}
        done = run_example("--timeout", "1000", address, "tiny", env=plain)
        assert done.returncode == 1 and done.stdout.startswith("error UNAVAILABLE rc=TRANSPORT local=1"), done.stdout
        bad = {**keys, "OPENINFER_CURVE_SERVER_KEY": "too-short"}
        done = run_example(address, "tiny", env=bad)
        assert done.returncode == 2 and "oi_set_curve" in done.stderr
    finally:
        shutil.rmtree(repo, ignore_errors=True)


LYING_WORKER_STEPS = """
import sys
from openinfer.daemon.steps.contract import Answer
INPUTS = [{"name": "bytes", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "label", "datatype": "BYTES", "shape": [-1, -1]}]
BIG = 2 ** 63 - 1

def lying_encode(wanted, results):  # a compromised worker: a shape whose element count wraps to 1
    return [{"name": "label", "datatype": "BYTES", "shape": [BIG, BIG]}], [b"\\x05\\x00\\x00\\x00hello"]

def pre(inputs):
    sys.modules["openinfer.daemon.worker.direct_queue"].encode_outputs = lying_encode
    return Answer(label=[[b"x"]])
"""


def test_the_c_client_refuses_a_bytes_output_whose_shape_overflows(c_example: Path, tmp_path: Path) -> None:
    """A worker (direct path: nothing checks its reply before the client) claims BYTES [2^63-1, 2^63-1]
    with one element: the element count wraps to 1 in 64 bits. The C client must refuse the reply,
    not hand out a shape its caller would loop over (found by an attacker)."""
    from repo_builder import ModelRepo

    repo = ModelRepo("oi-c-lying-")
    repo.model("lying", onnx_builders.matmul_model, config='workers = 1\n[steps]\nmodule = "steps.py"\n')
    (repo.root / "lying" / "steps.py").write_text(LYING_WORKER_STEPS)
    data = tmp_path / "data"
    data.write_bytes(b"anything")
    running = start_daemon(repo.ready())
    try:
        done = run_example("verdict", running.address, "lying", str(data))
        assert done.returncode == 1 and "INTERNAL" in done.stdout and "BYTES frame does not hold" in done.stdout, done.stdout + done.stderr
        with Client(running.address) as client, pytest.raises(OpenInferError) as caught:  # the Python client: typed too
            client.infer("lying", {"bytes": b"anything"})
        assert caught.value.code == "INTERNAL" and "does not decode" in str(caught.value), str(caught.value)
    finally:
        running.stop()
        cleanup_workdir(running)
        repo.remove()
