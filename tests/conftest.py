"""Shared fixtures: real daemons on temporary ipc:// paths, real models."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

# Tests run onnxruntime in process (the references): it must not phone home or write ~/.cache/Microsoft
# either (DESIGN §4), and it must be off before the first import of onnxruntime anywhere in the run.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_harness import EXAMPLE_MODELS, RunningDaemon, cleanup_workdir, made_scratch_root, start_daemon, world_readable_dir  # noqa: E402
import onnx_builders  # noqa: E402
from layers import pytest_collection_modifyitems  # noqa: E402,F401  (every test has exactly one layer)
from repo_builder import make_world_readable  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_layers.py runs pytest on small made-up suites


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The daemons' directories and repositories of the whole run go with it; a failed run keeps them
    (each daemon's full log is there) and says where."""
    root = made_scratch_root()
    if root is None:
        return
    if exitstatus == 0:
        shutil.rmtree(root, ignore_errors=True)
    else:
        sys.stderr.write(f"\nthe test daemons' directories and logs are kept in {root}\n")


@pytest.fixture(scope="session")
def model_repo() -> Iterator[Path]:
    """The shipped example models plus generated ones covering every datatype path."""
    root = world_readable_dir("oi-repo-")
    for model_dir in EXAMPLE_MODELS.iterdir():
        shutil.copytree(model_dir, root / model_dir.name)
    onnx_builders.multi_io_model(root / "multi" / "1" / "model.onnx")
    onnx_builders.string_model(root / "strings" / "1" / "model.onnx")
    onnx_builders.scalar_model(root / "scalar" / "1" / "model.onnx")
    onnx_builders.conv_image_model(root / "conv" / "1" / "model.onnx")
    onnx_builders.matmul_model(root / "versioned" / "1" / "model.onnx", seed=1)
    onnx_builders.matmul_model(root / "versioned" / "2" / "model.onnx", seed=2)
    onnx_builders.matmul_model(root / "small_limit" / "1" / "model.onnx")
    (root / "small_limit" / "config.toml").write_text("max_request_bytes = 1024\n")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_repo() -> Iterator[Path]:
    """The shipped tiny model alone: for private daemons of tests that need any model (a daemon over
    model_repo loads magika and the OCR models first, ~5 s of each such test)."""
    root = world_readable_dir("oi-tiny-repo-")
    shutil.copytree(EXAMPLE_MODELS / "tiny", root / "tiny")
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(model_repo: Path) -> Iterator[RunningDaemon]:
    """One sandboxed daemon over the whole repository, shared by the read-only tests."""
    running = start_daemon(model_repo)
    yield running
    running.stop()
    cleanup_workdir(running)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., RunningDaemon]]:
    """Start private daemons (for tests that kill, reload or reconfigure); all stopped at teardown."""
    started: list[RunningDaemon] = []

    def factory(models: Path, *extra: str, **kwargs: object) -> RunningDaemon:
        running = start_daemon(models, *extra, **kwargs)  # type: ignore[arg-type]
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()
        cleanup_workdir(running)
