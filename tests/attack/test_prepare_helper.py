"""A compromised prepare helper against a real daemon (issue #16, finding 5).

The helper parses the untrusted model, so it must be treated like any other untrusted process: the
supervisor chooses the cache key and every path itself, and checks the directory the helper wrote before
it takes it into the cache. hostile_helper.py runs the real daemon with helpers that, after really
preparing their own model, misbehave (see its docstring):

- `escape` reports the key `../escape`: the supervisor used to rename its output to a root-owned
  directory outside the cache;
- `impostor` (a model answering 1337 to everything) reports the key of the model `victim`: the
  supervisor used to retire the victim's prepared weights and put the impostor's in their place, so the
  victim's next worker answered 1337;
- `planted` leaves a symlink to a file of another user in its output: the supervisor used to chown and
  chmod through it, as root.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon, wait_for, world_readable_dir
from openinfer.client import Client
from reference import run_reference

pytestmark = pytest.mark.attack

HERE = Path(__file__).resolve().parent
NOBODY = 65534
X = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(1, 64)


def constant_model(path: Path, value: float) -> Path:
    """Same inputs and outputs as onnx_builders.matmul_model, but y = x @ 0 + value: an impostor."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "impostor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        initializer=[numpy_helper.from_array(np.zeros((64, 64), np.float32), "W"), numpy_helper.from_array(np.full(64, value, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=onnx_builders.OPSET)
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


class Scene:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.repo = base / "repo"
        self.cache = base / "cache"
        self.escape = base / "escape"  # where `<cache>/../escape` lands
        self.planted_target = base / "someone-elses-file"
        self.daemon: RunningDaemon | None = None

    def running(self) -> RunningDaemon:
        assert self.daemon is not None
        return self.daemon


def chmod_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    scene = Scene(world_readable_dir("oi-attack-helper-"))
    scene.repo.mkdir()
    scene.cache.mkdir()
    onnx_builders.matmul_model(scene.repo / "victim" / "1" / "model.onnx", seed=3)
    onnx_builders.matmul_model(scene.repo / "escape" / "1" / "model.onnx", seed=4)
    onnx_builders.matmul_model(scene.repo / "planted" / "1" / "model.onnx", seed=5)
    onnx_builders.matmul_model(scene.repo / "nested" / "1" / "model.onnx", seed=6)
    onnx_builders.matmul_model(scene.repo / "hangs" / "1" / "model.onnx", seed=7)
    chmod_tree(scene.base)
    scene.planted_target.write_bytes(b"private")
    os.chown(scene.planted_target, NOBODY, NOBODY)
    scene.planted_target.chmod(0o600)
    plan = {"escape": {"key": "../escape"}, "impostor": {"key": "VICTIM"}, "planted": {"symlink": str(scene.planted_target)},
            "nested": {"after": "nested-report"}, "hangs": {"after": "hang"}}
    plan_file = scene.base / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = {"OPENINFER_SERVER_CACHE_DIR": str(scene.cache), "OPENINFER_POOL_SHARE_MIN_BYTES": "0", "OPENINFER_POOL_READY_TIMEOUT_S": "20"}
    scene.daemon = start_daemon(scene.repo, env=env, timeout=180, entry=(str(HERE / "hostile_helper.py"), str(plan_file)))
    try:
        # The impostor arrives once the victim's weights are in the cache, as a reload.
        constant_model(scene.repo / "impostor" / "1" / "model.onnx", 1337.0)
        chmod_tree(scene.repo)
        scene.daemon.client().reload()
        wait_for(lambda: rows(scene.running()).get("impostor", {}).get("state") in ("ready", "failed"), 120, "the impostor to load", daemon=scene.daemon)
        yield scene
    finally:
        scene.daemon.stop()
        cleanup_workdir(scene.daemon)
        shutil.rmtree(scene.base, ignore_errors=True)


def rows(daemon: RunningDaemon) -> dict[str, dict[str, Any]]:
    # A client of its own, closed: daemon.client() keeps every client it made open until the daemon stops,
    # and a wait_for polling this made hundreds - past the daemon's connections per uid, slow as a loaded
    # machine is ("daemon not reachable").
    with Client(daemon.address) as client:
        return {r["name"]: r for r in client.models()}


def ready_pids(daemon: RunningDaemon, model: str) -> list[int]:
    with Client(daemon.address) as client:
        return [w["pid"] for w in client.status()["workers"] if w["model"] == model and w["state"] == "ready"]


def test_a_key_that_climbs_out_of_the_cache_creates_nothing_outside_it(scene: Scene) -> None:
    assert not scene.escape.exists(), f"the helper's output was renamed to {scene.escape}: {sorted(os.listdir(scene.escape))}"
    row = rows(scene.running())["escape"]
    assert row["state"] == "ready", row
    np.testing.assert_allclose(scene.running().client().infer("escape", {"x": X}).outputs["y"],
                               run_reference(scene.repo / "escape" / "1" / "model.onnx", {"x": X})["y"], rtol=1e-5, atol=1e-5)


def test_another_models_key_does_not_replace_its_weights(scene: Scene) -> None:
    daemon = scene.running()
    # The victim's running workers map the old files either way: its next worker is the one that loads
    # whatever the cache now holds under its key.
    (old,) = ready_pids(daemon, "victim")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: [p for p in ready_pids(daemon, "victim") if p != old], 60, "a replacement victim worker", daemon=daemon)
    y = daemon.client().infer("victim", {"x": X}).outputs["y"]
    assert not np.allclose(y, 1337.0), "the victim answers with the impostor's weights"
    np.testing.assert_allclose(y, run_reference(scene.repo / "victim" / "1" / "model.onnx", {"x": X})["y"], rtol=1e-5, atol=1e-5)
    victim_source = hashlib.sha256((scene.repo / "victim" / "1" / "model.onnx").read_bytes()).hexdigest()
    victims = [p for p in scene.cache.iterdir() if not p.name.startswith(".") and p.name.split("-")[1] == victim_source[:32]]  # (key: owner-source-files-ort-cpu)
    assert len(victims) == 1, sorted(p.name for p in scene.cache.iterdir())
    assert json.loads((victims[0] / "manifest.json").read_text())["source_sha256"] == victim_source


def test_a_symlink_in_the_helpers_output_is_refused_and_never_followed(scene: Scene) -> None:
    st = os.stat(scene.planted_target)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY, NOBODY, 0o600), "the supervisor chowned/chmodded through the helper's symlink"
    row = rows(scene.running())["planted"]
    assert row["state"] == "ready" and row["sharing"].startswith("off"), row  # loads unshared, as when preparation fails
    assert "notes.txt" in row["sharing"], row["sharing"]
    assert not any((p / "notes.txt").exists() or (p / "notes.txt").is_symlink() for p in scene.cache.iterdir())


def test_a_status_line_nested_too_deep_fails_only_the_preparation(scene: Scene) -> None:
    """Round 66: the helper's status line was parsed where a RecursionError escaped the handling of its exit:
    its model stayed loading ("preparing") for good, UNAVAILABLE. It is read as text now: the preparation
    failed, the model loads its own copy."""
    daemon = scene.running()
    row = wait_for(lambda: (r := rows(daemon)["nested"])["state"] == "ready" and r, 60, "nested ready", daemon=daemon)
    assert row["sharing"].startswith("off") and "[[[" in row["sharing"], row
    assert "internal error" not in daemon.log_text()


def test_a_helper_that_never_exits_is_killed_at_the_boot_deadline(scene: Scene) -> None:
    """Round 66: nothing bounded a prepare helper: one that never exited kept its model loading for good.
    It is held to pool.ready_timeout_s (20 s here), as a worker's boot is; killed, its model loads unshared."""
    daemon = scene.running()
    row = wait_for(lambda: (r := rows(daemon)["hangs"])["state"] == "ready" and r, 90, "hangs ready once its helper is killed", daemon=daemon)
    assert row["sharing"].startswith("off"), row
    assert "prepare helper not done in time; killing it" in daemon.log_text()
