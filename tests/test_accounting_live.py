"""Accounting end to end against a live sandboxed daemon: the stats hold exactly what the replies
carried (counts per model and client, stage sums to the nanosecond, bytes, percentiles), and each
reply's own breakdown is consistent (test_accounting.py: the same on Accountant objects)."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from daemon_harness import RunningDaemon
from openinfer.client import InvalidArgument, NotFound
from openinfer.daemon.observability.accounting import PERCENTILES, LatencySketch
from reference import _session, sample_inputs
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

SERVER_STAGES = ("decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us")
HOPS = ("dispatch_us", "return_us")  # the supervisor's hops to and from a worker: the front door's path only


def ns(value_us: float) -> int:
    return int(value_us * 1000)


@pytest.fixture
def small_repo() -> Iterator[Path]:
    """tiny (2 workers) and magika_scores (the magika model without steps, big enough that compute time is measurable: ~6 ms here)."""
    repo = ModelRepo("oi-acct-")
    repo.examples(["tiny", "magika_scores"])
    yield repo.ready()
    repo.remove()


def timed_infer(client: Any, model: str, feed: dict[str, np.ndarray]) -> tuple[dict[str, float], float, int]:
    """(server timing, client-measured µs around the whole call, output bytes)."""
    t0 = time.perf_counter_ns()
    result = client.infer(model, feed)
    elapsed_us = (time.perf_counter_ns() - t0) / 1000
    return result.timing, elapsed_us, sum(v.nbytes for v in result.outputs.values())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_live_daemon_stats_are_exact_and_the_breakdown_consistent(daemon_factory: Any, small_repo: Path, direct: bool) -> None:
    """Through the front door the supervisor books each reply; on the direct path each worker writes its
    ledger before the reply leaves: either way `stats` holds exactly what the replies carried."""
    daemon: RunningDaemon = daemon_factory(small_repo)
    alice = daemon.client(client_name="alice", direct=direct)
    bob = daemon.client(client_name="bob", direct=direct)
    x = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    magika = sample_inputs("magika")
    replies: dict[str, list[tuple[dict[str, float], float, int]]] = {"tiny": [], "magika_scores": []}
    plan = [(alice, "tiny")] * 40 + [(bob, "tiny")] * 25 + [(alice, "magika_scores")] * 12 + [(bob, "magika_scores")] * 8
    random.Random(3).shuffle(plan)
    for client, model in plan:
        replies[model].append(timed_infer(client, model, x if model == "tiny" else magika))
    for _ in range(4):
        with pytest.raises(InvalidArgument):
            bob.infer("tiny", {"no_such_input": x["x"]})
    for _ in range(2):
        with pytest.raises(NotFound):
            bob.infer("no_such_model", x)

    stats = alice.stats()
    tiny = stats["models"]["tiny"]["versions"]["1"]
    mag = stats["models"]["magika_scores"]["versions"]["1"]
    assert (tiny["requests"], tiny["success"], tiny["failures"]) == (69, 65, {"INVALID_ARGUMENT": 4})
    assert (mag["requests"], mag["success"], mag["failures"]) == (20, 20, {})
    assert stats["rejected"] == {"NOT_FOUND": 2}
    mine = {key.split("@")[0]: value for key, value in stats["clients"].items() if key.split("@")[0] in ("alice", "bob")}
    assert len([k for k in stats["clients"] if k.startswith(("alice@", "bob@"))]) == 2
    assert (mine["alice"]["requests"], mine["alice"]["success"], mine["alice"]["failures"]) == (52, 52, {})
    assert (mine["bob"]["requests"], mine["bob"]["success"]) == (39, 33)
    assert mine["bob"]["failures"] == {"INVALID_ARGUMENT": 4, "NOT_FOUND": 2}

    # The stats hold exactly what the replies carried: stage sums to the nanosecond, bytes, percentiles.
    for name, snap in (("tiny", tiny), ("magika_scores", mag)):
        timings = [t for t, _, _ in replies[name]]
        for key in SERVER_STAGES:
            if direct and key in HOPS:  # no supervisor hops on the direct path: never in the books either
                assert all(key not in t for t in timings) and key[: -len("_us")] not in snap["stages"], (name, key)
                continue
            stage = snap["stages"][key[: -len("_us")]]
            assert stage == {"count": len(timings), "ns": sum(ns(t[key]) for t in timings)}, (name, key)
        assert snap["bytes_out"] == sum(out for _, _, out in replies[name])
        assert snap["cpu_seconds"] == pytest.approx(sum(t["cpu_us"] for t in timings) / 1e6, abs=1e-5)
    assert tiny["bytes_in"] == 65 * 256 and mag["bytes_in"] == 20 * magika["bytes"].nbytes
    assert tiny["stages"]["total"]["count"] == 69
    assert mag["stages"]["total"]["ns"] == sum(ns(t["total_us"]) for t, _, _ in replies["magika_scores"])
    sketch = LatencySketch()
    for t, _, _ in replies["magika_scores"]:
        sketch.record(t["total_us"])
    assert {p: mag["latency"][f"p{p:g}_us"] for p in PERCENTILES} == sketch.percentiles()

    # Per request: stages are non-negative and fit inside total, which fits inside the client's own time.
    for name, rows in replies.items():
        for timing, elapsed_us, _ in rows:
            assert all(timing.get(k, 0.0) >= 0 for k in SERVER_STAGES), (name, timing)
            assert sum(timing.get(k, 0.0) for k in SERVER_STAGES) <= timing["total_us"] + 1e-6, (name, timing)
            assert timing["total_us"] <= elapsed_us, (name, timing, elapsed_us)

    # compute_us is onnxruntime's session.run in the worker: close to the same call in this process.
    session = _session(str(small_repo / "magika_scores" / "1" / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    session.run(names, magika)
    local = []
    for _ in range(15):
        t0 = time.perf_counter_ns()
        session.run(names, magika)
        local.append((time.perf_counter_ns() - t0) / 1000)
    daemon_compute = float(np.median([t["compute_us"] for t, _, _ in replies["magika_scores"]]))
    in_process = float(np.median(local))
    assert in_process / 4 <= daemon_compute <= in_process * 4, (daemon_compute, in_process)


def test_requests_refused_before_they_name_themselves_are_counted_under_the_peers_identity(daemon_factory: Any, tiny_repo: Path) -> None:
    """Issue #18 item 6: a malformed request was keyed by its connection's routing id, so every new
    connection took a new `stats` client slot (any local peer could fill the 1,024); and valid
    operations other than infer went uncounted. Now both are counted under the kernel-proven identity."""
    import msgpack
    import zmq

    running = daemon_factory(tiny_repo)
    context = zmq.Context()
    try:
        for index in range(20):  # each on a connection of its own
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(running.address)
            sock.send_multipart([b"\xc1 not msgpack"] if index % 2 else [msgpack.packb({"v": 1, "id": index, "op": "explode"})])
            assert sock.poll(10_000), "no reply"
            assert "error" in msgpack.unpackb(sock.recv_multipart()[0])
            sock.close()
    finally:
        context.term()
    client = running.client(direct=False)
    client.models()
    client.health()
    stats = client.stats()
    assert set(stats["clients"]) == {"uid=0"}, sorted(stats["clients"])[:5]
    assert stats["clients"]["uid=0"]["requests"] >= 20
    operations = stats["operations"]
    assert operations["(malformed)"] == {"INVALID_ARGUMENT": 20}, operations  # an unknown op is malformed too
    assert operations["models"]["OK"] == 1 and operations["health"]["OK"] >= 1, operations
