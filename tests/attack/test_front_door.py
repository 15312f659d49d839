"""Attacks on the front door from a client socket, as the security review made them (issue #16, findings
1, 2, 3, 7, 8), each against a real daemon. Every test performs the attack and asserts it fails; each
failed against the daemon before the front door was its own (libzmq ROUTER): see the commit message.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
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
from daemon_harness import world_readable_dir
from openinfer.client import AsyncClient, Client, ResourceExhausted
from openinfer.wire import zmtp
from other_uid import NOBODY, run_as, start_as

pytestmark = pytest.mark.attack

X = np.ones((1, 64), np.float32)
SLOW = {"x": np.zeros(1, np.float32), "n": np.array(400_000, np.int64)}  # ~0.3 s of Loop iterations
OPEN_TO_ALL = {"OPENINFER_SERVER_SOCKET_MODE": "0o666"}  # other uids may open the socket file


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-attack-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\n")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def dealer(context: zmq.Context, address: str, routing_id: bytes | None = None) -> zmq.Socket:  # type: ignore[type-arg]
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(address)
    return sock


def infer_frames(request_id: int, x: np.ndarray) -> list[bytes]:
    header = {"v": 1, "id": request_id, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape)}]}
    return [msgpack.packb(header), x.tobytes()]


def glibc_rand_sequence(count: int) -> list[int]:
    """The first values of rand() in a process that never called srand() (glibc's default seed 1)."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.srand(1)
    return [libc.rand() for _ in range(count)]


def push(peer: zmtp.FrameStream, frames: list[bytes], seconds: float) -> bool:
    """Send a message and keep writing it for up to `seconds` (the daemon may stop reading us)."""
    import select

    peer.send(frames)
    deadline = time.monotonic() + seconds
    while peer.out_bytes and time.monotonic() < deadline:
        select.select([], [peer.sock], [], max(0.0, deadline - time.monotonic()))
        peer.flush()
    return not peer.out_bytes


def raw_peer(address: str) -> zmtp.FrameStream:
    """A hand-written ZMTP DEALER on a plain Unix socket: it does exactly what the test says, no more
    (libzmq would reconnect, buffer, and read on its own)."""
    import select

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address[len("ipc://") :])
    sock.setblocking(False)
    stream = zmtp.FrameStream(sock, zmtp.Limits(message_bytes=1 << 30), handshake=True, socket_type=b"DEALER", accept_types=frozenset({b"ROUTER"}))
    deadline = time.monotonic() + 10
    while not stream.open:  # greeting and READY both ways before any message
        assert time.monotonic() < deadline, "no ZMTP handshake"
        select.select([sock], [], [], 0.1)
        stream.read()
    return stream


# -- finding 1: routing ids chosen by peers ------------------------------------------------------------
def test_claimed_routing_ids_neither_abort_the_daemon_nor_route_replies(daemon_factory: Any, repo: Path) -> None:
    """libzmq's ROUTER hands out ids 0x00 + a counter from an unseeded rand() (006b8b4567 first); peers
    that claimed the next ones made the next ordinary connection abort the supervisor (exit 134)."""
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_MAX_CONNECTIONS_PER_IDENTITY": "1000"})
    context = zmq.Context()
    # libzmq starts each ROUTER's (and REP's) id counter at generate_random(): two calls of glibc's
    # unseeded rand(), the second's low bit on top. Claim the next ids after the first few such starts, as
    # the attacker did, plus random ones and ids that look like ours.
    values = glibc_rand_sequence(17)
    starts = {(values[i + 1] & 1) << 31 | values[i] for i in range(16)}
    claimed = [b"\x00" + struct.pack(">I", (start + i) & 0xFFFFFFFF) for start in sorted(starts) for i in range(12)]
    claimed += [b"\x00" + os.urandom(4) for _ in range(8)] + [b"victim", b"\x00", b"1", b"2"]
    squatters = [dealer(context, daemon.address, rid) for rid in claimed]
    ordinary: list[Any] = []
    try:
        for sock in squatters:  # each completes its connection (a reply proves it)
            sock.send_multipart([msgpack.packb({"v": 1, "id": 1, "op": "health"})])
        for sock in squatters:
            assert sock.poll(10_000) or daemon.process.poll() is not None, "a squatter got no reply"
            assert daemon.process.poll() is None, f"the daemon died: {daemon.log_text()[-300:]}"
            assert msgpack.unpackb(sock.recv_multipart()[0])["id"] == 1
        ordinary.extend(dealer(context, daemon.address) for _ in range(16))
        for index, sock in enumerate(ordinary):
            sock.send_multipart(infer_frames(100 + index, X * index))
        for index, sock in enumerate(ordinary):
            assert sock.poll(10_000) or daemon.process.poll() is not None, "an ordinary client got no reply"
            assert daemon.process.poll() is None, f"the daemon died: {daemon.log_text()[-300:]}"
            reply = sock.recv_multipart()
            header = msgpack.unpackb(reply[0])
            assert header["id"] == 100 + index and "outputs" in header, header  # its own reply, nobody else's
        for sock in squatters:  # and the squatters got nothing that was not theirs
            assert not sock.poll(0)
        assert daemon.process.poll() is None, "the daemon died"
    finally:
        for sock in squatters + ordinary:
            sock.close()
        context.term()


# -- finding 3: a reply delivered to another client ---------------------------------------------------
def test_a_reconnecting_peer_with_the_victims_routing_id_gets_nothing(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "access.toml"
    policy.write_text('[[grant]]\nname = "root"\nuids = [0]\noperations = ["infer", "status", "stats", "health", "models", "metadata", "cancel"]\n\n'
                      f'[[grant]]\nname = "nobody-health-only"\nuids = [{NOBODY}]\noperations = ["health"]\n')
    daemon = daemon_factory(repo, env={**OPEN_TO_ALL, "OPENINFER_SERVER_ACCESS_POLICY": str(policy)})
    admin = daemon.client()
    done_before = admin.stats()["models"].get("busy", {}).get("success", 0)
    context = zmq.Context()
    victim = dealer(context, daemon.address, b"victim")
    header = {"v": 1, "id": 4242, "op": "infer", "model": "busy", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}, {"name": "n", "datatype": "INT64", "shape": []}]}
    victim.send_multipart([msgpack.packb(header), SLOW["x"].tobytes(), SLOW["n"].tobytes()])
    wait_for(lambda: admin.status()["in_flight"] + admin.status()["queued"] >= 1, 10, "the victim's task to be accepted")
    victim.setsockopt(zmq.LINGER, 0)
    victim.close()  # the victim's connection drops while its task runs
    thief = start_as(NOBODY, """
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"victim")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(sys.argv[1])
        sock.send_multipart([msgpack.packb({"v": 1, "id": 1, "op": "health"})])
        assert sock.poll(10_000)
        sock.recv_multipart()
        print("connected", flush=True)
        sys.stdin.readline()  # the test says when the victim's reply has been written
        got = []
        while sock.poll(500):
            got.append(msgpack.unpackb(sock.recv_multipart()[0]).get("id"))
        print(json.dumps(got), flush=True)
    """, daemon.address)
    assert thief.stdout is not None and thief.stdin is not None
    try:
        assert thief.stdout.readline().strip() == "connected"
        wait_for(lambda: admin.stats()["models"].get("busy", {}).get("success", 0) > done_before, 20, "the victim's task to finish")
    finally:
        out, err = thief.communicate("check\n", timeout=30)
    context.term()
    assert out.strip() == "[]", f"the thief received {out!r} {err}"
    assert admin.status()["connections"]["replies_dropped"] >= 1  # the victim's reply went nowhere


# -- finding 2: connections up to the fd limit --------------------------------------------------------
def test_a_connection_flood_past_the_fd_limit_never_aborts_the_daemon(daemon_factory: Any, repo: Path) -> None:
    """The supervisor's open-file limit is 256 here; an attacker opens 700 idle connections (raw sockets:
    no handshake, as refused peers and slowloris peers are). libzmq accepted them all before any check
    and aborted on EMFILE. Now the per-identity cap refuses the attacker's excess and a client of
    another uid connects and is served; a client connected before the flood is served throughout."""
    daemon = daemon_factory(repo, env=OPEN_TO_ALL, launcher=["prlimit", "--nofile=256:256"])
    before = daemon.client()
    before.infer("tiny", {"x": X})
    flood: list[socket.socket] = []
    try:
        for _ in range(700):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(daemon.address[len("ipc://") :])
            except (BlockingIOError, ConnectionRefusedError):
                pass  # the backlog is full: the kernel holds the rest
            flood.append(sock)
        np.testing.assert_allclose(before.infer("tiny", {"x": X}).outputs["y"].shape, (1, 64))
        done = run_as(NOBODY, """
            with Client(sys.argv[1], timeout=10) as client:
                print(client.infer("tiny", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape)
        """, daemon.address)
        assert done.returncode == 0 and done.stdout.strip() == "(1, 64)", done.stderr
        status = before.status()["connections"]
        assert status["connections"] <= status["max_connections"] <= 256
        assert status["refused"].get("max_connections_per_identity", 0) > 0
        assert daemon.process.poll() is None
    finally:
        for sock in flood:
            sock.close()


def test_at_the_global_cap_the_rest_wait_and_the_daemon_keeps_serving(daemon_factory: Any, repo: Path) -> None:
    """300 raw connections that never start their handshake hold at most the handshakes' share of the
    slots (half of server.max_connections); each new client displaces the oldest of them and is served.
    Once clients that completed their handshake hold every slot, the rest wait in the kernel's backlog."""
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_MAX_CONNECTIONS": "32", "OPENINFER_SERVER_MAX_CONNECTIONS_PER_IDENTITY": "1000"})
    before = daemon.client()
    before.infer("tiny", {"x": X})
    flood = []
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(daemon.address[len("ipc://") :])
        except (BlockingIOError, ConnectionRefusedError):
            pass
        flood.append(sock)
    clients: list[Client] = []
    try:
        wait_for(lambda: before.status()["connections"]["handshaking"] == 16, 10, "the flood to fill the handshakes' share")
        assert before.status()["connections"]["connections"] == 1 + 16
        for _ in range(31):
            clients.append(Client(daemon.address, timeout=10))
            assert clients[-1].health()["ready"]  # it displaced a flood connection to get in
        wait_for(lambda: before.status()["connections"]["connections"] == 32, 10, "the cap to fill")
        status = before.status()["connections"]
        assert status["handshaking"] == 0 and status["refused"]["handshake_share"] > 0, status
        assert before.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)  # an open connection is served
        assert daemon.process.poll() is None
    finally:
        for client in clients:
            client.close()
        for sock in flood:
            sock.close()
    with Client(daemon.address, timeout=10) as after:  # once the flood is gone, new clients get in again
        assert after.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


# -- finding 7: memory guard bypassed by a busy slow reader ------------------------------------------
def test_a_peer_that_never_reads_its_replies_cannot_grow_the_supervisor(daemon_factory: Any, repo: Path) -> None:
    """The attacker keeps sending requests with 4 MiB replies and never reads one. It was cut only if
    idle, and grew the supervisor past its memory limit; now its requests stop being read once its reply
    backlog passes the limit, and the connections holding the most are cut when buffers pass theirs."""
    env = {"OPENINFER_SERVER_MAX_REPLY_BACKLOG_BYTES": str(8 << 20), "OPENINFER_SERVER_MAX_CONNECTION_BUFFERS_BYTES": str(48 << 20)}
    daemon = daemon_factory(repo, env=env)
    good = daemon.client()
    supervisor = psutil.Process(daemon.process.pid)
    baseline = supervisor.memory_info().rss
    big = np.ones((16384, 64), np.float32)  # 4 MiB in, 4 MiB out
    request = infer_frames(1, big)
    peers = [raw_peer(daemon.address) for _ in range(8)]
    health = [msgpack.packb({"v": 1, "id": 2, "op": "health"})]
    peak = baseline
    stalled: set[int] = set()  # peers the daemon stopped reading: more would only wait in their socket
    try:
        for round_ in range(12):  # 8 peers x 12 requests x 4 MiB = 384 MiB of replies nobody reads
            for index, peer in enumerate(peers):
                if peer.closed or index in stalled:
                    continue
                try:
                    if not (push(peer, request, 0.5) and push(peer, health, 0.1)):  # busy, never idle: an idle-only guard would not cut it
                        stalled.add(index)
                except (zmtp.PeerClosed, OSError):
                    peer.close()
            assert good.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)  # a good client is served
            peak = max(peak, supervisor.memory_info().rss)
    finally:
        for peer in peers:
            peer.close()
    assert peak - baseline < 160 << 20, f"supervisor grew by {(peak - baseline) >> 20} MiB"
    assert daemon.process.poll() is None


# -- finding 8: limits and turns keyed on the self-chosen name ----------------------------------------
def test_rotating_client_names_does_not_escape_max_in_flight(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "clients.toml"
    policy.write_text("[default]\nmax_in_flight = 2\n")
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
    outcomes: list[str] = []

    async def burst() -> None:
        import asyncio

        async def one(name: str) -> None:
            async with AsyncClient(daemon.address, client_name=name, timeout=60, direct=False) as client:  # the front door's rule (test_worker_endpoint: the workers')
                try:
                    await client.infer("busy", SLOW)
                    outcomes.append("OK")
                except ResourceExhausted as exc:
                    assert "max_in_flight=2" in exc.message and "uid=0" in exc.message, exc.message
                    outcomes.append("RESOURCE_EXHAUSTED")

        await asyncio.gather(*(one(f"name-{i}") for i in range(6)))

    import asyncio

    asyncio.run(burst())
    assert sorted(outcomes) == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 4, outcomes


def test_rotating_client_names_takes_no_extra_turns(daemon_factory: Any, repo: Path) -> None:
    """Root floods the single-worker model with 12 slow requests under 12 names; a client of another
    uid asks once: it runs after at most a couple of them (turns go by uid), not after all 12."""
    daemon = daemon_factory(repo, env={**OPEN_TO_ALL, "OPENINFER_POOL_DIRECT": "0"})  # the supervisor's turns (a worker's: test_direct_scheduling)
    admin = daemon.client()
    finished: list[tuple[float, str]] = []
    lock = threading.Lock()

    def flood_one(i: int) -> None:
        with Client(daemon.address, client_name=f"flood-{i}", timeout=120) as client:
            client.infer("busy", SLOW)
            with lock:
                finished.append((time.monotonic(), f"flood-{i}"))

    # The other uid's process is up and connected before the count starts: its start-up (0.3-0.5 s, as
    # long as a flood request) once counted toward the flood requests served before its own.
    other = start_as(NOBODY, """
        with Client(sys.argv[1], client_name="other", timeout=120) as client:
            client.health()
            print("connected", flush=True)
            sys.stdin.readline()
            client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(400_000, np.int64)})
        print(time.monotonic(), flush=True)
    """, daemon.address)
    threads = [threading.Thread(target=flood_one, args=(i,)) for i in range(12)]
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "connected"
        for thread in threads:
            thread.start()
        wait_for(lambda: admin.status()["queued"] >= 8, 30, "the flood to queue")
        with lock:
            asked = len(finished)
            other.stdin.write("go\n")
            other.stdin.flush()
        out, err = other.communicate(timeout=180)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert other.returncode == 0, err
    other_done = float(out.strip())
    for thread in threads:
        thread.join(180)
    before_other = sum(1 for t, _ in finished[asked:] if t < other_done)
    assert before_other <= 3, f"{before_other} flood requests finished after the other uid asked and before its one was answered"


def answers_on_both_paths(daemon: Any, messages: list[list[bytes]]) -> tuple[list[dict[str, Any]], list[dict[str, Any] | None]]:
    """Each message sent raw to the front door, then each to a worker's endpoint (after a lease and an
    attach): the two lists of answers (a worker's is None when it closed the connection instead)."""
    from direct_peer import Peer, attach, lease_of

    context = zmq.Context()
    sock = dealer(context, daemon.address)
    door: list[dict[str, Any]] = []
    try:
        for frames in messages:
            sock.send_multipart(frames)
            assert sock.poll(10_000), "no reply from the front door"
            door.append(msgpack.unpackb(sock.recv_multipart()[0]))
    finally:
        sock.close()
        context.term()
    lease = lease_of(daemon)
    peer = Peer(lease["workers"][0]["address"])
    try:
        assert "error" not in (peer.ask(attach(lease["lease"])) or {"error": "closed"})
        worker = [peer.ask(frames) for frames in messages]
    finally:
        peer.close()
    return door, worker


def refused_as(answer: dict[str, Any] | None, request_id: int, words: str) -> bool:
    error = (answer or {}).get("error") or {}
    return answer is not None and answer.get("id") == request_id and error.get("code") == "INVALID_ARGUMENT" and words in error.get("message", "")


def test_a_timeout_too_long_for_the_daemons_clock_is_refused_on_both_paths(daemon_factory: Any, repo: Path) -> None:
    """`timeout_ms` 10**15 (what `Client(timeout=1e12)` sent): the deadline overflowed the supervisor's stop
    frame halfway through a dispatch - the worker was left busy with a task it never got, the client was
    answered INTERNAL, and max_compute_ms later the same request was answered a second time as the worker
    was killed (session 10's third attacker). Now it is the caller's mistake, refused before anything,
    at the front door and at a worker alike."""
    daemon = daemon_factory(repo, env={"OPENINFER_POOL_DIRECT": "1"})
    header = {"v": 1, "id": 7, "op": "infer", "model": "tiny", "timeout_ms": 10**15, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}
    door, worker = answers_on_both_paths(daemon, [[msgpack.packb(header), X.tobytes()]])
    assert refused_as(door[0], 7, "timeout_ms"), door
    assert refused_as(worker[0], 7, "timeout_ms"), worker
    with Client(daemon.address, timeout=30) as client:  # every worker still serves, none was held
        assert all(w["state"] == "ready" for w in client.status()["workers"] if w["model"] == "tiny")
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
    assert "internal error" not in daemon.log_text()


def test_a_client_label_with_terminal_escapes_is_refused_on_both_paths(daemon_factory: Any, repo: Path) -> None:
    """Any uid that may send a request names itself in `client`, and `openinfer stats` showed that label
    to the operator: OSC 2, CSI 2J and OSC 8 in it retitled the operator's window, cleared the screen and
    planted a hyperlink (attacker round 5, finding 6). A label with a control character is now the
    caller's mistake, refused before anything at the front door and at a worker alike, and counted under
    the connection's identity only: it never reaches `stats`."""
    daemon = daemon_factory(repo, env={"OPENINFER_POOL_DIRECT": "1"})
    label = "\x1b]2;PWNED\x1b\\\x1b[2J\x1b]8;;http://evil/\x1b\\x"
    header = {"v": 1, "id": 7, "op": "infer", "model": "tiny", "client": label, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}
    door, worker = answers_on_both_paths(daemon, [[msgpack.packb(header), X.tobytes()], [msgpack.packb({"v": 1, "id": 8, "op": "stats", "client": "\x9b2J"})]])
    assert refused_as(door[0], 7, "`client` must be printable") and refused_as(door[1], 8, "`client` must be printable"), f"the label was taken: {door}"
    assert refused_as(worker[0], 7, "`client` must be printable"), f"the worker took the label: {worker}"
    with Client(daemon.address, timeout=30, client_name="ops dashboard (ünïcode ok)") as client:  # printable labels still name themselves
        client.infer("tiny", {"x": X})
        labels = wait_for_clients(client, "ops dashboard (ünïcode ok)@")
    assert not any("\x1b" in name or "\x9b" in name for name in labels), labels


def wait_for_clients(client: Client, prefix: str) -> list[str]:
    """The `stats` client keys once one starts with `prefix` (a worker's counts reach the supervisor
    with its next report)."""
    seen: list[str] = []

    def found() -> bool:
        seen[:] = list(client.stats().get("clients", {}))
        return any(name.startswith(prefix) for name in seen)

    wait_for(found, 30, f"a stats row for {prefix!r}")
    return seen


def test_an_id_answered_as_it_was_admitted_may_be_used_again(daemon_factory: Any) -> None:
    """Round 32: a request whose deadline passed while the supervisor read it (a 63 KB header of ignored
    `{}` pads takes a few ms to decode; timeout_ms 1) was answered inside admission, before its id was
    marked open: marked after, the id stayed "in flight" on the connection for good - every reuse refused
    INVALID_ARGUMENT (50 of 50), one int of the supervisor's memory each, for any client. PROTOCOL.md 4.1:
    once answered, an id may be used again."""
    root = world_readable_dir("oi-attack-ids-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    (root / "tiny" / "config.toml").write_text("workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 2000\nquiet_us = 0\n")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    daemon = daemon_factory(root)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(daemon.address)
    x = np.ones((1, 64), np.float32).tobytes()

    def ask(request_id: int, timeout_ms: int, pad: bool = False) -> dict[str, Any]:
        header: dict[str, Any] = {"v": 1, "id": request_id, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}], "timeout_ms": timeout_ms}
        if pad:
            header["pad"] = [{}] * 63000
        dealer.send_multipart([msgpack.packb(header), x])
        assert dealer.poll(20000), "no reply"
        return msgpack.unpackb(dealer.recv_multipart()[0])

    try:
        for request_id in range(1000, 1008):  # a few batches: the model's batch compute is known
            assert "error" not in ask(request_id, 5000)
        expired = 0
        for request_id in range(20):
            first = ask(request_id, 1, pad=True)
            expired += first.get("error", {}).get("code") == "DEADLINE_EXCEEDED"
            again = ask(request_id, 10000)
            assert "error" not in again, (request_id, first.get("error"), again["error"])
        assert expired > 0, "no padded request expired before admission: the case was not exercised"
    finally:
        dealer.close(0)
        context.term()
        shutil.rmtree(root, ignore_errors=True)
