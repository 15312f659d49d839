"""A huge model file in the repository (attacker round 5, finding 5), against a real daemon and its parts.

The attack: `aaa/1/model.onnx`, a 64 GiB file made with `truncate` (sparse: nothing on disk), named to
sort first. The supervisor hashed every model file's full size for its cache key on its one off-loop
thread, in order, and decided "below pool.share_min_bytes, no hashing" only in the same queued job: every
model - the tiny one too - waited behind 64 GiB of zeros. Measured: 'tiny' first answered 103.8 s after
start instead of 0.7 s (102 s of supervisor CPU); 1 TiB would be ~27 min, past the unit's
TimeoutStartSec. There was no bound on a model file's size.

Now a model file over `pool.max_model_bytes` fails its model at once, with the size, the bound and the
key in its reason, before the supervisor hashes it or a worker reads it; the rest of the repository loads.
The tests set the bound low, so the sparse file here is only 2 GiB and nothing ever hashes much.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, world_readable_dir
from reference import run_reference
from openinfer.daemon.config.settings import load_settings
from openinfer.daemon.files.cache_key import fd_sha256
from openinfer.daemon.files.prepared import PreparedStore
from openinfer.daemon.loop.offloop import OffLoopRunner
from openinfer.daemon.modelstore.modelconfig import ModelConfig
from openinfer.daemon.modelstore.models import ModelState, ServedModel
from openinfer.daemon.workerpool.preparation import WeightPreparer

pytestmark = pytest.mark.attack

BOUND = 64 * 1024 * 1024  # pool.max_model_bytes in these tests
SPARSE = 2 * 1024**3  # the hostile file's apparent size: over BOUND, nothing on disk


def sparse_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)
    return path


@pytest.mark.parametrize("share_weights", ["true", "false"], ids=["sharing", "no-sharing"])
def test_a_sparse_model_file_over_the_bound_fails_alone_and_the_others_serve(daemon_factory: Callable[..., RunningDaemon], share_weights: str) -> None:
    """Sharing on, the supervisor would hash it; off, each worker would read it: either way it fails unread."""
    root = world_readable_dir("oi-attack-sparse-")
    sparse_file(root / "aaa" / "1" / "model.onnx", SPARSE)  # sorts first
    tiny = onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    env = {"OPENINFER_POOL_MAX_MODEL_BYTES": str(BOUND), "OPENINFER_POOL_SHARE_WEIGHTS": share_weights}
    daemon = daemon_factory(root, env=env, timeout=180)
    rows = {row["name"]: row for row in daemon.client().models()}
    hostile = rows["aaa"]
    assert hostile["state"] == "failed", hostile
    reason = hostile["reason"] or ""
    assert str(root / "aaa" / "1" / "model.onnx") in reason and "pool.max_model_bytes" in reason, reason
    assert f"{SPARSE} bytes" in reason and f"{BOUND} bytes" in reason, reason
    assert rows["tiny"]["state"] == "ready", rows["tiny"]
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(daemon.client().infer("tiny", {"x": x}).outputs["y"], run_reference(tiny, {"x": x})["y"], rtol=1e-5, atol=1e-5)


class _Reactor:
    def add(self, fd: int, callback: Callable[[int], None]) -> None:
        pass

    def remove(self, fd: int) -> None:
        pass


def _model(name: str, path: Path, repository: Path) -> ServedModel:
    return ServedModel(name=name, version=1, path=path, config=ModelConfig(), worker_count=1, intra_op_threads=1, repository=repository)


def test_no_model_waits_behind_a_hash_it_does_not_need(tmp_path: Path) -> None:
    """The real WeightPreparer, its off-loop thread held busy (as by a huge hash): a model below
    pool.share_min_bytes starts its workers at once and one over pool.max_model_bytes fails at once; only
    a model that is shared waits for the thread."""
    repository = tmp_path / "models"
    tiny = _model("tiny", onnx_builders.matmul_model(repository / "tiny" / "1" / "model.onnx"), repository)
    huge = _model("huge", sparse_file(repository / "huge" / "1" / "model.onnx", SPARSE), repository)
    shared = _model("shared", sparse_file(repository / "shared" / "1" / "model.onnx", 1 << 20), repository)
    config = tmp_path / "openinfer.toml"
    config.write_text("")
    settings = load_settings(config, environ={"OPENINFER_POOL_MAX_MODEL_BYTES": str(BOUND), "OPENINFER_POOL_SHARE_MIN_BYTES": str(1 << 16)})
    started: list[str] = []
    pool: Any = SimpleNamespace(settings=settings, reactor=_Reactor())
    preparer = WeightPreparer(pool, PreparedStore(tmp_path / "cache", worker_uid=None), lambda model: started.append(model.name), lambda: [tiny, huge, shared])
    busy = threading.Event()
    try:
        preparer.offloop.submit(lambda: busy.wait(30), lambda result: None)
        for model in (huge, tiny, shared):
            preparer.start(model)
        assert "tiny" in started, f"tiny ({tiny.sharing!r}) waited for the off-loop thread, busy with another model"
        assert tiny.sharing.startswith("off: ") and "pool.share_min_bytes" in tiny.sharing, tiny.sharing
        assert huge.state is ModelState.FAILED and "pool.max_model_bytes" in (huge.reason or ""), (huge.state, huge.reason, huge.sharing)
        assert "huge" not in started
        assert shared.sharing == "preparing" and "shared" not in started, shared.sharing
    finally:
        busy.set()
        preparer.close()


def test_hashes_run_smallest_first() -> None:
    """Queued behind a busy thread, a smaller model's hash goes before a larger one's queued earlier."""
    runner = OffLoopRunner()
    busy = threading.Event()
    ran: list[int] = []
    try:
        runner.submit(lambda: busy.wait(30), lambda result: None)
        for cost in (3 << 30, 1 << 20, 2 << 30):
            runner.submit(lambda cost=cost: ran.append(cost), lambda result: None, cost=cost)
    finally:
        busy.set()
        runner.close()  # after every queued job
    assert ran == [1 << 20, 2 << 30, 3 << 30], ran


def _bytes_read() -> int:
    """What this process has read so far, every read and pread counted (rchar), sparse zeros too."""
    with open("/proc/self/io", "rb") as file:
        fields = dict(line.split(b":") for line in file.read().splitlines())
    return int(fields[b"rchar"])


def test_a_worker_reads_no_more_of_the_model_than_it_checked_when_the_file_grows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacker round 6, finding 8: a worker (and the prepare helper: the same open_model_source) checked
    the file's size against pool.max_model_bytes, then read it to its end. A repository writer that grows
    the file in between (`truncate`: sparse, free on disk) had it read whole - 256 MiB under a 1 MiB
    bound. Here the real worker code, with the file grown right after its check, as the writer times it:
    the load fails naming the growth, and at most the checked size and one byte were read."""
    from openinfer.daemon.files import model_files
    from openinfer.daemon.files.model_files import ModelFileError, ModelTooLarge, open_version_dir
    from openinfer.daemon.worker import model_source
    from openinfer.daemon.worker.bootconfig import WorkerBootConfig

    repository = tmp_path / "models"
    path = onnx_builders.matmul_model(repository / "tiny" / "1" / "model.onnx")
    grown = 32 * 1024 * 1024

    def check_then_grow(fd: int, model_path: str, max_bytes: int) -> int:
        size = model_files.check_model_size(fd, model_path, max_bytes)
        os.truncate(path, grown)  # the hostile writer, between the check and the read
        return size

    monkeypatch.setattr(model_source, "check_model_size", check_then_grow)
    checked = path.stat().st_size
    config = WorkerBootConfig(worker_id=1, model="tiny", version=1, model_path=str(path), intra_op_threads=1, supervisor_pid=os.getpid(), repository=str(repository), max_model_bytes=BOUND)
    version_dir = open_version_dir(str(repository), str(path), "the test's user")
    try:
        before = _bytes_read()
        with pytest.raises(ModelFileError) as refused:  # before: read whole, then "not a valid ONNX model"
            model_source.open_model_source(config, version_dir, "the test's user")
        read = _bytes_read() - before
    finally:
        os.close(version_dir)
    assert os.stat(path).st_size == grown
    assert read <= checked + 1 + 4096, f"the worker read {read} bytes of a model file checked at {checked} (grown to {grown})"  # + /proc/self/io itself
    assert isinstance(refused.value, ModelTooLarge), refused.value
    assert "grew while it was read" in str(refused.value) and f"the {checked} bytes" in str(refused.value) and "pool.max_model_bytes" in str(refused.value), refused.value


def test_the_hash_stops_when_the_file_grows_past_its_checked_size(tmp_path: Path) -> None:
    """The repository's owner may `truncate` the same inode larger after the size check."""
    path = sparse_file(tmp_path / "model.onnx", SPARSE)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="grew past the 1024 bytes"):
            fd_sha256(fd, 1024)
    finally:
        os.close(fd)
