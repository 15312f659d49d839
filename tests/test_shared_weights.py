"""Weights prepared once and shared by every worker: memory, correctness, integrity, no leftovers."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, wait_for, world_readable_dir
from openinfer.client import Client
from repo_builder import make_world_readable
from reference import run_reference

pytestmark = pytest.mark.live

WEIGHT_BYTES = 2 * 4096 * 4096 * 4  # 128 MiB of FP32 weights


@pytest.fixture(scope="module")
def large_repo() -> Iterator[Path]:
    root = world_readable_dir("oi-large-")
    onnx_builders.large_matmul_model(root / "large" / "1" / "model.onnx")
    (root / "large" / "config.toml").write_text("workers = 3\n")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def workers_of(daemon: RunningDaemon) -> list[dict[str, Any]]:
    with Client(daemon.address, timeout=10) as client:  # polled: not one more client kept per call
        return [w for w in client.status()["workers"] if w["model"] == "large" and w["state"] == "ready"]


def test_workers_share_one_copy_of_the_weights_and_answer_identically(daemon_factory: Any, large_repo: Path) -> None:
    daemon = daemon_factory(large_repo, timeout=180)
    rows = {r["name"]: r for r in daemon.client().models()}
    assert rows["large"]["sharing"] == "shared", rows["large"]
    assert rows["large"]["shared_bytes"] >= WEIGHT_BYTES
    x = np.random.default_rng(0).standard_normal((2, 4096)).astype(np.float32)
    want = run_reference(large_repo / "large" / "1" / "model.onnx", {"x": x})["h1"]
    clients = [daemon.client() for _ in range(3)]
    import threading

    results: list[np.ndarray] = []
    lock = threading.Lock()

    def call(client: Any) -> None:
        for _ in range(3):
            y = client.infer("large", {"x": x}).outputs["h1"].copy()
            with lock:
                results.append(y)

    threads = [threading.Thread(target=call, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 9
    for y in results:
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    workers = workers_of(daemon)
    assert len(workers) == 3 and all(w["tasks_served"] >= 1 for w in workers) or sum(w["tasks_served"] for w in workers) == 9
    # A private copy would put >= 128 MiB in every worker's USS and >= 3 x 128 MiB in the PSS sum.
    uss = [psutil.Process(w["pid"]).memory_full_info().uss for w in workers]
    pss = [psutil.Process(w["pid"]).memory_full_info().pss for w in workers]
    assert max(uss) < WEIGHT_BYTES / 2, [u >> 20 for u in uss]
    assert sum(pss) < 2 * WEIGHT_BYTES, [p >> 20 for p in pss]  # one shared copy + small per-worker baselines


def test_cache_is_reused_verified_and_rebuilt_when_corrupted(daemon_factory: Any, large_repo: Path) -> None:
    cache = world_readable_dir("oi-cache-")
    env = {"OPENINFER_SERVER_CACHE_DIR": str(cache), "OPENINFER_POOL_WORKERS": "1"}
    repo = world_readable_dir("oi-large1-")
    shutil.copytree(large_repo / "large" / "1", repo / "large" / "1")
    make_world_readable(repo)
    first = daemon_factory(repo, env=env, timeout=180)
    assert '"reused":false' in first.log_text()
    first.stop()
    (prepared,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    second = daemon_factory(repo, env=env, timeout=180)
    assert '"reused":true' in second.log_text()
    second.stop()
    # Corrupt the prepared weights (what a disk error would do): the next start must notice and rebuild.
    with open(prepared / "weights.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xff" * 4096)
    third = daemon_factory(repo, env=env, timeout=180)
    assert third.log_text().count('"reused":false') == 1
    x = np.ones((1, 4096), np.float32)
    np.testing.assert_allclose(
        third.client().infer("large", {"x": x}).outputs["h1"], run_reference(repo / "large" / "1" / "model.onnx", {"x": x})["h1"], rtol=1e-4, atol=1e-4
    )
    third.stop()
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(repo, ignore_errors=True)


def test_respawned_worker_attaches_to_prepared_weights(daemon_factory: Any, large_repo: Path) -> None:
    import os
    import signal

    daemon = daemon_factory(large_repo, timeout=180)
    victim = workers_of(daemon)[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> list[dict[str, Any]] | None:
        # One status snapshot per poll: reading it twice raced with the pool (CI saw 3 ready workers, then 2).
        ready = workers_of(daemon)
        return ready if len(ready) == 3 and victim not in [w["pid"] for w in ready] else None

    newest = max(wait_for(replaced, 60, "the killed worker replaced", daemon=daemon), key=lambda w: w["id"])
    assert psutil.Process(newest["pid"]).memory_full_info().uss < WEIGHT_BYTES / 2
    run_dir = Path(daemon.workdir) / "run"
    daemon.stop()
    # Ephemeral prepared weights live in the instance directory and leave with it.
    assert not any(run_dir.glob("instance-*"))


def test_a_model_without_initializers_to_share_loads_unshared_saying_why(daemon_factory: Any) -> None:
    """Round 30's attacker, in passing: a model whose only large initializer is unused (its graph an
    Identity) killed its prepare helper - onnxruntime removes the weights file it wrote nothing into, and
    unlink killed the helper (SIGSYS): "prepare helper exited with -31". The removal is refused instead,
    and the helper says why there is nothing to share."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = world_readable_dir("oi-nothing-to-share-")
    try:
        unused = numpy_helper.from_array(np.ones(9 << 18, np.float32), "unused")  # 9 MiB: over pool.share_min_bytes
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[unused])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        (root / "identity" / "1").mkdir(parents=True)
        onnx.save(model, str(root / "identity" / "1" / "model.onnx"))
        make_world_readable(root)
        daemon = daemon_factory(root)
        with Client(daemon.address, timeout=30, direct=False) as client:
            sharing = wait_for(lambda: (s := client.status()["models"][0]["sharing"]) != "preparing" and s, 30, "the model's sharing settled")
            assert sharing == "off: cannot prepare shared weights: ValueError: the model has no initializers large enough to share", sharing
            assert client.infer("identity", {"x": np.array([2.0], np.float32)}).outputs["y"][0] == 2.0
    finally:
        shutil.rmtree(root, ignore_errors=True)
