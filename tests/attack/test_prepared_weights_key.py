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
from daemon_harness import world_readable_dir
from openinfer.client import Client
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack

SIZE = 4096  # 16 KiB of weights: over the 1 KiB the prepare helper moves into the shared weights file


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
        env = {"OPENINFER_SERVER_CACHE_DIR": str(cache), "OPENINFER_POOL_SHARE_MIN_BYTES": "0", "OPENINFER_POOL_WORKERS": "1"}
        first = daemon_factory(repo, env=env)
        with Client(first.address, timeout=30, direct=False) as client:
            assert {row["name"]: row["sharing"] for row in client.status()["models"]} == {"alpha": "shared", "beta": "shared"}
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
