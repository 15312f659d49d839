"""Dynamic batching: identical results under concurrent load, batch sizes visible, never for fixed batch."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import pytest
import zmq

import onnx_builders
from daemon_harness import wait_for, world_readable_dir
from openinfer.client import AsyncClient
from repo_builder import make_world_readable
from reference import run_reference

pytestmark = pytest.mark.live


def batching_repo(models: dict[str, tuple[Callable[[Path], Path], str]]) -> Path:
    """A world-readable repository: model name -> (builder writing model.onnx, config.toml text)."""
    root = world_readable_dir("oi-batch-")
    for name, (build, config) in models.items():
        build(root / name / "1" / "model.onnx")
        (root / name / "config.toml").write_text(config)
    make_world_readable(root)
    return root


@pytest.fixture
def repo() -> Iterator[Path]:
    batching = "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 3000\nquiet_us = 0\n"
    root = batching_repo({"dyn": (onnx_builders.matmul_model, batching), "fixed": (lambda p: onnx_builders.matmul_model(p, batch=1), batching)})
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_concurrently(address: str, model: str, inputs: list[np.ndarray]) -> list[Any]:
    async def main() -> list[Any]:
        async with AsyncClient(address, timeout=30) as client:
            return await asyncio.gather(*(client.infer(model, {"x": x}) for x in inputs))

    return asyncio.run(main())


def test_batched_results_equal_unbatched_and_batches_form(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal((int(rng.integers(1, 3)), 64)).astype(np.float32) for _ in range(40)]
    results = run_concurrently(daemon.address, "dyn", inputs)
    model_path = repo / "dyn" / "1" / "model.onnx"
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result.outputs["y"], run_reference(model_path, {"x": x})["y"], rtol=1e-5, atol=1e-5)
        assert result.outputs["y"].shape == x.shape
    sizes = daemon.client().stats()["models"]["dyn"]["batch_sizes"]["1"]
    # Every dispatch is counted, single-task ones too: the sizes add up to the requests served.
    assert sum(int(k) * v for k, v in sizes.items()) == 40 and max(int(k) for k in sizes) > 1, sizes
    for r in results:
        t = r.timing
        stages = sum(t.get(k, 0.0) for k in ("decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us"))  # no hops on the direct path
        assert stages <= t["total_us"] + 1e-6
        # Each member of a batch has its own, consistent timing: nothing negative, and the wait for
        # the batch is a part of the queue time.
        assert all(t.get(k, 0.0) >= 0 for k in ("queue_us", "dispatch_us", "return_us", "batch_wait_us")), t
        assert t["batch_wait_us"] <= t["queue_us"] + 1e-6, t


def test_every_batch_layout_gives_the_unbatched_result(daemon_factory: Any) -> None:
    """The worker gets a small batch's rows joined into one frame per input and a large one's frames
    per member; it answers fixed-size outputs whole (cut into members by the supervisor) and BYTES
    outputs member by member. Each way, with several inputs and outputs of mixed dtypes, every member
    gets exactly what running it alone gives."""
    batching = "workers = 1\n[batching]\nmax_batch_size = 32768\nmax_queue_delay_us = 20000\nquiet_us = 0\n"
    root = batching_repo({
        "multi": (onnx_builders.multi_io_model, batching),
        "text": (onnx_builders.string_rows_model, batching),
        "wide": (onnx_builders.matmul_model, batching),
    })
    daemon = daemon_factory(root)
    rng = np.random.default_rng(11)
    cases: dict[str, list[dict[str, np.ndarray]]] = {
        # Two inputs, 20 bytes a row: 28,000 rows are over the joining limit, so most batches go per member.
        "multi": [{"x": rng.standard_normal((n, 4)).astype(np.float32), "ids": rng.integers(-9, 9, n).astype(np.int32)} for n in (1, 9000, 3, 12000, 5, 7000)],
        "text": [{"text": np.array([f"r{i}-{j}\u00e9".encode() * j for j in range(n)], dtype=object), "n": np.full((n, 2), i, np.int64)} for i, n in enumerate((2, 1, 3, 1))],
        # 6 x 300 rows x 64 FP32 = 450 KiB: one input, over the joining limit.
        "wide": [{"x": rng.standard_normal((300, 64)).astype(np.float32)} for _ in range(6)],
    }

    async def main() -> dict[str, list[Any]]:
        async with AsyncClient(daemon.address, timeout=30) as client:
            answers = await asyncio.gather(*(client.infer(model, feed) for model, feeds in cases.items() for feed in feeds))
        it = iter(answers)
        return {model: [next(it) for _ in feeds] for model, feeds in cases.items()}

    results = asyncio.run(main())
    stats = daemon.client().stats()["models"]
    for model, feeds in cases.items():
        for feed, result in zip(feeds, results[model]):
            expected = run_reference(root / model / "1" / "model.onnx", feed)
            assert set(result.outputs) == set(expected), model
            for name, want in expected.items():
                got = result.outputs[name]
                assert got.shape == want.shape, (model, name, got.shape, want.shape)
                if want.dtype == object:
                    assert [e.decode() if isinstance(e, bytes) else e for e in got.reshape(-1)] == list(want.reshape(-1)), (model, name)
                else:
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        sizes = stats[model]["batch_sizes"]["1"]
        assert max(int(k) for k in sizes) > 1, (model, sizes)  # they really ran as batches
        # ... and no batch failed: its members would have been run again alone (same answers, more dispatches).
        assert sum(int(k) * v for k, v in sizes.items()) == len(feeds), (model, sizes)
    shutil.rmtree(root, ignore_errors=True)


def test_batch_delay_is_kept_to_the_microsecond_not_rounded_to_the_poll_tick(daemon_factory: Any, tmp_path: Path) -> None:
    root = batching_repo({"dyn": (onnx_builders.matmul_model, "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 300\nquiet_us = 0\n")})
    daemon = daemon_factory(root)
    client = daemon.client()
    waits = [client.infer("dyn", {"x": np.ones((1, 64), np.float32)}).timing["batch_wait_us"] for _ in range(30)]
    shutil.rmtree(root, ignore_errors=True)
    # A lone request waits for the configured delay (300 us) for company; the poller's 1 ms tick would
    # make that >= 1000 us. The daemon's own measurement, so a noisy machine cannot fail it.
    assert 250 <= float(np.median(waits)) < 900, waits


def test_a_batch_leaves_once_its_clients_go_quiet_not_after_the_whole_delay(daemon_factory: Any) -> None:
    """On the direct path a worker holds a batch that has not filled only while requests keep coming:
    once none has arrived for quiet_us it runs what it has. With a 2 s delay, a lone request waits
    quiet_us (300 us), not 2 s; with quiet_us = 0 the delay alone rules (the test above)."""
    root = batching_repo({"dyn": (onnx_builders.matmul_model, "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 2000000\nquiet_us = 300\n")})
    daemon = daemon_factory(root)
    client = daemon.client()
    results = [client.infer("dyn", {"x": np.ones((1, 64), np.float32)}) for _ in range(10)]
    shutil.rmtree(root, ignore_errors=True)
    assert all("dispatch_us" not in r.timing for r in results)  # the direct path, where the worker batches
    waits = [r.timing["batch_wait_us"] for r in results]
    assert 250 <= float(np.median(waits)) < 900, waits  # the daemon's own measurement


def test_zero_delay_never_waits_and_preferred_sizes_leave_at_once(daemon_factory: Any) -> None:
    root = batching_repo({
        "greedy": (onnx_builders.matmul_model, "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 0\n"),
        "pref": (onnx_builders.matmul_model, "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 10000000\nquiet_us = 0\npreferred_batch_sizes = [2]\n"),
    })
    daemon = daemon_factory(root)
    client = daemon.client()
    x = np.ones((1, 64), np.float32)
    waits = [client.infer("greedy", {"x": x}).timing["batch_wait_us"] for _ in range(20)]
    assert float(np.median(waits)) < 200, waits  # a free worker takes a lone request at once
    # With a 10 s delay, two concurrent requests still leave together at once: 2 is a preferred size.
    results = run_concurrently(daemon.address, "pref", [x, x])
    assert [r.batch_size for r in results] == [2, 2]
    assert all(r.timing["queue_us"] < 10_000_000 for r in results), [r.timing for r in results]  # not held for the delay
    shutil.rmtree(root, ignore_errors=True)


def test_batching_config_is_checked(tmp_path: Path) -> None:
    from openinfer.daemon.modelstore.modelconfig import ConfigError, parse_model_config

    path = tmp_path / "config.toml"
    path.write_text("[batching]\nmax_batch_size = 4\npreferred_batch_sizes = [2, 8]\n")
    with pytest.raises(ConfigError, match=r"\[8\] exceed max_batch_size 4"):
        parse_model_config(path)
    path.write_text("[batching]\nmax_queue_delay_us = -1\n")
    with pytest.raises(ConfigError, match="max_queue_delay_us"):
        parse_model_config(path)
    path.write_text("[batching]\nquiet_us = -5\n")
    with pytest.raises(ConfigError, match="quiet_us"):
        parse_model_config(path)
    path.write_text("[batching]\nmax_queue_delay_us = 0\n")
    batching = parse_model_config(path).batching
    assert batching is not None and batching.max_queue_delay_us == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_a_batch_that_runs_too_long_is_retried_member_by_member(daemon_factory: Any, direct: bool) -> None:
    """Through the front door the supervisor kills the worker and sends each member again alone; on the
    direct path the worker stops the run itself (worker/run_watch.py) and runs each member alone."""
    root = batching_repo({"rows": (onnx_builders.row_loop_model, "workers = 1\nmax_compute_ms = 1500\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 300000\nquiet_us = 0\n")})
    daemon = daemon_factory(root)
    inputs = [np.array([[1.0]], np.float32), np.array([[2.0]], np.float32), np.array([[1e12]], np.float32), np.array([[3.0]], np.float32)]

    async def main() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=30, direct=direct) as client:
            return await asyncio.gather(*(client.infer("rows", {"x": x}) for x in inputs), return_exceptions=True)

    results = asyncio.run(main())
    shutil.rmtree(root, ignore_errors=True)
    # The four rode in one batch that spun because of one of them; the innocent three ran again alone.
    for x, result in zip(inputs, results):
        if x[0, 0] > 1e6:
            assert getattr(result, "code", None) == "DEADLINE_EXCEEDED", result
        else:
            assert not isinstance(result, BaseException), result
            np.testing.assert_allclose(result.outputs["y"], x + x)
            assert result.batch_size == 1
            assert ("dispatch_us" not in result.timing) == direct  # the path it took: no supervisor hop on the direct one
    stats = daemon.client().stats()["models"]["rows"]
    assert stats["batch_sizes"]["1"].get("4") == 1, stats["batch_sizes"]
    if direct:  # stopped by the worker itself: never killed
        workers = [w for w in daemon.client().status()["workers"] if w["model"] == "rows"]
        assert workers and all(w["restarts"] == 0 for w in workers), workers


def test_reply_header_names_the_batch_size(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(daemon.address)
    x = np.ones((1, 64), np.float32).tobytes()
    for i in range(4):
        sock.send_multipart([msgpack.packb({"v": 1, "id": i, "op": "infer", "model": "dyn", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}), x])
    headers = []
    for _ in range(4):
        assert sock.poll(10000)
        headers.append(msgpack.unpackb(sock.recv_multipart()[0]))
    sock.close(linger=0)
    context.term()
    assert sorted(h["id"] for h in headers) == [0, 1, 2, 3]
    assert all("batch_size" in h or "error" not in h for h in headers)


def test_model_with_fixed_batch_of_one_is_never_batched(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    inputs = [np.full((1, 64), i, np.float32) for i in range(16)]
    results = run_concurrently(daemon.address, "fixed", inputs)
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result.outputs["y"], run_reference(repo / "fixed" / "1" / "model.onnx", {"x": x})["y"], rtol=1e-5)
        assert "batch_wait_us" not in result.timing
    assert "batch_sizes" not in daemon.client().stats()["models"]["fixed"]


def test_access_log_records_every_batch_member_once(daemon_factory: Any, repo: Path) -> None:
    """With log.access_log_sample = 1 each answered request is one access-log line, batched or not, with
    its own timing (batch members: their own stages plus the batch's shared ones)."""
    daemon = daemon_factory(repo, env={"OPENINFER_LOG_ACCESS_LOG_SAMPLE": "1"})
    inputs = [np.full((1, 64), i, np.float32) for i in range(12)]
    run_concurrently(daemon.address, "dyn", inputs)
    daemon.client().infer("fixed", {"x": inputs[0]})
    def access_lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{") and '"logger":"openinfer.access"' in line]

    wait_for(lambda: len(access_lines()) >= 13, 20, "13 access-log lines (each is written just after its reply)")
    lines = access_lines()
    by_model: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_model.setdefault(line["model"], []).append(line)
    assert len(by_model["dyn"]) == 12 and len({line["task"] for line in by_model["dyn"]}) == 12, by_model["dyn"]
    assert len(by_model["fixed"]) == 1
    for line in by_model["dyn"]:
        assert line["code"] == "OK" and {"batch_wait_us", "compute_us", "queue_us", "total_us"} <= set(line["timing"]), line
    assert "batch_wait_us" not in by_model["fixed"][0]["timing"]
    sizes = daemon.client().stats()["models"]["dyn"]["batch_sizes"]["1"]
    assert max(int(k) for k in sizes) > 1, sizes  # members of real batches were among them
