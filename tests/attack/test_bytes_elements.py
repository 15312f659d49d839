"""Round 14's attacker: one request of 16,000,000 empty strings (64 MB, under max_request_bytes) held a
worker for seconds outside any run - checking, decoding and handing them to the model cost about a
microsecond each, before the deadline page showed a run - so the daemon took it for an idle worker that
did not answer its PING and killed it, failing another uid's request WORKER_CRASHED. A request holds at
most MAX_BYTES_ELEMENTS (1,048,576) BYTES elements, refused from its shape before any is read, on both
paths; and the deadline page now covers a run's input preparation too."""
from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import psutil
import pytest

import onnx_builders
from daemon_harness import wait_for, world_readable_dir
from direct_peer import Peer, attach, lease_of, unread_by_peer, worker_pid
from openinfer.client import AsyncClient, Client, DeadlineExceeded, InvalidArgument, ResourceExhausted
from openinfer.wire.protocol import MAX_BYTES_ELEMENTS
from openinfer.wire.tensors import encode_array
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-bytes-elements-")
    onnx_builders.string_model(root / "text" / "1" / "model.onnx")
    (root / "text" / "config.toml").write_text("workers = 1\n")
    yield make_world_readable(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_more_bytes_elements_than_the_limit_are_refused_before_any_is_read(daemon_factory: Any, repo: Path, direct: bool) -> None:
    daemon = daemon_factory(repo)
    too_many = np.full(MAX_BYTES_ELEMENTS + 1, b"", dtype=object)
    with Client(daemon.address, timeout=30, direct=direct) as client:
        with pytest.raises(ResourceExhausted, match=f"the limit is {MAX_BYTES_ELEMENTS} in one request"):
            client.infer("text", {"text": too_many})
        answer = client.infer("text", {"text": np.array([b"still", b"served"], dtype=object)})
        assert answer.outputs["count"].tolist() == [2]
    with Client(daemon.address, direct=False) as admin:  # by the same worker: none was replaced
        assert [w["restarts"] for w in admin.status()["workers"] if w["model"] == "text"] == [0]


def test_a_worker_busy_with_a_large_requests_bytes_is_not_taken_for_an_unresponsive_one(daemon_factory: Any, repo: Path) -> None:
    """The cap bounds that work, the deadline page covers it: a direct request of a million BYTES
    elements in and out spends most of its time decoding its input and encoding its output, outside
    session.run. Before, the page showed the worker idle then, and with a PING grace shorter than that
    work (here 0.2 s) the daemon killed it as unresponsive, failing the request WORKER_CRASHED (round 14
    on the input side; round 15 on the output side, 12 million outputs took 3.1 s to encode)."""
    daemon = daemon_factory(repo, env={"OPENINFER_POOL_PING_INTERVAL_S": "0.05", "OPENINFER_POOL_PING_GRACE_S": "0.2"})
    many = np.full(MAX_BYTES_ELEMENTS, b"", dtype=object)
    with Client(daemon.address, timeout=60) as client:
        for _ in range(3):
            answer = client.infer("text", {"text": many})
            assert answer.outputs["count"].tolist() == [MAX_BYTES_ELEMENTS] and len(answer.outputs["same"]) == MAX_BYTES_ELEMENTS
            assert answer.timing["prep_us"] + answer.timing["encode_us"] > 200_000, answer.timing  # the work outlasted the grace
    with Client(daemon.address, direct=False) as admin:
        assert [w["restarts"] for w in admin.status()["workers"] if w["model"] == "text"] == [0]


@pytest.fixture(scope="module")
def tight_repo() -> Iterator[Path]:
    root = world_readable_dir("oi-bytes-tight-")
    onnx_builders.string_fanout_model(root / "fanout" / "1" / "model.onnx")
    onnx_builders.string_model(root / "text" / "1" / "model.onnx")
    for name in ("fanout", "text"):
        (root / name / "config.toml").write_text("workers = 1\nmax_compute_ms = 300\n")
    yield make_world_readable(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_bytes_work_past_max_compute_ms_is_stopped_and_its_worker_kept(daemon_factory: Any, tight_repo: Path, direct: bool) -> None:
    """Round 16's attacker: an 8-byte request for 4 million strings out of a model whose max_compute_ms is
    300 ran 0.16 s and then encoded its outputs for ~1 s, which nothing could stop: its worker was killed
    every time, failing another client's queued request; and a million strings in, through the front
    door, got the worker killed before the run was stopped. The loops over BYTES elements now look at the
    request's deadline (the earlier of its timeout and max_compute_ms from its start) every 65,536
    elements: the request is answered DEADLINE_EXCEEDED and the worker serves on."""
    daemon = daemon_factory(tight_repo)
    with Client(daemon.address, timeout=30, direct=direct) as client:
        with pytest.raises(DeadlineExceeded, match="stopped"):
            client.infer("fanout", {"n": np.array([4_000_000], np.int64)})
        with pytest.raises(DeadlineExceeded, match="stopped"):
            client.infer("text", {"text": np.full(MAX_BYTES_ELEMENTS, b"", dtype=object)})
        assert client.infer("fanout", {"n": np.array([3], np.int64)}).outputs["out"].tolist() == [b"x"] * 3
    with Client(daemon.address, direct=False) as admin:
        assert [w["restarts"] for w in admin.status()["workers"]] == [0, 0]


def test_a_batch_of_many_small_bytes_members_is_stopped_at_its_deadline_too(daemon_factory: Any) -> None:
    """Round 18's attacker: the BYTES loops looked at the deadline every 65,536 elements of one call, so a
    batch of 64 members of 65,000 strings each - 4.2 million elements, about 2 s of work - was never
    looked at, and the worker was killed past max_compute_ms. The count runs across calls: the batch is
    stopped at its deadline, its members run again alone (each well within it), the worker is kept."""
    root = world_readable_dir("oi-bytes-batch-")
    onnx_builders.string_grid_model(root / "grid" / "1" / "model.onnx")
    (root / "grid" / "config.toml").write_text("workers = 1\nmax_compute_ms = 300\n\n[batching]\nmax_batch_size = 64\nmax_queue_delay_us = 1000000\nquiet_us = 0\n")
    daemon = daemon_factory(make_world_readable(root))
    row = {"text": np.full((1, 65_000), b"", dtype=object)}

    async def sixty_four() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=60) as client:
            return await asyncio.gather(*(client.infer("grid", row) for _ in range(64)), return_exceptions=True)

    try:
        outcomes = asyncio.run(sixty_four())
        with Client(daemon.address, direct=False) as admin:
            restarts = [w["restarts"] for w in admin.status()["workers"]]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, DeadlineExceeded)], outcomes
    assert restarts == [0]


def test_a_batch_member_whose_deadline_passes_while_its_outputs_are_encoded_fails_alone(daemon_factory: Any) -> None:
    """Round 19's attacker: the BYTES loops stop at a deadline, and in a direct batch the members' outputs
    were encoded outside the code that answers a failed batch: a member whose deadline passed while they
    were made the worker exit (6 of 6), failing its batchmates WORKER_CRASHED. Now that member alone is
    answered DEADLINE_EXCEEDED, the others are answered, the worker serves on. Its timeout is set from
    this machine's own timings to fall while the last member's outputs are encoded."""
    root = world_readable_dir("oi-bytes-encode-")
    onnx_builders.string_grid_model(root / "grid" / "1" / "model.onnx")
    (root / "grid" / "config.toml").write_text("workers = 1\n\n[batching]\nmax_batch_size = 2\nmax_queue_delay_us = 10000000\nquiet_us = 0\n")
    daemon = daemon_factory(make_world_readable(root))
    row = {"text": np.full((1, MAX_BYTES_ELEMENTS // 2), b"", dtype=object)}
    async def two(second_timeout: float | None) -> list[Any]:
        async with AsyncClient(daemon.address, timeout=60) as client:  # the batch leaves as the second arrives
            return await asyncio.gather(client.infer("grid", row), client.infer("grid", row, timeout=second_timeout), return_exceptions=True)

    try:
        calibration = asyncio.run(two(None))  # this machine's timings of such a batch
        assert [answer.batch_size for answer in calibration] == [2, 2], calibration
        first, second = (answer.timing for answer in calibration)
        short_s = (second["prep_us"] + second["compute_us"] + (first["encode_us"] + second["encode_us"]) / 2) / 1e6  # mid-way through the 2nd member's encoding
        outcomes = asyncio.run(two(short_s))
        with Client(daemon.address, direct=False) as admin:
            restarts = [w["restarts"] for w in admin.status()["workers"]]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, DeadlineExceeded)], outcomes
    assert not isinstance(outcomes[0], BaseException), outcomes
    assert restarts == [0]


def _zmtp_message(frames: list[bytes]) -> bytes:
    """`frames` as ZMTP data frames on the wire (PROTOCOL.md 2.6), written here to hold the last byte back."""
    out = bytearray()
    for index, frame in enumerate(frames):
        more = 1 if index < len(frames) - 1 else 0
        out += bytes((more | 2,)) + struct.pack(">Q", len(frame)) if len(frame) > 255 else bytes((more, len(frame)))
        out += frame
    return bytes(out)


def test_requests_of_many_connections_completed_at_once_cost_the_worker_one_run_at_a_time(daemon_factory: Any, tight_repo: Path) -> None:
    """Round 19's attacker: ten connections each send a request of a million strings but its last byte,
    then the last bytes together. The worker walked each request's elements as it admitted it, before any
    run: ten walks back to back (~0.16 s each), outside any turn of its loop, and a front-door request
    sent meanwhile waited past what the supervisor allows behind a direct run - killed with the worker
    (max_compute_ms 300). Admission no longer walks them; each is read in its own run, one a turn."""
    daemon = daemon_factory(tight_repo)
    lease = lease_of(daemon, "text")
    message = _zmtp_message([msgpack.packb({"v": 1, "id": 2, "op": "infer", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [MAX_BYTES_ELEMENTS]}]}), b"\0\0\0\0" * MAX_BYTES_ELEMENTS])
    worker = psutil.Process(worker_pid(daemon, "text"))
    peers = [Peer(lease["workers"][0]["address"]) for _ in range(10)]
    try:
        for peer in peers:
            assert "error" not in (peer.ask(attach(lease["lease"])) or {"error": "closed"})
            peer.stream.sock.setblocking(True)
        for peer in peers:
            peer.stream.sock.sendall(message[:-1])
        wait_for(lambda: not any(unread_by_peer(peer.stream.sock) for peer in peers), 30, "the worker holding ten requests but a byte")
        with Client(daemon.address, timeout=30, direct=False) as victim:
            for peer in peers:
                peer.stream.sock.send(message[-1:])
            answer = victim.infer("text", {"text": np.array([b"a", b"b"], dtype=object)})
        assert answer.outputs["count"].tolist() == [2]
        assert worker.is_running(), "the worker was killed"
    finally:
        for peer in peers:
            peer.close()


GOOD_ROW = {"text": np.array([[b"ab", b"c"]], dtype=object)}
NOT_UTF8_ROW = {"text": np.array([[b"\xff", b"c"]], dtype=object)}


def _grid_of_four(daemon_factory: Any, prefix: str, delay_us: int = 10_000_000) -> tuple[Any, Path]:
    """string_grid_model batching 4 requests: a batch leaves once four are queued (or after `delay_us`)."""
    root = world_readable_dir(prefix)
    onnx_builders.string_grid_model(root / "grid" / "1" / "model.onnx")
    (root / "grid" / "config.toml").write_text(f"workers = 1\n\n[batching]\nmax_batch_size = 4\nmax_queue_delay_us = {delay_us}\nquiet_us = 0\n")
    return daemon_factory(make_world_readable(root)), root


@pytest.mark.parametrize("malformed", [b"\xff\xff\xff\x7f" + b"\0\0\0\0", b"\x01\0\0\0\xff" + b"\x01\0\0\0c"], ids=["length-past-the-end", "not-utf8"])
def test_a_malformed_bytes_request_in_a_direct_batch_fails_alone_and_its_batchmates_still_run_together(daemon_factory: Any, malformed: bytes) -> None:
    """Round 20's attacker: a worker reads a direct request's BYTES elements when it runs it, and a batch
    with one malformed frame in it failed as a whole and ran member by member - one such request in each
    batch window turned batching's gain off for every client of the model. Each member's inputs are now
    decoded alone before the join: the malformed one is answered INVALID_ARGUMENT, the others run as one
    batch of three. Round 23's attacker: a string that is not UTF-8 still failed the join (the str
    conversion came after it); it is part of each member's decoding now."""
    daemon, root = _grid_of_four(daemon_factory, "oi-bytes-bad-member-")
    header = {"v": 1, "op": "infer", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2]}]}
    good = encode_array(np.array([[b"ab", b"c"]], dtype=object))[2]
    peer = Peer(lease_of(daemon, "grid")["workers"][0]["address"])
    try:
        assert "error" not in (peer.ask(attach(lease_of(daemon, "grid")["lease"])) or {"error": "closed"})
        for request_id, payload in ((2, good), (3, malformed), (4, good), (5, good)):
            peer.stream.send([msgpack.packb({**header, "id": request_id}), payload])
        replies = {reply["id"]: reply for reply in peer.replies(4)}
    finally:
        peer.close()
        shutil.rmtree(root, ignore_errors=True)
    assert replies[3]["error"]["code"] == "INVALID_ARGUMENT", replies[3]
    assert [replies[request_id].get("batch_size") for request_id in (2, 4, 5)] == [3, 3, 3], replies


def test_a_string_that_is_not_utf8_in_a_front_door_batch_fails_alone_and_its_batchmates_batch_again(daemon_factory: Any) -> None:
    """Round 23's attacker, through the daemon's socket: the worker found the bad member only when its
    batch failed, and the supervisor ran every member alone (batch_size 1 for the three good ones). The
    worker now names the member whose own inputs failed; it alone is answered, the others batch again."""
    daemon, root = _grid_of_four(daemon_factory, "oi-bytes-bad-member-fd-")
    good, bad = GOOD_ROW, NOT_UTF8_ROW

    async def four() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=60, direct=False) as client:
            return await asyncio.gather(*(client.infer("grid", inputs) for inputs in (good, bad, good, good)), return_exceptions=True)

    try:
        outcomes = asyncio.run(four())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert isinstance(outcomes[1], InvalidArgument) and "UnicodeDecodeError" in str(outcomes[1]), outcomes[1]
    assert [o.batch_size for o in (outcomes[0], outcomes[2], outcomes[3])] == [3, 3, 3], outcomes
    # They waited for company once; sent back, they were held for it again, the model's whole 10 s delay.
    assert all(o.timing["queue_us"] < 5e6 for o in (outcomes[0], outcomes[2], outcomes[3])), [o.timing for o in outcomes if not isinstance(o, BaseException)]


def test_requests_that_are_not_utf8_cannot_keep_another_request_in_failing_batches(daemon_factory: Any) -> None:
    """Round 25's attacker: after round 23's fix a failed batch answered its first bad member and sent the
    rest back to batch again - with more of the attacker's requests, which failed it again: a victim
    queued among 250 of them expired having never run. Now a failed batch answers every bad member, and a
    request sent back once runs alone if its batch fails again. One good request, then eleven that are
    not UTF-8 (one client: its queue keeps that order): the good one is answered after at most two failed
    batches of three bad ones each - before, after all eleven."""
    daemon, root = _grid_of_four(daemon_factory, "oi-bytes-rebatch-", 100_000)
    order: list[str] = []

    async def twelve() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=60, direct=False) as client:
            await client.infer("grid", GOOD_ROW)  # connected, the daemon's limits known: the twelve leave in order
            async def ask(name: str, inputs: dict[str, Any]) -> Any:
                try:
                    return await client.infer("grid", inputs)
                finally:
                    order.append(name)
            return await asyncio.gather(ask("good", GOOD_ROW), *(ask("bad", NOT_UTF8_ROW) for _ in range(11)), return_exceptions=True)

    try:
        outcomes = asyncio.run(twelve())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not isinstance(outcomes[0], BaseException), outcomes[0]
    assert all(isinstance(o, InvalidArgument) for o in outcomes[1:]), outcomes
    assert order.index("good") <= 6, order


def test_what_a_batch_failed_by_bad_strings_leaves_runs_as_one_batch_without_new_company(daemon_factory: Any) -> None:
    """Round 26's attacker: the members a failed batch left went back to the queue, took more of the
    attacker's requests that are not UTF-8 as company, failed again and then ran alone - every other
    client's requests of the model ran one at a time (260 -> 57 req/s). They go straight back to the
    worker as one batch now. Two good requests among six bad ones (one client, in this order): the two
    are answered together, batch_size 2 - before, each alone."""
    daemon, root = _grid_of_four(daemon_factory, "oi-bytes-again-", 100_000)
    good, bad = GOOD_ROW, NOT_UTF8_ROW

    async def eight() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=60, direct=False) as client:
            await client.infer("grid", good)  # connected, the daemon's limits known: the eight leave in order
            return await asyncio.gather(*(client.infer("grid", inputs) for inputs in (good, bad, good, bad, bad, bad, bad, bad)), return_exceptions=True)

    try:
        outcomes = asyncio.run(eight())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert all(isinstance(outcomes[i], InvalidArgument) for i in (1, 3, 4, 5, 6, 7)), outcomes
    assert [outcomes[0].batch_size, outcomes[2].batch_size] == [2, 2], outcomes
