"""The prepared-weights cache key covers a model's external data (attacker round 28).

The key was the hash of model.onnx alone. A model whose weights are in an external-data file has the same
model.onnx as any other with the same tensors' names, shapes and locations: two such models shared one
key, and one of them was served the other's weights; an operator who replaced only the data file was
served the old weights after a restart, from the cache ("reused": true). The key now covers every file
beside the model in its version directory (daemon/files/cache_key.py: version_files).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnx_builders
from daemon_harness import wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack

SIZE = 4096  # 16 KiB of weights: over the 1 KiB the prepare helper moves into the shared weights file


def _env(cache: Path) -> dict[str, str | None]:
    """Every model shared however small, one worker each, on this cache."""
    return {"OPENINFER_SERVER_CACHE_DIR": str(cache), "OPENINFER_POOL_SHARE_MIN_BYTES": "0", "OPENINFER_POOL_WORKERS": "1"}


def _sharing(address: str) -> dict[str, str]:
    with Client(address, timeout=30, direct=False) as client:
        return {row["name"]: row["sharing"] for row in client.status()["models"]}


def _answer(address: str, model: str) -> np.ndarray:
    with Client(address, timeout=30, direct=False) as client:
        return np.asarray(client.infer(model, {"x": np.zeros(SIZE, np.float32)}).outputs["y"])


def test_models_differing_only_in_their_external_data_are_each_served_their_own_weights(daemon_factory: Any) -> None:
    """alpha and beta: the same model.onnx (checked), each its own weights.bin. Both weights shared, each
    answers with its own (before: one key for both). Then alpha's weights.bin alone is replaced, and a
    daemon started again on the same cache answers with the new weights (before: the old ones, reused)."""
    repo, cache = world_readable_dir("oi-extkey-"), world_readable_dir("oi-extkey-cache-")
    try:
        _, alpha = onnx_builders.external_weights_model(repo / "alpha" / "1" / "model.onnx", size=SIZE, seed=1)
        _, beta = onnx_builders.external_weights_model(repo / "beta" / "1" / "model.onnx", size=SIZE, seed=2)
        assert (repo / "alpha" / "1" / "model.onnx").read_bytes() == (repo / "beta" / "1" / "model.onnx").read_bytes()
        make_world_readable(repo)
        env = _env(cache)
        first = daemon_factory(repo, env=env)
        assert _sharing(first.address) == {"alpha": "shared", "beta": "shared"}
        np.testing.assert_array_equal(_answer(first.address, "alpha"), alpha)
        np.testing.assert_array_equal(_answer(first.address, "beta"), beta)
        first.stop()

        replaced = np.full(SIZE, 3.0, np.float32)
        (repo / "alpha" / "1" / "weights.bin").write_bytes(replaced.tobytes())
        second = daemon_factory(repo, env=env)
        np.testing.assert_array_equal(_answer(second.address, "alpha"), replaced)
        np.testing.assert_array_equal(_answer(second.address, "beta"), beta)
        assert second.log_text().count('"reused":true') == 1, second.log_text()  # beta's, unchanged
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def test_models_with_the_same_bytes_share_no_prepared_weights(daemon_factory: Any) -> None:
    """Round 31's suspicion: the cache was keyed by bytes alone, so a model version with the same files as
    another used what that one's prepare helper wrote. That helper parsed a model someone else supplied (a
    hostile one may own it), and on a coarse clock a same-size rewrite within one tick of the files it
    read goes unseen: either way, weights filed for one model would reach another. Every model version
    now has entries of its own: two of the same bytes, two entries, each prepared by its own helper."""
    repo, cache = world_readable_dir("oi-extkey-same-"), world_readable_dir("oi-extkey-same-cache-")
    try:
        _, weight = onnx_builders.external_weights_model(repo / "gamma" / "1" / "model.onnx", size=SIZE, seed=4)
        onnx_builders.external_weights_model(repo / "delta" / "1" / "model.onnx", size=SIZE, seed=4)
        make_world_readable(repo)
        daemon = daemon_factory(repo, env=_env(cache))
        assert _sharing(daemon.address) == {"gamma": "shared", "delta": "shared"}
        np.testing.assert_array_equal(_answer(daemon.address, "delta"), weight)
        assert len([entry for entry in cache.iterdir() if not entry.name.startswith(".")]) == 2, sorted(cache.iterdir())
        assert daemon.log_text().count('"reused":false') == 2
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def test_entries_no_model_uses_leave_the_cache(daemon_factory: Any) -> None:
    """Round 32: nothing ever removed an entry: each new data file, version, repository path or model name
    left a full copy of its weights in a persistent cache (three copies of one model in four starts), and
    anyone who could write a version directory and get a reload could fill the disk. Entries no live model
    version maps are set aside after each sync and each preparation, and removed at the next start."""
    repo, cache = world_readable_dir("oi-extkey-gc-"), world_readable_dir("oi-extkey-gc-cache-")
    env = _env(cache)

    def entries() -> list[str]:
        return sorted(entry.name for entry in cache.iterdir() if not entry.name.startswith("."))

    try:
        onnx_builders.external_weights_model(repo / "alpha" / "1" / "model.onnx", size=SIZE, seed=5)
        make_world_readable(repo)
        first = daemon_factory(repo, env=env)
        (alpha_entry,) = entries()
        (repo / "alpha" / "1" / "weights.bin").write_bytes(np.full(SIZE, 2.0, np.float32).tobytes())  # new weights, same version
        with Client(first.address, timeout=30, direct=False) as admin:
            admin.reload()
            wait_for(lambda: entries() != [alpha_entry] and len(entries()) == 1, 30, "the old weights' entry set aside")
        first.stop()
        (repo / "alpha").rename(repo / "renamed")  # the same files under another name, at the next start
        second = daemon_factory(repo, env=env)
        np.testing.assert_array_equal(_answer(second.address, "renamed"), np.full(SIZE, 2.0, np.float32))
        (renamed_entry,) = entries()
        second.stop()
        third = daemon_factory(repo, env=env)  # a start removes what was set aside
        assert entries() == [renamed_entry] and not [entry for entry in cache.iterdir() if entry.name.startswith(".") and entry.name != ".lock"], sorted(cache.iterdir())
        third.stop()
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def test_a_second_daemon_on_the_same_cache_is_refused_and_takes_nothing(daemon_factory: Any) -> None:
    """Round 33: a second daemon on the same server.cache_dir (the shipped config names one) set the first's
    live entry aside at its start, and the first's next worker could not start (crash loop, UNAVAILABLE);
    its next start would have removed the other's. A daemon holds its cache's lock: the second is refused,
    naming it, and the first's entry stays."""
    repo, cache = world_readable_dir("oi-extkey-two-"), world_readable_dir("oi-extkey-two-cache-")
    try:
        onnx_builders.external_weights_model(repo / "alpha" / "1" / "model.onnx", size=SIZE, seed=6)
        make_world_readable(repo)
        env = _env(cache)
        first = daemon_factory(repo, env=env)
        entries = sorted(entry.name for entry in cache.iterdir())
        second = daemon_factory(repo, env=env, wait=False)
        assert second.process.wait(60) == 1
        assert f"server.cache_dir {cache} is in use by another openinfer daemon" in second.log_text(), second.log_text()[-2000:]
        assert sorted(entry.name for entry in cache.iterdir()) == entries
        assert first.process.poll() is None and len(_answer(first.address, "alpha")) == SIZE
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def test_a_huge_sparse_file_beside_a_model_holds_back_no_other_model(daemon_factory: Any) -> None:
    """Round 29's attacker, on the fix above: the files beside a model are hashed by the supervisor's one
    off-loop thread. A hostile repository put a sparse 1 TiB file (no disk cost) beside a small model and
    raised the bound with memory_limit_mb = 1048576 in the model's own config.toml; the job counted only
    model.onnx, so it ran first, and an honest model waited (victim still loading after 60 s; about an hour
    of hashing). The bound is the operator's settings alone, and a job costs all it reads: the hostile model
    loads unshared, saying why, and the victim is served at once."""
    repo, cache = world_readable_dir("oi-extpad-"), world_readable_dir("oi-extpad-cache-")
    try:
        onnx_builders.external_weights_model(repo / "hostile" / "1" / "model.onnx", size=SIZE)
        (repo / "hostile" / "config.toml").write_text("memory_limit_mb = 1048576\n")
        with open(repo / "hostile" / "1" / "pad", "wb") as pad:
            pad.truncate(1 << 40)
        onnx_builders.large_matmul_model(repo / "victim" / "1" / "model.onnx", size=256)  # larger: it was hashed after the hostile one
        make_world_readable(repo)
        env = _env(cache)
        daemon = daemon_factory(repo, env=env, wait=False)
        with Client(daemon.address, timeout=5, direct=False) as client:
            rows = wait_for(lambda: _sharing_settled(client), 30, "both models' sharing settled", daemon=daemon)
        assert rows["victim"] == "shared", rows
        assert rows["hostile"].startswith("off: the files beside the model are not hashed: the files beside the model come to more than"), rows
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def _sharing_settled(client: Client) -> dict[str, str] | None:
    try:
        rows = {row["name"]: row["sharing"] for row in client.status()["models"]}
    except OpenInferError:
        return None  # not listening yet
    return rows if len(rows) == 2 and "preparing" not in rows.values() else None
