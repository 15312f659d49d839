"""A worker taken over attacks its clients: on the direct path a client reads the worker's bytes itself,
so what a worker declares must be bounded where it arrives, in the client library.

The worker is the real one, sandboxed; it is taken over by its model's steps module (Python in the
worker's interpreter, like the `fake-page` step of test_hostile_steps.py). On request, the step writes a
reply of its own on the client's connection: a header naming the request, then the head of a frame that
says `declared` bytes follow, and 16 of them. The client runs in a process of its own, so that its peak
memory is its own. Before the fix, 18 bytes of framing made the client commit the whole declared size
(700 MB here), and a declared 512 GiB escaped `infer` as a raw MemoryError.

Attacker round 7 on the C client (client/c):
- a ZMTP COMMAND frame was held to no bound: declared at 2 GiB, then 600 MiB of it sent, it took the
  C client to 605 MiB (a message frame of that size was refused at once). A command over 64 KiB now breaks
  the protocol, the worker's connection is closed as its size arrives: OI_ERR_PROTOCOL;
- a reply header was decoded whatever its size under max_reply_bytes: 128 MiB of nils in it took the C
  client to 3.2 GiB (msgpack-c makes 16 bytes of every element). A header over 1 MiB is now refused as its
  size arrives, RESOURCE_EXHAUSTED naming the limit;
- a worker answering an `infer` with 200,000 PINGs, reading the PONGs 7 bytes at a time, kept the C
  client's oi_infer (1 s timeout) going past 30 s (~2.8 h at that rate): each PONG waited up to 100 ms, and
  the loop never looked at the request's deadline. Now a PONG never waits, and a worker past 64 commands
  at once (100 a second after) is cut: OI_ERR_PROTOCOL at once. Played by a fake worker endpoint here: a
  real worker's loop would read the PONGs at once (and the daemon kills a worker overstaying a deadline).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

from daemon_harness import RunningDaemon, world_readable_dir
from openinfer.client import AsyncClient, Client, ResourceExhausted, WorkerCrashed
from peak_memory import attacked_client, run_with_peak
from reference import run_reference
from steps_daemon import hostile_steps_daemon
from test_c_client import c_example, c_example_asan  # noqa: F401  (fixtures: build client/c)

pytestmark = pytest.mark.attack

STEPS = '''
import gc
import msgpack
import numpy as np
from openinfer.daemon.steps.contract import Answer

INPUTS = [{"name": "what", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "got", "datatype": "BYTES", "shape": []}]


def send_all(sock, chunks):
    """All of `chunks`, waiting for the client to read them (the worker's socket is non-blocking), or
    until it cuts the connection."""
    sock.settimeout(20)
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        sock.setblocking(False)


def pre(inputs):
    what = inputs["what"].item().decode()
    if what == "fine":
        return {"x": np.ones((1, 64), np.float32)}
    for conn in [o for o in gc.get_objects() if type(o).__name__ == "DirectConnection"]:
        for request_id in conn.open_ids:
            header = msgpack.packb({"v": 1, "id": request_id, "outputs": [{"name": "got", "datatype": "BYTES", "shape": []}]})
            if what.startswith("chain:"):  # then empty frames, each flagged MORE: a message without end
                conn.stream.sock.sendall(bytes((1, len(header))) + header + b"\\x01\\x00" * int(what[6:]))
            elif what.startswith("command:"):  # a COMMAND frame declared at 2 GiB, then `what` MiB of it
                send_all(conn.stream.sock, [bytes((6,)) + (2 << 30).to_bytes(8, "big") + b"\\x04PING"] + [bytes(1 << 20)] * int(what[8:]))
            elif what.startswith("header:"):  # a valid header, one key more: an array32 of `what` nils
                count = int(what[7:])
                big = bytes((header[0] + 1,)) + header[1:] + msgpack.packb("pad") + b"\\xdd" + count.to_bytes(4, "big") + b"\\xc0" * count
                send_all(conn.stream.sock, [bytes((2,)) + len(big).to_bytes(8, "big"), big])
            else:  # then the head of a frame of `what` bytes, and 16 of them
                conn.stream.sock.sendmsg([bytes((1, len(header))), header, bytes((2,)), int(what).to_bytes(8, "big"), bytes(16)])
    return Answer(got=b"sent")


def post(outputs):
    return {"got": b"ran"}
'''



@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    with hostile_steps_daemon("oi-hostile-replies-repo-", 'workers = 1\n\n[steps]\nmodule = "steps.py"\n', lambda root: STEPS) as running:
        yield running


def _serves_on(daemon: RunningDaemon) -> None:
    repo: Path = daemon.repo  # type: ignore[attr-defined]
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    with Client(daemon.address) as client:
        np.testing.assert_allclose(client.infer("canary", {"x": x}).outputs["y"], run_reference(repo / "canary" / "1" / "model.onnx", {"x": x})["y"], rtol=1e-5)
        assert client.infer("hostile", {"what": "fine"}).outputs["got"].item() == b"ran"


def test_a_reply_declared_over_the_leases_limit_is_refused_at_once_and_typed(daemon: RunningDaemon) -> None:
    """512 GiB declared, past the lease's max_reply_bytes (1 GiB by default): the request fails at once
    with RESOURCE_EXHAUSTED naming the limit, and the rest of that frame is skipped as it arrives."""
    outcome = attacked_client(daemon.address, str(512 << 30), 10.0)
    assert outcome["code"] == "RESOURCE_EXHAUSTED", outcome
    assert "max_reply_bytes" in outcome["message"] and "over this client's limit" in outcome["message"], outcome
    assert outcome["grown"] < 64 << 20, outcome
    assert outcome["next"] == "ran", "the next request went to the link whose frame was still being skipped"
    _serves_on(daemon)


def test_a_reply_of_endless_empty_frames_is_refused_at_once(daemon: RunningDaemon) -> None:
    """A header, then 100,000 empty frames each flagged MORE: over the 65,536 frames a reply may have, the
    request fails at once and the next one goes to a new link. (The Python clients bounded the frames
    before this change too; the C client's counterpart below did not.)"""
    outcome = attacked_client(daemon.address, "chain:100000", 10.0)
    assert outcome["code"] == "RESOURCE_EXHAUSTED" and "frames" in outcome["message"], outcome
    assert outcome["next"] == "ran", outcome
    _serves_on(daemon)


def test_a_reply_declared_and_never_sent_costs_the_client_no_memory(daemon: RunningDaemon) -> None:
    """700 MB declared, under the limit, and never sent: the client commits memory as bytes arrive, not
    as they are announced, and the request ends at its timeout, typed."""
    outcome = attacked_client(daemon.address, str(700 << 20), 0.5)
    assert outcome["code"] == "DEADLINE_EXCEEDED", outcome
    assert outcome["grown"] < 64 << 20, f"the client's peak memory grew by {outcome['grown'] >> 20} MiB"
    _serves_on(daemon)


@pytest.mark.parametrize("attack, answer", [(str(512 << 30), "RESOURCE_EXHAUSTED"), (str(700 << 20), "DEADLINE_EXCEEDED"), ("chain:100000", "RESOURCE_EXHAUSTED"),
                                            ("command:160", "INTERNAL rc=PROTOCOL"), (f"header:{8 << 20}", "RESOURCE_EXHAUSTED")],
                         ids=["over-the-limit", "never-sent", "endless-frames", "command-frame", "big-header"])
def test_the_c_client_bounds_what_a_worker_declares(daemon: RunningDaemon, c_example: Path, tmp_path: Path, attack: str, answer: str) -> None:
    """The same attacks on client/c: over the lease's max_reply_bytes, or over 65,536 frames, the request
    fails RESOURCE_EXHAUSTED (over the size it failed WORKER_CRASHED, "the worker ... exited", when the
    allocation failed; over the frames it grew without bound and waited past its timeout while the frames
    kept coming), and a declared frame costs the C client nothing until its bytes arrive. A COMMAND frame
    declared at 2 GiB, 160 MiB of it sent, breaks the protocol as its size arrives (before: buffered, the
    client's peak past 160 MiB, then DEADLINE_EXCEEDED); a header of 8 MiB (8 Mi nils) is refused over
    1 MiB, never decoded (before: decoded, ~200 MiB)."""
    what = tmp_path / "what"
    what.write_text(attack)
    outcome = run_with_peak([str(c_example), "--timeout", "500", "verdict", daemon.address, "hostile", str(what), "what"])
    assert outcome["stdout"].startswith(f"error {answer}"), outcome
    if attack.isdigit() and answer == "RESOURCE_EXHAUSTED":
        assert "over this client's limit of 1073741824 bytes" in outcome["stdout"], outcome
    if attack.startswith("command:"):
        assert "a command of 2147483648 bytes (the limit is 65536)" in outcome["stdout"], outcome
    if attack.startswith("header:"):
        assert "over this client's limit of 1048576 bytes for a reply header" in outcome["stdout"], outcome
    assert outcome["peak"] < 64 << 20, f"the C client's peak memory was {outcome['peak'] >> 20} MiB"
    _serves_on(daemon)


def test_the_c_clients_own_max_reply_bytes_bounds_the_direct_path(daemon: RunningDaemon, c_example: Path, tmp_path: Path) -> None:
    """oi_set_max_reply_bytes below the lease's bound: a worker's reply declared at 2 MiB is refused at
    once against the client's 1 MiB (before, the C client had no bound of its own: only the lease's)."""
    what = tmp_path / "what"
    what.write_text(str(2 << 20))
    outcome = run_with_peak([str(c_example), "--timeout", "5000", "--max-reply-bytes", str(1 << 20), "verdict", daemon.address, "hostile", str(what), "what"])
    assert outcome["stdout"].startswith("error RESOURCE_EXHAUSTED"), outcome
    assert "over this client's limit of 1048576 bytes" in outcome["stdout"], outcome
    _serves_on(daemon)


# -- a fake worker endpoint: raw ZMTP on a Unix socket, behind a fake front door that leases it ------------
def _command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes((len(name),)) + name + data
    return bytes((4, len(body))) + body


_GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\x00") + bytes(32)
_READY = _command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER")


def _send(sock: socket.socket, header: dict[str, Any]) -> None:
    body = msgpack.packb(header)
    sock.sendall(bytes((0, len(body))) + body)


def _send_reply(sock: socket.socket, header: dict[str, Any], data: bytes) -> None:
    """A two-frame reply (header, one tensor); short frames, as _send's."""
    body = msgpack.packb(header)
    sock.sendall(bytes((1, len(body))) + body + bytes((0, len(data))) + data)


def _messages(sock: socket.socket) -> Iterator[list[bytes]]:
    """The client's messages (its commands skipped), until it closes the connection."""
    buf = b""

    def take(count: int) -> bytes:
        nonlocal buf
        while len(buf) < count:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            buf += chunk
        out, buf = buf[:count], buf[count:]
        return out

    take(64)
    try:
        while True:
            frames = []
            while True:
                flags = take(1)[0]
                size = struct.unpack(">Q", take(8))[0] if flags & 2 else take(1)[0]
                body = take(size)
                if flags & 4:
                    continue
                frames.append(body)
                if not flags & 1:
                    break
            yield frames
    except (EOFError, OSError):
        return


class FakeWorker:
    """A front door that leases one worker, and that worker, which plays `behaviour`:
    - "pings": attaches, then answers an `infer` with `pings` PINGs and reads what the client sends back
      7 bytes (one PONG) every 50 ms, as round 7's attacker did;
    - "never-greets": accepts connections and never sends its greeting (a busy or stuck worker);
    - "goaway-for-attach": answers `attach` with a GOAWAY only, then nothing (round 21);
    - "oversized-reply-map-id": leases with max_reply_bytes 4096; answers an `infer` with a header whose
      id is a map and a frame of 8 KiB, then (in the same write) the real reply (round 21);
    - "oversized-then-dies": leases with max_reply_bytes 4096; answers the first `infer` with a reply of
      8 KiB, and closes the connection once it has read the second (it died running it; round 23);
    - "expires-always": answers every `infer` PERMISSION_DENIED {"lease": "expired"} (a lease revoked by
      reload after reload; round 23);
    - "goaway-not-true": answers an `infer` with its reply, carrying `"goaway": "no"` (round 63);
    - "undecodable-header": answers an `infer` with a header that is not msgpack, then nothing (round 63);
    - "stops-reading": attaches, then takes no byte more once it has read an `infer` (shutdown SHUT_RD:
      the client's cancel cannot be written; round 21)."""

    def __init__(self, behaviour: str, pings: int = 0) -> None:
        self.behaviour = behaviour
        self.pings = pings
        self.infers = 0
        self.front_door_ops: list[str] = []
        self.dir = world_readable_dir("oi-fake-worker-")
        self.address = f"ipc://{self.dir}/front.sock"
        self.worker_address = f"ipc://{self.dir}/worker.sock"
        self.context = zmq.Context()
        self.front = self.context.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.bind(self.address)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(f"{self.dir}/worker.sock")
        self.listener.listen(8)
        self.done = threading.Event()
        self.threads = [threading.Thread(target=target, daemon=True) for target in (self._front_door, self._worker)]
        for thread in self.threads:
            thread.start()

    def _front_door(self) -> None:
        while not self.done.is_set():
            if not self.front.poll(50):
                continue
            peer, *frames = self.front.recv_multipart()
            header = msgpack.unpackb(frames[0])
            limits = {"max_request_bytes": 1 << 26, "max_header_bytes": 65536, "max_frames": 257}
            self.front_door_ops.append(header["op"])
            if self.behaviour in ("oversized-reply-map-id", "oversized-then-dies"):
                limits["max_reply_bytes"] = 4096
            result = {"model": "m", "version": 1, "lease": b"token", "expires_in_ms": 60000, "workers": [{"address": self.worker_address, "worker": 0}], "limits": limits}
            reply = {"v": 1, "id": header["id"], "result": result} if header["op"] == "lease" else {"v": 1, "id": header["id"], "error": {"code": "UNAVAILABLE", "message": "no"}}
            self.front.send_multipart([peer, msgpack.packb(reply)])

    def _worker(self) -> None:
        self.listener.settimeout(0.05)
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if self.behaviour == "never-greets":
                self.done.wait()
                return
            conn.sendall(_GREETING + _READY)
            for frames in _messages(conn):
                header = msgpack.unpackb(frames[0])
                if header["op"] == "attach" and self.behaviour == "goaway-for-attach":
                    _send(conn, {"v": 1, "id": None, "goaway": True, "reason": "retiring"})
                    self.done.wait()
                    return
                if header["op"] == "attach":
                    _send(conn, {"v": 1, "id": header["id"], "result": {"model": "m", "version": 1, "worker": 0, "expires_in_ms": 60000}})
                elif header["op"] == "infer" and self.behaviour == "oversized-reply-map-id":
                    bogus = msgpack.packb({"v": 1, "id": {"x": 1}})
                    real = msgpack.packb({"v": 1, "id": header["id"], "model": "m", "version": 1, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4]}], "timing": {"total_us": 1.0}})
                    conn.sendall(bytes((1, len(bogus))) + bogus + bytes((2,)) + (8192).to_bytes(8, "big") + bytes(8192)  # in one write: read together
                                 + bytes((1, len(real))) + real + bytes((0, 16)) + np.ones(4, "<f4").tobytes())
                elif header["op"] == "infer" and self.behaviour == "oversized-then-dies":
                    self.infers += 1
                    if self.infers == 2:
                        return  # it dies with the second request read
                    bogus = msgpack.packb({"v": 1, "id": header["id"]})
                    conn.sendall(bytes((1, len(bogus))) + bogus + bytes((2,)) + (8192).to_bytes(8, "big") + bytes(8192))
                elif header["op"] == "infer" and self.behaviour == "expires-always":
                    _send(conn, {"v": 1, "id": header["id"], "error": {"code": "PERMISSION_DENIED", "message": "the lease has expired", "details": {"lease": "expired"}}})
                elif header["op"] == "infer" and self.behaviour == "goaway-not-true":
                    _send_reply(conn, {"v": 1, "id": header["id"], "goaway": "no", "model": "m", "version": 1, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4]}], "timing": {"total_us": 1.0}}, np.ones(4, "<f4").tobytes())
                elif header["op"] == "infer" and self.behaviour == "undecodable-header":
                    conn.sendall(bytes((0, 1)) + b"\xc1")  # a one-frame message whose header is not msgpack
                    self.done.wait()
                    return
                elif header["op"] == "infer" and self.behaviour == "stops-reading":
                    conn.shutdown(socket.SHUT_RD)
                    self.done.wait()
                    return
                elif header["op"] == "infer":
                    threading.Thread(target=self._read_slowly, args=(conn,), daemon=True).start()
                    try:
                        conn.sendall(_command(b"PING", b"\x00\x00") * self.pings)
                    except OSError:  # the client cut the connection
                        pass
                    return

    def _read_slowly(self, conn: socket.socket) -> None:
        try:
            while not self.done.wait(0.05) and conn.recv(7):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(10)
        self.listener.close()
        self.front.close(0)
        self.context.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_a_ping_flood_cuts_the_worker_and_ends_the_c_clients_call_at_once(c_example: Path, tmp_path: Path) -> None:
    """200,000 PINGs in answer to an `infer`, the PONGs read 7 bytes every 50 ms: the C client cuts the
    worker at its 65th command, OI_ERR_PROTOCOL. Before, each PONG waited up to 100 ms for room, the
    request's deadline never looked at: the call (1 s timeout) was still running when the 30 s guard
    below ended it."""
    worker = FakeWorker("pings", 200_000)
    try:
        try:
            done = subprocess.run([str(c_example), "--timeout", "1000", worker.address, "m"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the C client's oi_infer (1 s timeout) was still answering PINGs after 30 s")
    finally:
        worker.close()
    assert done.stdout.startswith("error INTERNAL rc=PROTOCOL"), done.stdout + done.stderr
    assert "broke the protocol: more than 64 commands at once, or 100 a second" in done.stdout, done.stdout


def test_a_worker_that_never_greets_fails_the_c_clients_call_in_time_without_a_memory_error(c_example_asan: Path) -> None:
    """Attacker round 8: a worker that accepts but does not greet before the call's deadline (any busy
    worker, no attacker needed). The connect timed out, `attach` dropped the leases naming the worker -
    freeing the address string it was given - and then wrote that freed string into the error (ASan:
    heap-use-after-free in 3 of 3 runs against a real busy OCR worker; the plain build printed heap bytes).
    Now the error is written first, and the leases are compared against a copy of the address."""
    worker = FakeWorker("never-greets")
    try:
        done = subprocess.run([str(c_example_asan), "--timeout", "500", worker.address, "m"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    finally:
        worker.close()
    assert "AddressSanitizer" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.startswith("error DEADLINE_EXCEEDED") and f"no connection to the worker at ipc://{worker.dir}/worker.sock in time" in done.stdout, done.stdout


def _c_call_under_asan(c_example_asan: Path, worker: FakeWorker, timeout_ms: int, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([str(c_example_asan), "--timeout", str(timeout_ms), *args, worker.address, "m"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    finally:
        worker.close()


def test_a_cancel_the_worker_does_not_take_fails_the_c_clients_call_without_a_memory_error(c_example_asan: Path) -> None:
    """Round 21's attacker (high): the C client's call timed out on a worker that was not reading (a busy
    one will do, with a request of about the socket's buffer), the cancel could not be written, and the
    failed send closed and freed the link - which the call then read and closed again (ASan:
    heap-use-after-free in oi_direct_infer; SIGSEGV in the plain build). The cancel now only says whether
    it went; the call closes the link once."""
    done = _c_call_under_asan(c_example_asan, FakeWorker("stops-reading"), 300)
    assert "AddressSanitizer" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.startswith("error DEADLINE_EXCEEDED") and "no reply from the worker within the client's timeout" in done.stdout, done.stdout + done.stderr[-2000:]


def _infer_ones(worker: FakeWorker, kind: str) -> Any:
    """An infer of `m` by the sync or the async Python client through the fake daemon, which is closed after."""
    x = {"x": np.ones((1, 4), np.float32)}

    async def async_call() -> Any:
        async with AsyncClient(worker.address, timeout=10) as client:
            return await client.infer("m", x)

    try:
        if kind == "sync":
            with Client(worker.address, timeout=10) as client:
                return client.infer("m", x)
        return asyncio.run(async_call())
    finally:
        worker.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_reply_that_says_goaway_other_than_true_is_a_reply(kind: str) -> None:
    """Round 63: the Python clients took any truthy `goaway` for a GOAWAY (PROTOCOL.md 17.5: `true`, with
    `id` nil) - a reply carrying `"goaway": "no"` was dropped and its request sent again through the front
    door; the C client reads it as the document words it. Both do now."""
    worker = FakeWorker("goaway-not-true")
    assert _infer_ones(worker, kind).outputs["y"].tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert worker.front_door_ops == ["lease"]  # nothing sent again through the front door


def test_a_reply_header_the_c_client_cannot_decode_ends_the_call_at_once(c_example_asan: Path) -> None:
    """Round 63: the C client dropped a reply header it could not decode and waited out the call's timeout
    (the Python clients fail at once: no request can be told from it). Now the link goes at once, the call
    fails INTERNAL naming why."""
    done = _c_call_under_asan(c_example_asan, FakeWorker("undecodable-header"), 20_000)
    assert "AddressSanitizer" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.startswith("error INTERNAL rc=PROTOCOL") and "a reply header that is not a protocol map" in done.stdout, done.stdout + done.stderr[-2000:]


def test_a_goaway_in_answer_to_attach_fails_the_c_clients_call_without_a_memory_error(c_example_asan: Path) -> None:
    """Round 21's attacker: a worker answering `attach` with a GOAWAY made the C client drop the lease -
    freeing the address string `attach` was given - while it waited, then write that string into its
    timeout's error (ASan: heap-use-after-free in attach). `attach` keeps its own copy."""
    worker = FakeWorker("goaway-for-attach")
    done = _c_call_under_asan(c_example_asan, worker, 500)
    assert "AddressSanitizer" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.startswith("error DEADLINE_EXCEEDED") and f"no answer to attach from the worker at {worker.worker_address} in time" in done.stdout, done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_oversized_reply_whose_id_is_a_map_is_dropped_and_the_real_reply_answers(kind: str) -> None:
    """Round 21's attacker: a reply over the lease's max_reply_bytes whose header's id was a map raised a
    raw TypeError out of Client.infer (unhashable, looked up among the pending requests); in AsyncClient
    it escaped into the event loop and took the replies read with it along: the real reply that followed
    was lost and the call waited out its timeout. Such a reply names no request and is dropped, as any
    reply naming none is; the real one answers."""
    worker = FakeWorker("oversized-reply-map-id")
    assert _infer_ones(worker, kind).outputs["y"].tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_a_request_on_a_link_cut_for_an_oversized_reply_is_not_sent_again_when_the_worker_dies() -> None:
    """Round 23's attacker: a reply over the client's limit makes the Python client send nothing more on
    that link, and it marked the link as if the worker had said GOAWAY; when the worker then died with a
    second request read, the client took that one for never read and sent it again through the front
    door (a poison input killed a second worker). Only a GOAWAY makes a close the end of a drain."""
    worker = FakeWorker("oversized-then-dies")

    async def two() -> list[Any]:
        async with AsyncClient(worker.address, timeout=10) as client:
            x = {"x": np.ones((1, 4), np.float32)}
            return await asyncio.gather(client.infer("m", x), client.infer("m", x), return_exceptions=True)

    try:
        oversized, died = asyncio.run(two())
    finally:
        worker.close()
    assert isinstance(oversized, ResourceExhausted), oversized
    assert isinstance(died, WorkerCrashed), died
    assert worker.front_door_ops == ["lease"], worker.front_door_ops


def test_a_request_whose_lease_expires_twice_goes_to_the_c_clients_front_door(c_example: Path) -> None:
    """Round 23's attacker: reloads back to back revoked a C client's lease twice within one request, and
    the second refusal - PERMISSION_DENIED {"lease": "expired"}, which says "take a new lease and send it
    again" - was returned as the request's answer (126 of ~27,000 requests). Like the Python clients, it
    now sends the request through the front door."""
    worker = FakeWorker("expires-always")
    try:
        done = subprocess.run([str(c_example), "--timeout", "5000", worker.address, "m"], capture_output=True, text=True, timeout=60)
    finally:
        worker.close()
    assert "PERMISSION_DENIED" not in done.stdout, done.stdout
    assert worker.front_door_ops.count("infer") == 1, worker.front_door_ops
