"""A client's short timeout never costs a worker, even for a run the worker cannot stop.

onnxruntime's terminate flag stops most runs at their deadline (tests/attack/test_front_door_deadlines.py),
but not a step's own Python loop, nor one kernel that never checks the flag. The daemon used to kill the
worker of such a run half a second past the *client's* deadline: a client that could make one run last
longer than its timeout had the model's workers killed and reloaded at will, one per request. Now the
request is answered DEADLINE_EXCEEDED and the run goes on; only the operator's bound, the model's
`max_compute_ms`, gets the worker killed. And the client's in-flight slot stays taken until the run ends,
so short timeouts do not let it keep more workers busy than its `max_in_flight`.

Every test here fails on the code before the change (the worker's pid changes at each attack; the
second request of the slot test is accepted). The last two also guard what an attacker found in a first
form of the change: a copy of a pipelined request left to run for nobody (and tasks answered twice), and
another client's slot held for as long as a direct run it only waited behind."""
from __future__ import annotations

import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

import onnx_builders
from daemon_harness import wait_for
from openinfer.client import Client, DeadlineExceeded, OpenInferError
from openinfer.wire.protocol import encode_infer_request, unpack
from other_uid import NOBODY, run_as, start_as
from repo_builder import ModelRepo

pytestmark = pytest.mark.attack

QUICK = {"seconds": np.array(0.0, np.float32)}
MAX_COMPUTE_MS = 20_000  # the operator's bound: far above every run here


def _spin_repo(workers: int) -> Path:
    models = ModelRepo("oi-unstoppable-")
    models.spinning_model("spin", f"workers = {workers}\nmax_compute_ms = {MAX_COMPUTE_MS}\n")  # its step spins for `seconds`
    return models.ready()


@pytest.fixture
def one_worker() -> Iterator[Path]:
    root = _spin_repo(1)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def two_workers() -> Iterator[Path]:
    root = _spin_repo(2)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _pids(client: Client, model: str = "spin") -> list[int]:
    return sorted(w["pid"] for w in client.status()["workers"] if w["model"] == model)


def test_a_front_door_client_waits_for_the_daemons_own_answer_on_a_run_that_cannot_be_stopped(daemon_factory: Any, one_worker: Path) -> None:
    """The daemon answers such a run half a second past its deadline, saying where the time went; the
    Python client's least slack was 50 ms, so it gave up first with a bare "no reply" while the request
    still held its slot (session 10's attacker). It now waits at least 600 ms for the daemon's word."""
    daemon = daemon_factory(one_worker, env={"OPENINFER_POOL_DIRECT": "0"})
    with Client(daemon.address, timeout=30, direct=False) as client:
        with pytest.raises(DeadlineExceeded, match="past its deadline, in a run its worker cannot stop"):
            client.infer("spin", {"seconds": np.array(1.5, np.float32)}, timeout=0.2)
        assert client.infer("spin", QUICK).outputs["y"].shape == (1, 64)


@pytest.mark.parametrize("direct", [False, True], ids=["front-door", "direct"])
def test_a_short_timeout_on_a_run_that_cannot_be_stopped_costs_no_worker(daemon_factory: Any, one_worker: Path, direct: bool) -> None:
    """Three requests whose step spins 1.5 s, each with a 200 ms timeout and followed by an ordinary
    request: each is answered DEADLINE_EXCEEDED, the ordinary one is served after the spin ends, and the
    worker process is the same throughout."""
    daemon = daemon_factory(one_worker, env={"OPENINFER_POOL_DIRECT": "1" if direct else "0"})
    with Client(daemon.address, timeout=30, direct=direct) as client:
        before = _pids(client)
        for _ in range(3):
            with pytest.raises(DeadlineExceeded):
                client.infer("spin", {"seconds": np.array(1.5, np.float32)}, timeout=0.2)
            assert client.infer("spin", QUICK).outputs["y"].shape == (1, 64)
            assert _pids(client) == before
    log = daemon.log_text()
    assert "killing the worker" not in log
    if not direct:  # the daemon answered each half a second past its deadline, and said why
        assert log.count("the tasks past theirs were answered and the run goes on") == 3, log[-3000:]


def test_a_run_answered_past_its_deadline_keeps_its_clients_slot_until_it_ends(daemon_factory: Any, two_workers: Path, tmp_path: Path) -> None:
    """max_in_flight = 1, two workers. A request whose step spins 5 s is answered DEADLINE_EXCEEDED
    half a second past its 200 ms timeout while it runs on; the client's next request is refused with
    the limit (otherwise each short timeout would buy one more busy worker) until the run ends, then
    served."""
    policy = tmp_path / "clients.toml"
    policy.write_text("[default]\nmax_in_flight = 1\n")
    daemon = daemon_factory(two_workers, env={"OPENINFER_POOL_DIRECT": "0", "OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
    with Client(daemon.address, timeout=30, direct=False) as client:
        with pytest.raises(DeadlineExceeded):
            client.infer("spin", {"seconds": np.array(5.0, np.float32)}, timeout=0.2)
        # The client gave up at once; the daemon answers half a second past the deadline.
        wait_for(lambda: client.stats()["models"]["spin"]["failures"].get("DEADLINE_EXCEEDED") == 1, 10, "the daemon's answer", daemon=daemon)
        with pytest.raises(OpenInferError) as refused:
            client.infer("spin", QUICK)
        assert refused.value.code == "RESOURCE_EXHAUSTED" and "max_in_flight=1" in refused.value.message, refused.value
        assert any(w.get("stalled") for w in client.status()["workers"]), "the spinning worker is reported stalled"

        def served() -> bool:
            try:
                return client.infer("spin", QUICK).outputs["y"].shape == (1, 64)
            except OpenInferError as exc:
                assert exc.code == "RESOURCE_EXHAUSTED", exc
                return False

        wait_for(served, 30, "the slot freed when the spin ends", daemon=daemon)
        assert not any(w.get("stalled") for w in client.status()["workers"])
        assert client.stats()["models"]["spin"]["failures"]["DEADLINE_EXCEEDED"] == 1  # (and a refusal per poll)
    assert "killing the worker" not in daemon.log_text()


def _reply(sock: zmq.Socket, timeout_s: float = 15.0) -> dict[str, Any]:  # type: ignore[type-arg]
    assert sock.poll(int(timeout_s * 1000)), "no answer at all"  # a hang guard, not a speed figure
    return unpack(sock.recv_multipart()[0])


def test_a_request_pipelined_behind_a_run_that_cannot_be_stopped_is_answered_once_and_never_runs(daemon_factory: Any, one_worker: Path) -> None:
    """The model's runs are short, so the supervisor pipelines: S2 waits inside the worker behind S1; both
    spin 4 s and have 200 ms timeouts. Each is answered DEADLINE_EXCEEDED once, by the daemon. S2 never
    runs (the worker skips a task whose deadline passed before it could start), so a request sent
    meanwhile with a 5.5 s timeout is served when S1's spin ends, not after a second spin of 4 s; and the
    worker is kept."""
    daemon = daemon_factory(one_worker, env={"OPENINFER_POOL_DIRECT": "0"})
    spin = {"seconds": np.array(4.0, np.float32)}
    with Client(daemon.address, timeout=30, direct=False) as admin, zmq.Context() as context:
        for _ in range(20):  # short runs: the supervisor pipelines the model's tasks
            admin.infer("spin", QUICK)
        before = _pids(admin)
        with context.socket(zmq.DEALER) as attacker, context.socket(zmq.DEALER) as victim:
            attacker.connect(daemon.address)
            victim.connect(daemon.address)
            attacker.send_multipart(encode_infer_request(1, "spin", spin, timeout_ms=200))
            attacker.send_multipart(encode_infer_request(2, "spin", spin, timeout_ms=200))
            answers = {reply["id"]: reply["error"] for reply in (_reply(attacker), _reply(attacker))}
            assert answers[1]["code"] == answers[2]["code"] == "DEADLINE_EXCEEDED", answers
            assert "the run goes on" in answers[1]["message"] and "it never started" in answers[2]["message"], answers
            victim.send_multipart(encode_infer_request(3, "spin", QUICK, timeout_ms=5500))
            served = _reply(victim)
            assert served["id"] == 3 and "error" not in served, served
        assert _pids(admin) == before
        stats = admin.stats()["models"]["spin"]
        assert stats["requests"] == 23 and stats["failures"] == {"DEADLINE_EXCEEDED": 2}, stats  # one answer each
    assert "killing the worker" not in daemon.log_text()


def test_a_direct_run_past_its_deadline_holds_no_other_clients_slot(daemon_factory: Any, one_worker: Path, tmp_path: Path) -> None:
    """max_in_flight = 1. Root's direct request spins 8 s with a 200 ms timeout: its worker runs on,
    unseen by the supervisor, which gives it a front-door request of uid 65534 (1 s timeout). That request
    only waited behind another client's run: it is answered DEADLINE_EXCEEDED ("never started") and its
    slot is free at once, so uid 65534's next request is taken, not refused RESOURCE_EXHAUSTED for as long
    as root's run lasts (up to max_compute_ms)."""
    policy = tmp_path / "clients.toml"
    policy.write_text("[default]\nmax_in_flight = 1\n")
    env = {"OPENINFER_POOL_DIRECT": "1", "OPENINFER_SERVER_SOCKET_MODE": "0o666", "OPENINFER_SERVER_LEASE_TTL_S": "60", "OPENINFER_SERVER_CLIENT_POLICY": str(policy)}
    daemon = daemon_factory(one_worker, env=env)
    with Client(daemon.address, timeout=30, direct=True) as attacker:
        attacker.infer("spin", QUICK)  # its lease and worker connection first
        with pytest.raises(DeadlineExceeded):
            attacker.infer("spin", {"seconds": np.array(8.0, np.float32)}, timeout=0.2)
        victim = run_as(NOBODY, """
            from openinfer.wire.protocol import encode_infer_request, unpack
            context = zmq.Context()
            sock = context.socket(zmq.DEALER)
            sock.connect(sys.argv[1])
            answers = []
            for request_id in (1, 2):
                sock.send_multipart(encode_infer_request(request_id, "spin", {"seconds": np.array(0.0, np.float32)}, timeout_ms=1000))
                assert sock.poll(10_000), "no answer at all"
                reply = unpack(sock.recv_multipart()[0])
                error = reply.get("error") or {}
                answers.append([reply["id"], error.get("code", "OK"), error.get("message", "")])
            sock.close(0)
            context.term()
            print(json.dumps(answers))
        """, daemon.address, timeout=60)
    assert victim.returncode == 0, victim.stderr
    (first_id, first, why), (second_id, second, _) = json.loads(victim.stdout)
    assert (first_id, first) == (1, "DEADLINE_EXCEEDED") and "it never started" in why, why
    assert second_id == 2 and second != "RESOURCE_EXHAUSTED", second


def test_a_batch_run_that_cannot_be_stopped_holds_no_batchmates_slot(daemon_factory: Any, tmp_path: Path) -> None:
    """max_in_flight = 1, two workers, batches of two. Uid 65534 sends 50,000 disjoint boxes (one
    NonMaxSuppression kernel of seconds, which onnxruntime's flag does not stop) with a 30 s timeout; root's
    request of the same shape (one box, 0.5 s timeout) rides in the same batch. Root's is answered
    DEADLINE_EXCEEDED while the run goes on and its slot is free: its next request is served by the other
    worker, not refused RESOURCE_EXHAUSTED for as long as another client's input makes the run last. No
    worker is killed."""
    models = ModelRepo("oi-unstoppable-batch-")
    models.model("boxes", onnx_builders.box_overlap_model, config="workers = 2\nmax_compute_ms = 60000\n[batching]\nmax_batch_size = 2\nmax_queue_delay_us = 1000000\nquiet_us = 0\n")
    policy = tmp_path / "clients.toml"
    policy.write_text("[default]\nmax_in_flight = 1\n")
    daemon = daemon_factory(models.ready(), env={"OPENINFER_POOL_DIRECT": "0", "OPENINFER_SERVER_SOCKET_MODE": "0o666", "OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
    heavy = start_as(NOBODY, """
        i = np.arange(50_000, dtype=np.float32)  # onnx_builders.disjoint_boxes (this uid cannot import it)
        disjoint = np.stack([2 * i, np.zeros_like(i), 2 * i + 1, np.ones_like(i)], 1)[None]
        with Client(sys.argv[1], timeout=60, direct=False) as client:
            client.infer("boxes", {"x": np.tile(np.array([0, 0, 1, 1], np.float32), (1, 8, 1))})  # connected before the race
            print("ready", flush=True)
            sys.stdin.readline()
            try:
                client.infer("boxes", {"x": disjoint}, timeout=30)
                print("OK", flush=True)
            except OpenInferError as exc:
                print(exc.code, flush=True)
    """, daemon.address)
    try:
        assert heavy.stdout is not None and heavy.stdin is not None
        assert heavy.stdout.readline().strip() == "ready", heavy.stderr.read() if heavy.stderr else ""
        with Client(daemon.address, timeout=30, direct=False) as admin, zmq.Context() as context, context.socket(zmq.DEALER) as root:
            before = _pids(admin, "boxes")
            root.connect(daemon.address)
            root.send_multipart(encode_infer_request(1, "boxes", {"x": onnx_builders.one_box(50_000)}, timeout_ms=500))
            heavy.stdin.write("go\n")
            heavy.stdin.flush()
            first = _reply(root)
            assert first["id"] == 1 and first["error"]["code"] == "DEADLINE_EXCEEDED" and "the run goes on" in first["error"]["message"], first
            root.send_multipart(encode_infer_request(2, "boxes", {"x": onnx_builders.one_box(50_000)}, timeout_ms=20_000))
            second = _reply(root, 30)
            assert second["id"] == 2 and "error" not in second, second  # its slot was free: the other worker served it
            assert admin.stats()["models"]["boxes"]["batch_sizes"]["1"].get("2") == 1  # the two did ride together
            out, err = heavy.communicate(timeout=120)
            assert out.strip() == "OK", err  # (the stopped batch ran again without root's member)
            assert _pids(admin, "boxes") == before
    finally:
        if heavy.poll() is None:
            heavy.kill()
        heavy.communicate()  # reaped, its pipes closed
        models.remove()


def test_a_request_pipelined_behind_a_long_run_is_answered_at_its_deadline(daemon_factory: Any, one_worker: Path) -> None:
    """An honest request whose step spins 3 s (30 s timeout); a quick one with a 300 ms timeout is
    pipelined behind it. The quick one cannot start before the spin ends: the daemon answers it
    DEADLINE_EXCEEDED ("never started") half a second past its deadline, while the spin still runs - not
    when the spin ends (its slot was held that long, too) - and the spin's own answer is its result."""
    daemon = daemon_factory(one_worker, env={"OPENINFER_POOL_DIRECT": "0"})
    with Client(daemon.address, timeout=30, direct=False) as admin, zmq.Context() as context:
        for _ in range(20):  # short runs: the supervisor pipelines the model's tasks
            admin.infer("spin", QUICK)
        with context.socket(zmq.DEALER) as honest, context.socket(zmq.DEALER) as late:
            honest.connect(daemon.address)
            late.connect(daemon.address)
            honest.send_multipart(encode_infer_request(1, "spin", {"seconds": np.array(3.0, np.float32)}, timeout_ms=30_000))
            wait_for(lambda: admin.status()["in_flight"] >= 1, 10, "the spin under way (the other socket's request could overtake it)", daemon=daemon)
            late.send_multipart(encode_infer_request(2, "spin", QUICK, timeout_ms=300))
            answer = _reply(late)
            still_running = not honest.poll(0)
            assert answer["id"] == 2 and answer["error"]["code"] == "DEADLINE_EXCEEDED" and "it never started" in answer["error"]["message"], answer
            assert still_running, "answered only when the run before it ended"
            result = _reply(honest)
            assert result["id"] == 1 and "error" not in result, result


def test_a_front_door_request_goes_to_an_idle_worker_no_direct_run_holds(daemon_factory: Any, two_workers: Path) -> None:
    """Two workers, idle to the supervisor. A direct client makes one of them spin past its request's
    deadline (a run its worker cannot stop); the supervisor, which sees only that worker's deadline page,
    must give front-door requests to the other idle worker, not queue them behind that run (they would wait
    out their own deadline and fail). Both workers in turn: whichever the supervisor would have picked
    first, one of the two rounds pins the spin on it (the worker that served the last request is picked
    next), so the test fails on the code before the change."""
    from direct_peer import Peer, attach, lease_of

    daemon = daemon_factory(two_workers, env={"OPENINFER_POOL_DIRECT": "1", "OPENINFER_SERVER_LEASE_TTL_S": "60"})
    # A lease names the workers that are ready: wait for both (the daemon is up once one is).
    def both_ready() -> dict[str, Any] | None:
        taken = lease_of(daemon, "spin")
        return taken if len(taken["workers"]) == 2 else None

    lease = wait_for(both_ready, 60, "a lease naming both workers", daemon=daemon)
    addresses = [worker["address"] for worker in lease["workers"]]
    with Client(daemon.address, timeout=30, direct=False) as door:
        door.infer("spin", QUICK)
        for round_id, address in enumerate(addresses):
            peer = Peer(address)
            try:
                assert "error" not in (peer.ask(attach(lease["lease"])) or {"error": "closed"})
                spin_header = {"v": 1, "id": 10 + round_id, "op": "infer", "inputs": [{"name": "seconds", "datatype": "FP32", "shape": []}], "timeout_ms": 200}
                peer.stream.send([msgpack.packb(spin_header), np.array(4.0, np.float32).tobytes()])
                peer.stream.flush()
                # Until the daemon itself counts that worker as held past a deadline (its leases leave it out).
                wait_for(lambda: address not in [w["address"] for w in lease_of(daemon, "spin")["workers"]], 10, "the spinning worker left out of leases", daemon=daemon)
                result = door.infer("spin", QUICK, timeout=2.0)  # fails DEADLINE_EXCEEDED if it waits behind the spin
                assert result.outputs
                (spun,) = peer.replies(1, timeout=30)
                assert spun["id"] == 10 + round_id and spun["error"]["code"] == "DEADLINE_EXCEEDED", spun
            finally:
                peer.close()


@contextmanager
def _direct_spin_on_one_worker(daemon: Any, seconds: float) -> Iterator[Any]:
    """A direct client pins one of the two workers (idle to the supervisor) in a spin of `seconds` past its
    request's 200 ms deadline, a run the worker cannot stop; the body starts once the daemon counts that
    worker as held past a deadline (its leases leave it out). Yields the peer that sent the spin."""
    from direct_peer import Peer, attach, lease_of

    def both_ready() -> dict[str, Any] | None:
        taken = lease_of(daemon, "spin")
        return taken if len(taken["workers"]) == 2 else None

    lease = wait_for(both_ready, 60, "a lease naming both workers", daemon=daemon)
    stuck = lease["workers"][0]["address"]
    peer = Peer(stuck)
    try:
        assert "error" not in (peer.ask(attach(lease["lease"])) or {"error": "closed"})
        spin_header = {"v": 1, "id": 10, "op": "infer", "inputs": [{"name": "seconds", "datatype": "FP32", "shape": []}], "timeout_ms": 200}
        peer.stream.send([msgpack.packb(spin_header), np.array(seconds, np.float32).tobytes()])
        peer.stream.flush()
        wait_for(lambda: stuck not in [w["address"] for w in lease_of(daemon, "spin")["workers"]], 10, "the spinning worker left out of leases", daemon=daemon)
        yield peer
    finally:
        peer.close()


def _front_door_request_in_thread(address: str, inputs: dict[str, np.ndarray], timeout: float, outcome: list[Any]) -> threading.Thread:
    """A front-door request from a thread, with its own Client (a Client sends one request at a time):
    its output shape, or its error, goes to `outcome` (an exception raised in a thread would only be a
    warning)."""
    def run() -> None:
        with Client(address, timeout=30, direct=False) as client:
            try:
                outcome.append(client.infer("spin", inputs, timeout=timeout).outputs["y"].shape)
            except OpenInferError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _other_worker_busy(door: Client, seconds: float, outcome: list[Any]) -> threading.Thread:
    """A front-door request that keeps the other worker busy for `seconds`, from a thread: the
    supervisor gives it the worker no direct run holds. Returns once that worker is busy."""
    busy = _front_door_request_in_thread(door.address, {"seconds": np.array(seconds, np.float32)}, 30, outcome)
    wait_for(lambda: any(w["state"] == "busy" for w in door.status()["workers"] if w["model"] == "spin"), 10, f"the other worker busy with the {seconds:g} s request")
    return busy


def test_a_front_door_request_waits_for_a_healthy_busy_worker_not_behind_a_direct_run_past_its_deadline(daemon_factory: Any, two_workers: Path) -> None:
    """Two workers: a direct client pins one in a 6 s spin past its request's deadline (idle to the
    supervisor), and a front-door request keeps the other busy for 2 s. The next front-door request must
    wait for the busy one (served in ~2 s), not go to the only idle worker and wait behind the spin until
    its own deadline (found by session 9's attacker: one of 4 concurrent requests failed so)."""
    daemon = daemon_factory(two_workers, env={"OPENINFER_POOL_DIRECT": "1", "OPENINFER_SERVER_LEASE_TTL_S": "60"})
    with _direct_spin_on_one_worker(daemon, 6.0), Client(daemon.address, timeout=30, direct=False) as door:
        busy_outcome: list[Any] = []
        busy = _other_worker_busy(door, 2.0, busy_outcome)
        try:
            result = door.infer("spin", QUICK, timeout=4.0)  # fails DEADLINE_EXCEEDED if it waits behind the 6 s spin
            assert result.outputs["y"].shape == (1, 64)
        finally:
            busy.join(timeout=30)
        assert busy_outcome == [(1, 64)]


def test_a_request_held_back_from_a_stuck_worker_goes_to_it_once_its_run_ends(daemon_factory: Any, two_workers: Path) -> None:
    """The same two workers, but the busy one is busy for 6 s and the direct spin ends after 3 s: the
    request held back in the queue must go to the worker whose run ended (the supervisor looks again every
    few milliseconds), not wait for the busy one past its own 4.5 s deadline."""
    daemon = daemon_factory(two_workers, env={"OPENINFER_POOL_DIRECT": "1", "OPENINFER_SERVER_LEASE_TTL_S": "60"})
    with _direct_spin_on_one_worker(daemon, 3.0), Client(daemon.address, timeout=30, direct=False) as door:
        busy_outcome: list[Any] = []
        busy = _other_worker_busy(door, 6.0, busy_outcome)
        try:
            result = door.infer("spin", QUICK, timeout=4.5)  # fails DEADLINE_EXCEEDED if it waits for the busy worker
            assert result.outputs["y"].shape == (1, 64)
            assert busy.is_alive(), "served only once the busy worker was free"
        finally:
            busy.join(timeout=30)
        assert busy_outcome == [(1, 64)]


def test_a_request_held_back_in_a_version_a_reload_retires_goes_to_its_worker_once_its_run_ends(daemon_factory: Any, two_workers: Path) -> None:
    """As above, and meanwhile a reload replaces the model (its config changed): the held request stays in
    the queue of the version being retired, which the supervisor must still look at (found by session
    10's second attacker: it looked only at the serving versions, and the request waited out its
    deadline although its worker was free). Longer runs than above (4 s, 10 s; the held request's timeout
    7.5 s): the reload boots two workers meanwhile, on a 2-core machine."""
    daemon = daemon_factory(two_workers, env={"OPENINFER_POOL_DIRECT": "1", "OPENINFER_SERVER_LEASE_TTL_S": "60"})
    with _direct_spin_on_one_worker(daemon, 4.0), Client(daemon.address, timeout=30, direct=False) as door:
        busy_outcome: list[Any] = []
        busy = _other_worker_busy(door, 10.0, busy_outcome)
        held_outcome: list[Any] = []
        held = _front_door_request_in_thread(daemon.address, QUICK, 7.5, held_outcome)
        try:
            wait_for(lambda: any(m["queued"] for m in door.models() if m["name"] == "spin"), 10, "the request held back in the queue")
            config = two_workers / "spin" / "config.toml"
            config.write_text(config.read_text().replace(f"max_compute_ms = {MAX_COMPUTE_MS}", f"max_compute_ms = {MAX_COMPUTE_MS + 1}"))
            door.reload()
            held.join(timeout=30)
            assert held_outcome == [(1, 64)]
            assert busy.is_alive(), "served only once the busy worker was free"
        finally:
            held.join(timeout=30)
            busy.join(timeout=30)
