"""A worker's own queue on the direct path keeps the supervisor's rules (the same TaskQueue): higher
priority first, identities take turns, a request whose deadline passes while it waits never runs, a
queued request can be cancelled. Each test keeps the worker busy with one long request, sends the
others meanwhile (they wait in its queue), and reads the order from the replies."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import psutil
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, wait_for, world_readable_dir
from direct_peer import Peer, attach, busy, lease_of, worker_pid
from other_uid import NOBODY, start_as
from repo_builder import make_world_readable

pytestmark = pytest.mark.live

# Leases last a minute here: a loaded machine can take longer than the default 5 s between taking a lease
# and the last request queued under it (an expired lease refuses them all at once, in arrival order).
DIRECT = {"OPENINFER_POOL_DIRECT": "1", "OPENINFER_SERVER_SOCKET_MODE": "0o666", "OPENINFER_SERVER_LEASE_TTL_S": "60"}
BLOCKER = 1_200_000  # loop iterations: about a second of work, while the test queues what it orders behind it
STEP = 60_000  # tens of milliseconds: long enough that run order shows in the queue times


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-direct-sched-")
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\n")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def busy_worker(daemon: RunningDaemon) -> tuple[Peer, Peer, dict[str, Any]]:
    """Two attached connections; the first has sent the blocker and the worker is deep in it."""
    lease = lease_of(daemon, "busy")
    blocker, peer = Peer(lease["workers"][0]["address"]), Peer(lease["workers"][0]["address"])
    try:
        for i, each in enumerate((blocker, peer)):
            assert "result" in each.ask(attach(lease["lease"], 900 + i))  # type: ignore[operator]
        cpu = psutil.Process(worker_pid(daemon, "busy")).cpu_times
        before = sum(cpu()[:2])
        blocker.stream.send(busy(1, BLOCKER))
        wait_for(lambda: sum(cpu()[:2]) > before + 0.3, 20, "the worker to be deep in the blocker")
    except BaseException:
        blocker.close()
        peer.close()
        raise
    return blocker, peer, lease


class OtherUid:
    """Another uid's client, attached to the busy worker and waiting: `ask()` makes it send one request
    of STEP iterations; `answer()` is that request's timing (and whether it went direct). Everything it
    and the test's own peers hold is closed when the block ends, on a failure too (a socket left open
    fails a later test with a ResourceWarning)."""

    CODE = """
        with Client(sys.argv[1], timeout=60) as client:
            feed = {"x": np.zeros(1, np.float32), "n": np.array(1, np.int64)}
            client.infer("busy", feed)  # its lease and worker connection, before the race
            print("attached", flush=True)
            sys.stdin.readline()
            result = client.infer("busy", {"x": np.zeros(1, np.float32), "n": np.array(%d, np.int64)})
            print(json.dumps({**result.timing, "direct": "dispatch_us" not in result.timing}), flush=True)
    """ % STEP

    def __init__(self, daemon: RunningDaemon) -> None:
        self.process = start_as(NOBODY, self.CODE, daemon.address)
        self.peers: tuple[Peer, ...] = ()

    def __enter__(self) -> "OtherUid":
        out = self.process.stdout
        if out is None or out.readline().strip() != "attached":
            self.process.kill()
            raise AssertionError(self.process.communicate(timeout=30)[1])
        return self

    def ask(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        theirs: dict[str, Any] = json.loads(self.process.stdout.readline())
        assert theirs["direct"], theirs
        return theirs

    def __exit__(self, *exc: object) -> None:
        for each in self.peers:
            each.close()
        self.process.kill()
        self.process.communicate(timeout=30)  # reaps it and closes its pipes


def test_higher_priority_runs_first_on_a_worker(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_STARVATION_MS": "60000"})
    blocker, peer, _ = busy_worker(daemon)
    try:
        for request_id, priority in ((10, 0), (11, 0), (12, 7), (13, 7)):
            peer.stream.send(busy(request_id, STEP, priority=priority))
        order = [reply["id"] for reply in peer.replies(4)]
        assert blocker.replies(1)[0].get("outputs")
    finally:
        blocker.close()
        peer.close()
    assert order == [12, 13, 10, 11], order


def test_identities_take_turns_on_a_worker(daemon_factory: Any, repo: Path) -> None:
    """Root queues six requests, then another uid one: it runs after at most one of root's, not after
    all six (a flood delays only its own identity). Run order shows in each reply's queue_us."""
    daemon = daemon_factory(repo, env=DIRECT)
    with OtherUid(daemon) as other:
        blocker, peer, _ = busy_worker(daemon)
        other.peers = (blocker, peer)
        for request_id in range(20, 26):
            peer.stream.send(busy(request_id, STEP))
        other.ask()
        root_queue = sorted(reply["timing"]["queue_us"] for reply in peer.replies(6, timeout=60))
        theirs = other.answer()
    ahead = sum(1 for q in root_queue if q < theirs["queue_us"])
    assert ahead <= 2, (ahead, root_queue, theirs)  # a turn each: not behind all six


def test_a_queued_request_whose_deadline_passes_never_runs(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    blocker, peer, _ = busy_worker(daemon)
    try:
        peer.stream.send(busy(30, STEP, timeout_ms=200, sent_ns=time.monotonic_ns()))  # the timeout runs from the send
        reply = peer.replies(1)[0]
    finally:
        blocker.close()
        peer.close()
    assert reply["error"]["code"] == "DEADLINE_EXCEEDED" and "never ran" in reply["error"]["message"], reply
    assert "compute_us" not in reply["timing"]


def test_a_queued_request_can_be_cancelled(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env=DIRECT)
    blocker, peer, _ = busy_worker(daemon)
    try:
        peer.stream.send(busy(40, STEP))
        peer.stream.send([msgpack.packb({"v": 1, "id": 41, "op": "cancel", "target": 40})])
        replies = {reply["id"]: reply for reply in peer.replies(2)}
    finally:
        blocker.close()
        peer.close()
    assert replies[41]["result"] == {"cancelled": True}, replies
    assert replies[40]["error"]["code"] == "DEADLINE_EXCEEDED" and "cancelled" in replies[40]["error"]["message"], replies


def test_a_request_arriving_while_a_flood_runs_gets_its_turn(daemon_factory: Any, repo: Path) -> None:
    """Turns hold for a request that arrives while the worker works through another identity's queue, not
    only for requests read together: the worker reads its sockets between runs (at least every
    millisecond of running), so another uid's request joins the queue and takes the next turn. Round 9's
    attacker found the worker ran its whole queue before reading again: 200 pipelined requests of one uid
    kept another uid's requests unread for seconds (1 of 3 answered in 8 s, 2 timed out)."""
    daemon = daemon_factory(repo, env=DIRECT)
    with OtherUid(daemon) as other:
        blocker, peer, _ = busy_worker(daemon)
        other.peers = (blocker, peer)
        for request_id in range(50, 58):  # root's flood, read together once the blocker ends
            peer.stream.send(busy(request_id, 3 * STEP))
        ended = blocker.replies(1, timeout=60)[0]
        cpu = psutil.Process(worker_pid(daemon, "busy")).cpu_times
        at_end = sum(cpu()[:2])
        one_run_s = ended["timing"]["compute_us"] / 1e6 * 3 * STEP / BLOCKER  # the loop's cost is linear in n
        wait_for(lambda: sum(cpu()[:2]) > at_end + 1.5 * one_run_s, 30, "the worker to be into root's queue")
        other.ask()  # root's flood is read and running: the other uid asks now
        root = peer.replies(8, timeout=60)
        theirs = other.answer()
    one_run_us = sorted(reply["timing"]["compute_us"] for reply in root)[len(root) // 2]
    waited_runs = (theirs["client_us"] - theirs["compute_us"]) / one_run_us
    assert waited_runs <= 3, (waited_runs, theirs, one_run_us)  # the run in progress and a turn: not root's 7 left


def test_aging_gives_turns_too_so_a_backlog_below_a_higher_priority_cannot_hold_another_uid(daemon_factory: Any, repo: Path) -> None:
    """Round 11's attacker kept requests at priority 9 (so a higher level is never empty) and a backlog
    at priority 1, all older than another uid's priority-0 request. Aging took the oldest aged request
    each time, so that request waited the whole backlog (2 answers in 35 s, 25 s each), not about
    `starvation_ms`. Aged requests now take turns by identity: the other uid's comes among the first."""
    daemon = daemon_factory(repo, env={**DIRECT, "OPENINFER_SERVER_STARVATION_MS": "100"})
    with OtherUid(daemon) as other:
        blocker, peer, _ = busy_worker(daemon)
        other.peers = (blocker, peer)
        for request_id in range(100, 124):  # ~1 s of priority 9: the top level stays taken throughout
            peer.stream.send(busy(request_id, STEP, priority=9))
        for request_id in range(200, 208):
            peer.stream.send(busy(request_id, STEP, priority=1))
        ended = blocker.replies(1, timeout=60)[0]
        cpu = psutil.Process(worker_pid(daemon, "busy")).cpu_times
        at_end = sum(cpu()[:2])
        one_run_s = ended["timing"]["compute_us"] / 1e6 * STEP / BLOCKER
        wait_for(lambda: sum(cpu()[:2]) > at_end + 1.5 * one_run_s, 30, "the worker to be into root's queue")
        other.ask()  # priority 0, read after all of root's: root's backlog is the older
        root = peer.replies(32, timeout=60)
        theirs = other.answer()
    # It waits starvation_ms (100 ms) to be aged, then its turn: the run in progress and at most one more.
    # In runs of root's (their median): the other's own run, one sample, can be the fastest of all.
    one_run_us = max(theirs["compute_us"], sorted(reply["timing"]["compute_us"] for reply in root)[len(root) // 2])
    waited_runs = (theirs["queue_us"] - 100_000) / one_run_us
    assert waited_runs <= 3, (waited_runs, theirs, one_run_us)  # before: behind all eight of priority 1 (~8-9 runs)
