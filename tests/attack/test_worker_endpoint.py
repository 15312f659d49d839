"""Attacks on a worker's own endpoint (the direct path, docs/PROTOCOL.md section 17): it is hardened like
the front door, and it reads nothing but `attach` until a lease issued to the connecting uid, for its own
model version, by this daemon and not revoked, is attached."""
from __future__ import annotations

import json
import select
import shutil
import signal
import socket
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
from daemon_harness import RunningDaemon, wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from openinfer.wire import zmtp
from direct_peer import Peer, attach, busy, infer, lease_of, replies_after_a_half_close, unread_by_peer, worker_pid
from other_uid import NOBODY, start_as
from repo_builder import make_world_readable

# Leases last a minute here: these attacks are about what a worker admits, and a loaded machine can take
# longer than the default 5 s between taking a lease and the last request sent under it.
DIRECT = {"OPENINFER_POOL_DIRECT": "1", "OPENINFER_SERVER_SOCKET_MODE": "0o666", "OPENINFER_SERVER_LEASE_TTL_S": "60"}
X = np.ones((1, 64), np.float32)


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-endpoint-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    onnx_builders.matmul_model(root / "other" / "1" / "model.onnx", seed=4)
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\n")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_connections_of_one_uid_share_its_max_in_flight_on_a_worker(daemon_factory: Any, tmp_path: Path) -> None:
    """More connections (or client names) buy no more concurrency: a worker counts what it holds per
    kernel-proven uid. With max_in_flight = 2, three connections send three requests each to a worker
    that holds what it takes for 2 s (its batching delay, so that none has been answered when the last
    is read - the worker runs between its turns of reading): of the nine, two are taken and the rest are
    refused, naming the limit (a per-connection count would take six)."""
    root = world_readable_dir("oi-inflight-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    (root / "tiny" / "config.toml").write_text("workers = 1\n[batching]\nmax_batch_size = 16\nmax_queue_delay_us = 2000000\nquiet_us = 0\n")
    make_world_readable(root)
    policy = tmp_path / "clients.toml"
    policy.write_text("[default]\nmax_in_flight = 2\n")
    daemon = daemon_factory(root, env={**DIRECT, "OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
    lease = lease_of(daemon, "tiny")
    peers = [Peer(lease["workers"][0]["address"]) for _ in range(3)]
    try:
        for i, peer in enumerate(peers):
            assert "result" in peer.ask(attach(lease["lease"], 100 + i))  # type: ignore[operator]
        for p, peer in enumerate(peers, start=1):
            for k in range(3):
                peer.stream.send(infer(10 * p + k))
        answers = [header for peer in peers for header in peer.replies(3)]
    finally:
        for peer in peers:
            peer.close()
    refused = [a["error"] for a in answers if "error" in a]
    assert len(answers) - len(refused) == 2, answers
    assert all(e["code"] == "RESOURCE_EXHAUSTED" and "max_in_flight=2" in e["message"] and "uid=0" in e["message"] for e in refused), refused


def test_a_lease_for_one_model_opens_no_other_models_worker(daemon_factory: Any, repo: Path) -> None:
    """...and the refusal names no model this worker serves: anyone who may open the socket directory may
    connect and ask, grant or none (round 40: a forged 80-byte lease made each of 7 workers name its model
    and version to a uid with no grant at all)."""
    daemon = daemon_factory(repo, env=DIRECT)
    tiny, other = lease_of(daemon, "tiny"), lease_of(daemon, "other")
    peer = Peer(other["workers"][0]["address"])
    try:
        forged = peer.ask(attach(b"\0" * 80, 1))
        assert forged is not None and forged["error"]["code"] == "PERMISSION_DENIED" and "other" not in forged["error"]["message"], forged
        refused = peer.ask(attach(tiny["lease"]))
        assert refused is not None and refused["error"]["code"] == "PERMISSION_DENIED" and "other" not in refused["error"]["message"], refused
        assert peer.ask(infer(2))["error"]["code"] == "PERMISSION_DENIED"  # type: ignore[index]
        assert peer.ask(attach(other["lease"], 3))["result"]["model"] == "other"  # type: ignore[index]
        assert "outputs" in peer.ask(infer(4))  # type: ignore[operator]
    finally:
        peer.close()


def test_garbage_before_a_lease_is_struck_out(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_PEER_STRIKE_LIMIT": "3"})
    address = lease_of(daemon)["workers"][0]["address"]
    peer = Peer(address)
    try:
        answers = [peer.ask([b"\xc1 not msgpack"], timeout=5) for _ in range(3)]
        assert all(a is not None and a["error"]["code"] == "INVALID_ARGUMENT" for a in answers)
        assert peer.ask([b"\xc1 again"], timeout=5) is None  # struck out: closed
    finally:
        peer.close()
    with Client(daemon.address) as client:  # the worker itself serves on
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


def test_claimed_routing_ids_on_a_worker_endpoint_route_nothing(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    lease = lease_of(daemon)
    address = lease["workers"][0]["address"]
    context = zmq.Context()
    sockets = []
    try:
        for routing_id in [b"\x00\x6b\x8b\x45\x67", b"victim", b"\x00"] * 4:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
            sock.connect(address)
            sockets.append(sock)
        for index, sock in enumerate(sockets):
            sock.send_multipart(attach(lease["lease"], index))
        for index, sock in enumerate(sockets):  # each gets its own attach reply, nothing else
            assert sock.poll(10_000)
            assert msgpack.unpackb(sock.recv_multipart()[0])["id"] == index
            assert not sock.poll(50)
        assert daemon.process.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        context.term()


def test_a_connection_flood_on_a_worker_endpoint_leaves_it_serving(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_MAX_CONNECTIONS_PER_IDENTITY": "16"})
    with Client(daemon.address) as client:
        client.infer("tiny", {"x": X})  # its links are attached before the flood
        address = lease_of(daemon)["workers"][0]["address"]
        flood = []
        try:
            for _ in range(400):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect(address[len("ipc://") :])
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                flood.append(sock)
            for _ in range(20):
                assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
            workers = [w for w in client.status()["workers"] if w["model"] == "tiny"]
            assert all(w["state"] in ("ready", "busy") for w in workers) and daemon.process.poll() is None
        finally:
            for sock in flood:
                sock.close()


def test_a_slow_reader_on_a_worker_endpoint_cannot_grow_the_worker(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_MAX_REPLY_BACKLOG_BYTES": str(4 << 20)})
    lease = lease_of(daemon)
    address = lease["workers"][0]["address"]
    with Client(daemon.address, direct=False) as admin:
        pid = next(w["pid"] for w in admin.status()["workers"] if w["model"] == "tiny" and f"w{w['id']}.sock" in address)
    worker = psutil.Process(pid)
    before = worker.memory_info().rss
    peer = Peer(address)
    try:
        assert peer.ask(attach(lease["lease"]))["result"]  # type: ignore[index]
        big = np.ones((16384, 64), np.float32)  # 4 MiB in, 4 MiB out
        header = msgpack.packb({"v": 1, "id": 9, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [16384, 64]}]})
        for _ in range(40):  # 160 MiB of replies nobody reads
            peer.stream.send([header, big.tobytes()])
            until = time.monotonic() + 1.0
            while peer.stream.out_bytes and time.monotonic() < until:
                select.select([], [peer.stream.sock], [], 0.05)
                peer.stream.flush()
            if peer.stream.out_bytes:
                break  # the worker stopped reading for a second: what it holds now is all it takes
        grown = worker.memory_info().rss - before
        assert grown < 64 << 20, f"the worker grew by {grown >> 20} MiB"
    finally:
        peer.close()
    with Client(daemon.address) as client:
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


def _opened(peer: Peer) -> Peer:
    """The hand-shake done, so that raw bytes sent next are read as frames."""
    deadline = time.monotonic() + 10
    while not peer.stream.open:
        assert time.monotonic() < deadline, "no hand-shake from the worker"
        select.select([peer.stream.sock], [peer.stream.sock] if peer.stream.out_bytes else [], [], 0.1)
        peer.stream.flush()
        peer.stream.read()
    return peer


def _declaring(request_id: int, size: int) -> bytes:
    """An infer's header, then the head of a tensor frame that says `size` bytes follow, and 16 of them:
    18 bytes of framing that once made a worker set the whole size aside."""
    header = msgpack.packb({"v": 1, "id": request_id, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [size // 256, 64]}]})
    return bytes((zmtp.MORE, len(header))) + header + bytes((zmtp.LONG,)) + size.to_bytes(8, "big") + bytes(16)


def _announced_and_answered(peers: list[Peer], size: int) -> list[dict[str, Any]]:
    """Each peer announces a tensor of `size` bytes (_declaring, its index as the id); the one reply each gets."""
    for index, peer in enumerate(peers):
        peer.stream.sock.sendall(_declaring(index, size))
    return [peer.replies(1, timeout=10)[0] for peer in peers]


def _worker_at(daemon: RunningDaemon, address: str) -> psutil.Process:
    with Client(daemon.address, direct=False) as admin:
        return psutil.Process(next(w["pid"] for w in admin.status()["workers"] if f"w{w['id']}.sock" in address))


def _attached_peers(daemon: RunningDaemon, count: int) -> tuple[dict[str, Any], psutil.Process, list[Peer]]:
    """`count` peers on one worker of tiny, each with the same lease attached; the lease, that worker."""
    return _attached_peers_of(daemon, "tiny", count)


def _attached_peers_of(daemon: RunningDaemon, model: str, count: int) -> tuple[dict[str, Any], psutil.Process, list[Peer]]:
    lease = lease_of(daemon, model)
    address = lease["workers"][0]["address"]
    peers = [Peer(address) for _ in range(count)]
    for index, peer in enumerate(peers):
        assert peer.ask(attach(lease["lease"], 100 + index))["result"]  # type: ignore[index]
    return lease, _worker_at(daemon, address), peers


def test_frames_declared_before_a_lease_are_given_no_memory(daemon_factory: Any, repo: Path) -> None:
    """Until a lease is attached only headers are read (17.3): a peer without one that declares a 60 MB
    tensor frame is answered PERMISSION_DENIED as soon as the declaration arrives, and the worker sets
    nothing aside for it. Before, 32 such peers (18 bytes each) made the worker commit 1.9 GiB, and none
    was answered."""
    daemon = daemon_factory(repo, env=DIRECT)
    address = lease_of(daemon)["workers"][0]["address"]
    worker = _worker_at(daemon, address)
    before = worker.memory_info().rss
    peers = [_opened(Peer(address)) for _ in range(24)]
    try:
        answers = _announced_and_answered(peers, 60 << 20)
        grown = worker.memory_info().rss - before
    finally:
        for peer in peers:
            peer.close()
    assert [a["id"] for a in answers] == list(range(24)), answers
    assert all(a["error"]["code"] == "PERMISSION_DENIED" and "attach a lease first" in a["error"]["message"] for a in answers), answers[0]
    assert grown < 64 << 20, f"the worker grew by {grown >> 20} MiB"
    with Client(daemon.address) as client:
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


def test_a_frame_declared_and_never_sent_costs_a_worker_no_memory(daemon_factory: Any, repo: Path) -> None:
    """A client with a lease may send a 60 MB tensor; one that only declares it (and holds its
    connections open) costs the worker what it sent, not what it declared: a frame's room is committed
    as its bytes land. Before, 12 such connections made the worker commit 720 MiB."""
    daemon = daemon_factory(repo, env=DIRECT)
    _, worker, peers = _attached_peers(daemon, 12)
    try:
        before = worker.memory_info().rss
        for index, peer in enumerate(peers):
            peer.stream.sock.sendall(_declaring(index, 60 << 20))
        wait_for(lambda: all(unread_by_peer(peer.stream.sock) == 0 for peer in peers), 10, "the worker to read every declaration")
        grown = worker.memory_info().rss - before
        assert grown < 64 << 20, f"the worker grew by {grown >> 20} MiB"
    finally:
        for peer in peers:
            peer.close()
    with Client(daemon.address) as client:
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


def test_revoked_access_stops_the_direct_path_at_the_reload(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    """A client of uid 65534 uses the direct path; the operator removes its infer grant and reloads: its
    next request is refused (the reload revoked every lease; the renewal is denied), though its worker
    connections stay open."""
    policy = tmp_path / "access.toml"
    everything = '["infer", "cancel", "models", "metadata", "health", "status", "stats", "reload"]'
    policy.write_text(f'[[grant]]\nname = "root"\nuids = [0]\noperations = {everything}\n\n[[grant]]\nname = "nobody"\nuids = [{NOBODY}]\noperations = ["infer", "health"]\n')
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_ACCESS_POLICY": str(policy)})
    proc = start_as(NOBODY, """
        with Client(sys.argv[1], timeout=10) as client:
            client.infer("tiny", {"x": np.ones((1, 64), np.float32)})
            print("served", flush=True)
            sys.stdin.readline()
            try:
                client.infer("tiny", {"x": np.ones((1, 64), np.float32)})
                print("served again")
            except OpenInferError as exc:
                print(exc.code)
    """, daemon.address)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "served"
        policy.write_text(f'[[grant]]\nname = "root"\nuids = [0]\noperations = {everything}\n\n[[grant]]\nname = "nobody"\nuids = [{NOBODY}]\noperations = ["health"]\n')
        before = daemon.log_text().count('"repository synced"')
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.log_text().count('"repository synced"') > before, 20, "the reload", daemon=daemon)
    finally:
        out, err = proc.communicate("go\n", timeout=60)
    assert out.strip().splitlines()[-1] == "PERMISSION_DENIED", (out, err)


CONNECT_AND_CLOSE = """
import socket, sys
for _ in range(5):
    for path in sys.argv[1:]:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError:
                pass
            s.close()
    for path in sys.argv[1:]:  # the worker has accepted everything before this: its greeting comes
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(10)
        try:
            probe.connect(path)
            probe.recv(10)
        except OSError:
            pass  # a worker the attack took down: the test sees it
        probe.close()
print("done", flush=True)
"""


def test_a_peer_that_connects_and_closes_at_once_costs_the_workers_nothing(daemon_factory: Any, repo: Path) -> None:
    """The worker's greeting failed on a connection already closed, and the exception ended the worker
    (exit 3, PeerClosed): any local uid allowed to open the socket, without a lease, killed every worker."""
    daemon = daemon_factory(repo, env=DIRECT)
    addresses = [w["address"][len("ipc://") :] for w in lease_of(daemon)["workers"]]
    with Client(daemon.address, direct=False) as admin:
        before = {w["pid"] for w in admin.status()["workers"]}
    attacker = start_as(NOBODY, CONNECT_AND_CLOSE, *addresses)
    out, err = attacker.communicate(timeout=60)
    assert out.strip() == "done", err
    with Client(daemon.address) as client:
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
        assert {w["pid"] for w in client.status()["workers"]} == before  # not one replaced
    assert "PeerClosed" not in daemon.log_text()


def test_requests_before_a_lease_are_struck_out(daemon_factory: Any, repo: Path) -> None:
    """A peer without a lease pipelining infer was answered PERMISSION_DENIED for ever, each answer a
    ledger record the supervisor reads: now they count as strikes, and the connection is closed."""
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_PEER_STRIKE_LIMIT": "3"})
    peer = Peer(lease_of(daemon)["workers"][0]["address"])
    try:
        answers = [peer.ask(infer(index), timeout=5) for index in range(3)]
        assert all(a is not None and a["error"]["code"] == "PERMISSION_DENIED" for a in answers), answers
        assert peer.ask(infer(9), timeout=5) is None  # struck out: closed
    finally:
        peer.close()


@pytest.mark.parametrize("label", ["a@b", "x@uid=0", "€" * 32, "é" * 44 + "a" * 20])
def test_a_client_label_cannot_get_a_worker_retired_or_counted_under_another_uid(daemon_factory: Any, repo: Path, label: str) -> None:
    """Labels with "@", and labels whose UTF-8 is longer than a ledger slot, made the worker write a key
    the supervisor refused (the worker was killed) or one cut into the uid ("...@uid=6" for uid 65534)."""
    daemon = daemon_factory(repo, env=DIRECT)
    with Client(daemon.address, direct=False) as admin:
        before = {w["pid"] for w in admin.status()["workers"]}
    with Client(daemon.address, client_name=label) as client:
        for _ in range(3):
            assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
    with Client(daemon.address, direct=False) as admin:
        stats = admin.stats()
        assert {w["pid"] for w in admin.status()["workers"]} == before
    keys = [key for key in stats["clients"] if key != "uid=0"]
    assert len(keys) == 1 and keys[0].endswith("@uid=0") and keys[0].startswith(label[:8]), keys
    assert stats["clients"][keys[0]]["requests"] == 3
    assert "ledger:" not in daemon.log_text()


def test_a_ping_flood_without_reading_leaves_the_worker_serving(daemon_factory: Any, repo: Path) -> None:
    """80,000 ZMTP PINGs (703 KiB) from a peer without a lease that never reads: a peer may send a burst
    of 4,096 commands and then 100 a second, so the worker cuts it, and it answers a PING only while
    little waits for that peer. Before, it queued every PONG and copied its whole outbox for each: its
    loop stalled until the supervisor killed it as unresponsive (and with the PONGs bounded but not the
    PINGs, one such peer kept it at 97 % CPU for as long as it sent)."""
    daemon = daemon_factory(repo, env=DIRECT)
    address = lease_of(daemon)["workers"][0]["address"]
    worker = _worker_at(daemon, address)
    peer = _opened(Peer(address))
    sock = peer.stream.sock
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(True)
        sock.settimeout(30)
        with pytest.raises(OSError):  # EPIPE or a reset: the worker cut the connection
            for _ in range(100):
                sock.sendall((bytes((zmtp.COMMAND, 7)) + b"\x04PING\x00\x00") * 8_000)
        with Client(daemon.address) as client:
            for _ in range(20):
                assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
    finally:
        peer.close()
    assert worker.is_running() and worker.pid == _worker_at(daemon, address).pid, "the worker was replaced"


def test_idle_connections_of_one_uid_leave_a_worker_room_for_others(daemon_factory: Any, repo: Path) -> None:
    """uid 65534 opens 60 connections to a worker and never attaches: it gets at most three quarters of
    what the worker's open-file limit leaves for connections, and root's client is served there directly.
    Before, the caps (128 per worker, 64 per uid) were above the worker's limit of 64 descriptors: the
    idle connections took them all, accept failed with EMFILE, and root's request failed after waiting
    its whole timeout for a handshake."""
    daemon = daemon_factory(repo, env=DIRECT)
    address = lease_of(daemon)["workers"][0]["address"]
    attacker = start_as(NOBODY, """
        import select  # (loaded already, by openinfer.client: readable after the drop)
        peers = []
        for _ in range(60):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sys.argv[1][len("ipc://"):])
            s.setblocking(False)
            peers.append(zmtp.FrameStream(s, zmtp.Limits(), handshake=True, socket_type=b"DEALER", accept_types=frozenset({b"ROUTER"})))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(p.open or p.closed for p in peers):
            for p in peers:
                if not p.closed:
                    try:
                        p.flush()
                        p.read()
                    except (zmtp.PeerClosed, zmtp.ProtocolError):
                        p.close()
            waiting = [p for p in peers if not p.closed and not p.open]
            select.select([p.sock for p in waiting], [p.sock for p in waiting if p.out_bytes], [], 0.1)  # the worker's next answer
        print(sum(p.open and not p.closed for p in peers), flush=True)
        sys.stdin.readline()
    """, address)
    try:
        assert attacker.stdout is not None
        held = int(attacker.stdout.readline())
        assert 0 < held < 60, held
        with Client(daemon.address, timeout=5) as client:
            result = client.infer("tiny", {"x": X})
        assert "dispatch_us" not in result.timing, "served through the front door, not by the worker"
    finally:
        attacker.communicate("done\n", timeout=30)


def test_unfinished_requests_cannot_fill_a_workers_address_space(daemon_factory: Any, repo: Path) -> None:
    """33 leased connections each announce a 128 MiB tensor (server.max_request_bytes = 128 MiB) and
    never send it: past the worker's budget for unfinished requests (a quarter of its memory limit, half
    of that per uid) the largest holders are closed, and the worker goes on. Before, the announcements
    filled its 4 GiB address space; its next allocation failed and it exited, with every request it held."""
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_MAX_REQUEST_BYTES": str(128 << 20)})
    lease, worker, peers = _attached_peers(daemon, 33)
    address = lease["workers"][0]["address"]
    try:
        for index, peer in enumerate(peers):
            if not peer.stream.closed:
                try:
                    peer.stream.sock.sendall(_declaring(index, 128 << 20))
                except OSError:  # closed by the worker meanwhile
                    pass
        wait_for(lambda: all(unread_by_peer(peer.stream.sock) == 0 for peer in peers if not peer.stream.closed), 10, "the worker to read every announcement")
        with Client(daemon.address) as client:
            assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
        assert worker.memory_info().vms < 3 << 30, f"the worker reserved {worker.memory_info().vms >> 20} MiB"
    finally:
        for peer in peers:
            peer.close()
    assert worker.is_running() and worker.pid == _worker_at(daemon, address).pid, "the worker was replaced"
    assert "its unfinished request holds too much" in daemon.log_text()


def test_a_revoked_lease_puts_a_connection_back_under_header_limits_at_once(daemon_factory: Any, repo: Path) -> None:
    """After a reload revokes every lease, a connection that attached one is read as one without: a
    60 MiB tensor it announces next is answered PERMISSION_DENIED (lease expired) at once and given no
    room. Before, the limits switched back only after its next message was judged, so 19 connections
    each reserved 60 MiB first, and the announcement was never answered."""
    daemon = daemon_factory(repo, env=DIRECT)
    lease, worker, peers = _attached_peers(daemon, 8)
    try:
        with Client(daemon.address, direct=False) as admin:
            admin.reload()
        wait_for(lambda: _renewed(daemon, lease), 20, "the reload to rotate the lease key", daemon=daemon)
        before = worker.memory_info().vms
        answers = _announced_and_answered(peers, 60 << 20)
        grown = worker.memory_info().vms - before
    finally:
        for peer in peers:
            peer.close()
    assert all(a["error"]["code"] == "PERMISSION_DENIED" and a["error"].get("details") == {"lease": "expired"} for a in answers), answers[0]
    assert grown < 64 << 20, f"the worker reserved {grown >> 20} MiB"


def _renewed(daemon: RunningDaemon, old: dict[str, Any]) -> bool:
    """Whether the worker refuses the old lease (the reload's new key has reached it)."""
    peer = Peer(old["workers"][0]["address"])
    try:
        answer = peer.ask(attach(old["lease"], 1), timeout=5)
        return answer is not None and "error" in answer
    finally:
        peer.close()


def test_an_endless_chain_of_empty_frames_is_cut(daemon_factory: Any, repo: Path) -> None:
    """A message of empty frames, each flagged MORE, from a peer without a lease: skipping a frame costs
    SKIPPED_FRAME_COST against the skip budget, so the worker closes the connection within 262,144 frames.
    Before, empty frames cost nothing: the chain was read for as long as it was sent, at 100 % CPU."""
    daemon = daemon_factory(repo, env=DIRECT)
    address = lease_of(daemon)["workers"][0]["address"]
    peer = _opened(Peer(address))
    sock = peer.stream.sock
    sock.setblocking(True)
    sock.settimeout(20)
    try:
        with pytest.raises(OSError):  # EPIPE or a reset once the worker has closed it
            for _ in range(64):  # 8 Mi empty frames at most, 16 MiB
                sock.sendall(b"\x01\x00" * (1 << 17))
    finally:
        peer.close()
    with Client(daemon.address) as client:
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


@pytest.fixture(scope="module")
def one_worker_repo() -> Iterator[Path]:
    """tiny with one worker, so that every connection of these attacks meets the same worker; `small`,
    the same with a 1 GiB memory limit (its worker's address space); `waiting`, with 2 GiB and a batch
    delay of 2 s, so that requests it has read wait in its queue."""
    root = world_readable_dir("oi-endpoint-one-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    (root / "tiny" / "config.toml").write_text("workers = 1\n")
    onnx_builders.matmul_model(root / "small" / "1" / "model.onnx")
    (root / "small" / "config.toml").write_text("workers = 1\nmemory_limit_mb = 1024\n")
    onnx_builders.matmul_model(root / "waiting" / "1" / "model.onnx")  # requests wait 2 s in its queue for company
    (root / "waiting" / "config.toml").write_text("workers = 1\nmemory_limit_mb = 2048\n\n[batching]\nmax_batch_size = 1048576\nmax_queue_delay_us = 2000000\nquiet_us = 0\n")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_large_requests_of_one_uid_at_once_are_all_served(daemon_factory: Any, one_worker_repo: Path) -> None:
    """Ten clients of one uid send a 60 MiB tensor each at the same moment to one worker: uploads that are
    moving are never cut for the room they hold. The first form of the held-bytes budget closed the
    largest holders of a uid past 512 MiB, so honest concurrent uploads failed WORKER_CRASHED."""
    daemon = daemon_factory(one_worker_repo, env=DIRECT)
    x = np.ones((245_760, 64), np.float32)  # 60 MiB
    start = threading.Barrier(10)
    outcomes: list[Any] = []

    def one() -> None:
        with Client(daemon.address, timeout=60) as client:
            client.infer("tiny", {"x": X})  # lease and link first, so that the large ones go at once
            start.wait()
            try:
                outcomes.append(client.infer("tiny", {"x": x}).outputs["y"].shape)
            except OpenInferError as exc:
                outcomes.append(exc.code)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcomes == [(245_760, 64)] * 10, outcomes


# As another uid: only what the prelude of other_uid imported before it dropped its rights is readable.
ATTACHED_IDLE = """
import select  # (loaded already, by openinfer.client: readable after the drop)
with Client(sys.argv[1], direct=False) as admin:
    lease = admin._call("lease", model="tiny")
path = lease["workers"][0]["address"][len("ipc://"):]
streams = []
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    stream = zmtp.FrameStream(s, zmtp.Limits(), handshake=True, socket_type=b"DEALER", accept_types=frozenset({b"ROUTER"}))
    stream.send([msgpack.packb({"v": 1, "id": i, "op": "attach", "lease": lease["lease"]})])
    streams.append(stream)
attached = set()
deadline = time.monotonic() + 10
while len(attached) < len(streams) and time.monotonic() < deadline:
    for i, stream in enumerate(streams):
        if i not in attached and not stream.closed:
            try:
                stream.flush()
                if any("result" in msgpack.unpackb(event[0]) for event in stream.read() if isinstance(event, list)):
                    attached.add(i)
            except (zmtp.PeerClosed, zmtp.ProtocolError):
                stream.close()
    waiting = [stream for i, stream in enumerate(streams) if i not in attached and not stream.closed]
    select.select([w.sock for w in waiting], [w.sock for w in waiting if w.out_bytes], [], 0.1)  # the worker's next answer
if sys.argv[3:] == ["pending"]:  # then keep each connection "busy": the first byte of a frame that never ends
    for stream in streams:
        stream.sock.send(bytes((zmtp.LONG,)))
if sys.argv[3:] == ["unread"]:  # or with a reply it never reads (512 KiB: more than the socket holds)
    rows = np.ones((2048, 64), np.float32).tobytes()
    for i, stream in enumerate(streams):
        stream.send([msgpack.packb({"v": 1, "id": 100 + i, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2048, 64]}]}), rows])
        while stream.out_bytes:
            select.select([], [stream.sock], [], 1)
            stream.flush()
print(len(attached), flush=True)
sys.stdin.readline()
goaways = 0
for stream in streams:  # what each connection got before its close: a GOAWAY, when it was closed for room
    try:
        goaways += any(msgpack.unpackb(event[0]).get("goaway") for event in stream.read() if isinstance(event, list))
    except (zmtp.PeerClosed, zmtp.ProtocolError):
        pass
print(goaways, flush=True)
"""


@pytest.mark.parametrize("mode", ["idle", "pending", "unread"], ids=["idle", "a-byte-pending", "replies-unread"])
def test_two_uids_holding_every_slot_of_a_worker_leave_room_for_a_third(daemon_factory: Any, one_worker_repo: Path, mode: str) -> None:
    """uid 65534 attaches 36 connections to a worker and uid 65533 the remaining 12, and both idle (or
    keep the first byte of a frame pending on each, or leave a reply unread on each, to look busy): a
    client of a third uid still gets a connection. The oldest idle connection of the uid holding the most
    is closed for it, after a GOAWAY, so that its client sends elsewhere what it sends meanwhile instead
    of taking the close for a crash. Before, a full worker stopped accepting, and root's request waited
    out its timeout; then a pending byte kept a connection from counting as idle, and the close came
    without a GOAWAY; then (round 17) bytes waiting to be sent - a reply, or PONGs, never read - made a
    connection look busy for good."""
    daemon = daemon_factory(one_worker_repo, env=DIRECT)
    extra = (mode,) if mode != "idle" else ()
    holders = [start_as(NOBODY, ATTACHED_IDLE, daemon.address, "36", *extra), start_as(NOBODY - 1, ATTACHED_IDLE, daemon.address, "12", *extra)]
    try:
        held = [int(holder.stdout.readline()) for holder in holders]  # type: ignore[union-attr]
        assert held == [36, 12], held
        deadline = time.monotonic() + 15
        while True:  # a pending byte counts as idle once it has not moved for a second
            with Client(daemon.address, timeout=5) as client:
                result = client.infer("tiny", {"x": X})
            if "dispatch_us" not in result.timing or time.monotonic() > deadline:
                break
        assert "dispatch_us" not in result.timing, "served through the front door, not by the worker"
    finally:
        goaways = [int(holder.communicate("done\n", timeout=30)[0].split()[-1]) for holder in holders]
    assert "to make room for another identity" in daemon.log_text()
    if mode != "unread":  # (behind a reply never read, a GOAWAY cannot reach its reader either)
        assert goaways[0] >= 1, goaways


def test_a_new_connection_gets_a_small_burst_of_commands(daemon_factory: Any, repo: Path) -> None:
    """A new connection may send 64 commands at once (then 100 a second): 200 PINGs in one write get it
    cut. With a burst of 4,096, 47 connections reconnecting every 2 s kept a worker at 100 % CPU."""
    daemon = daemon_factory(repo, env=DIRECT)
    peer = _opened(Peer(lease_of(daemon)["workers"][0]["address"]))
    sock = peer.stream.sock
    try:
        sock.sendall((bytes((zmtp.COMMAND, 7)) + b"\x04PING\x00\x00") * 200)
        sock.settimeout(10)
        sock.setblocking(True)
        received = b""
        while chunk := sock.recv(65536):  # PONGs for the first 64 at most, then the close
            received += chunk
    finally:
        peer.close()
    assert received.count(b"\x04PONG") <= 64, received.count(b"\x04PONG")


def test_replies_nobody_reads_cannot_fill_a_workers_memory(daemon_factory: Any, one_worker_repo: Path) -> None:
    """20 leased connections send two 16 MiB requests each to a worker whose memory limit is 1 GiB and
    never read a reply: each connection stays within its own backlog, but past a quarter of the worker's
    limit in all, the connections holding the most unread replies are closed. Before, the replies filled
    its address space, and another client's 16 MiB request could not be served."""
    daemon = daemon_factory(one_worker_repo, env=DIRECT)
    lease = lease_of(daemon, "small")
    address = lease["workers"][0]["address"]
    worker = _worker_at(daemon, address)
    peers = [Peer(address) for _ in range(20)]
    big = np.ones((65_536, 64), np.float32)  # 16 MiB
    header = {"v": 1, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [65_536, 64]}]}
    try:
        for index, peer in enumerate(peers):
            assert peer.ask(attach(lease["lease"], 100 + index))["result"]  # type: ignore[index]
            peer.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for index, peer in enumerate(peers):
            for k in range(2):
                peer.stream.send([msgpack.packb({**header, "id": 2 * index + k}), big.tobytes()])

        def pushed_until_a_close() -> bool:
            """Send on, as the worker reads; whether it has closed a connection for its unread replies."""
            for peer in peers:
                if peer.stream.out_bytes and not peer.stream.closed:
                    try:
                        peer.stream.flush()
                    except zmtp.PeerClosed:
                        peer.stream.close()
            return "replies it does not read hold too much" in daemon.log_text()

        wait_for(pushed_until_a_close, 60, "a connection closed for its unread replies", daemon=daemon)
        with Client(daemon.address, timeout=30) as client:
            assert client.infer("small", {"x": big}).outputs["y"].shape == (65_536, 64)
    finally:
        for peer in peers:
            peer.close()
    # It never died for it: it serves on, or - holding most of its address space after the burst - was
    # drained and replaced between requests (recycling.py), which fails nothing.
    exits = [json.loads(line) for line in daemon.log_text().splitlines() if '"msg":"worker exited"' in line]
    assert all(entry["reason"].startswith("recycled:") for entry in exits if entry.get("pid") == worker.pid), exits


def test_requests_waiting_in_a_workers_queue_are_bounded_too(daemon_factory: Any, one_worker_repo: Path) -> None:
    """56 requests of 8 MiB, all read and waiting in the queue of a worker whose memory limit is 2 GiB:
    the worker takes at most three quarters of its soft budget (a quarter of that limit) from one uid,
    48 of them, and answers the rest RESOURCE_EXHAUSTED at once. Before, only max_in_flight (256) bounded
    them: one uid topping up 30 connections with 60 MiB requests filled a 4 GiB worker, which died."""
    daemon = daemon_factory(one_worker_repo, env=DIRECT)
    lease, _, peers = _attached_peers_of(daemon, "waiting", 1)
    peer = peers[0]
    x = np.ones((32_768, 64), np.float32).tobytes()  # 8 MiB
    header = {"v": 1, "op": "infer", "inputs": [{"name": "x", "datatype": "FP32", "shape": [32_768, 64]}]}
    try:
        for index in range(56):
            peer.stream.send([msgpack.packb({**header, "id": index}), x])
        answers = peer.replies(56, timeout=60)
    finally:
        peer.close()
    refused = [a for a in answers if "error" in a]
    assert len(answers) - len(refused) == 48, [a.get("error") for a in answers]
    assert all(a["error"]["code"] == "RESOURCE_EXHAUSTED" and "waiting or running" in a["error"]["message"] for a in refused), refused[0]


def test_requests_sent_before_the_client_shuts_its_sending_side_are_all_answered(daemon_factory: Any, repo: Path) -> None:
    """Round 56: a client pipelined its infers and shut its sending side (shutdown(SHUT_WR)), reading on;
    the worker read the end of the stream, closed the connection at once, and the requests it had taken
    and queued were answered to nobody (104 replies of 200). Each is answered now, then the worker closes."""
    daemon = daemon_factory(repo, env=DIRECT)
    lease = lease_of(daemon, "busy")
    peer = Peer(lease["workers"][0]["address"])
    try:
        assert "result" in peer.ask(attach(lease["lease"]))  # type: ignore[operator]
        peer.send_all([busy(request_id, 300_000 if request_id == 2 else 1) for request_id in range(2, 62)])  # the first holds the worker while the rest queue behind it
        peer.stream.sock.shutdown(socket.SHUT_WR)
        replies = peer.replies_until_closed(60)  # the worker closes it after its last reply
    finally:
        peer.close()
    assert sorted(reply["id"] for reply in replies) == list(range(2, 62)), [reply["id"] for reply in replies]
    assert all("outputs" in reply for reply in replies), [reply for reply in replies if "outputs" not in reply][:3]


def test_replies_waiting_to_be_written_when_the_client_shuts_its_sending_side_are_written(daemon_factory: Any, repo: Path) -> None:
    """Round 58, on round 56's fix: the requests were all answered, but their replies (256 KiB each, more
    than the socket takes) waited in the worker's outbox, unread, when the client shut its sending side;
    the worker closed the connection at the end of the stream, with nothing left to answer, and the
    replies were lost (0 of 10). It writes them first now."""
    daemon = daemon_factory(repo, env=DIRECT)
    lease = lease_of(daemon, "tiny")
    peer = Peer(lease["workers"][0]["address"])
    try:
        assert "result" in peer.ask(attach(lease["lease"]))  # type: ignore[operator]
        replies = replies_after_a_half_close(daemon, peer, range(2, 12))
    finally:
        peer.close()
    assert sorted(reply["id"] for reply in replies) == list(range(2, 12)) and all("outputs" in reply for reply in replies), [r.get("id") for r in replies]


def test_requests_sent_before_a_connection_is_struck_out_are_answered(daemon_factory: Any, repo: Path) -> None:
    """Round 58's suspicion: a connection over the strike limit was closed once the replies already queued
    were written, and the requests it had sent before its last strike, still queued or running, were
    answered to nobody. It is read no more, and closed once those are answered and written."""
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_PEER_STRIKE_LIMIT": "3"})
    lease = lease_of(daemon, "busy")
    peer = Peer(lease["workers"][0]["address"])
    try:
        assert "result" in peer.ask(attach(lease["lease"]))  # type: ignore[operator]
        good = [busy(request_id, 300_000 if request_id == 2 else 1) for request_id in range(2, 12)]  # the first holds the worker
        peer.send_all(good + [[b"\xc1"]] * 3 + [busy(99, 1)])  # three undecodable headers: struck out; 99 is never read
        replies = peer.replies_until_closed(60)
    finally:
        peer.close()
    answered = sorted(reply["id"] for reply in replies if "outputs" in reply)
    assert answered == list(range(2, 12)), [(reply.get("id"), reply.get("error")) for reply in replies]
    assert [reply["error"]["code"] for reply in replies if "outputs" not in reply] == ["INVALID_ARGUMENT"] * 3
