"""A real worker (spawned fresh, onnxruntime, its channel a socketpair inherited at spawn) under the boot
and serve policies.

What must keep working: inference on the loaded session, messaging over the open channel, memory growth
within the limit, Python exceptions with tracebacks. What must not: anything the probes try.
"""
from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sandbox_driver import WorkerDied, WorkloadProcess
from sandbox_model import expected_outputs

pytestmark = pytest.mark.live

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def worker(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkloadProcess]:
    """The full boot order minus the uid drop: pdeathsig, not dumpable, rlimits, namespaces, Landlock, boot
    policy, load + warm-up + connect, malloc_trim, memory limit, serve policy (TSYNC), serve."""
    process = WorkloadProcess(tmp_path_factory.mktemp("worker"), model_path, threads=2, memory_limit_mb=1024, isolate=True)
    try:
        process.start()
    except Exception:
        print(process.close())
        raise
    yield process
    stderr = process.close()
    assert process.process.returncode == 0, stderr


def test_every_thread_is_filtered(worker: WorkloadProcess) -> None:
    threads = worker.threads_from_outside()
    assert len(threads) >= 2  # main and onnxruntime's pool (threads=2); no libzmq threads any more
    assert all(t["Seccomp"] == "2" and t["NoNewPrivs"] == "1" for t in threads.values()), threads


def test_inference_small_and_large(worker: WorkloadProcess, model_path: str) -> None:
    rng = np.random.default_rng(1)
    for rows, image in [(1, (1, 3, 8, 8)), (16384, (2, 3, 256, 256)), (3, (1, 3, 512, 512)), (16384, (2, 3, 256, 256))]:
        x = rng.standard_normal((rows, 64)).astype(np.float32)  # 16384 rows = a 4 MiB tensor
        outputs = worker.run(x, np.ones(image, np.float32))
        np.testing.assert_allclose(outputs["y"], expected_outputs(model_path, x), rtol=1e-4, atol=1e-3)
        assert outputs["feat"].shape == (image[0], 8, image[2], image[3])


def test_exceptions_are_raised_and_formatted(worker: WorkloadProcess) -> None:
    reply = worker.call(b"error")
    text = reply[1].decode()
    assert reply[0] == b"ok"
    assert text.startswith("Traceback (most recent call last):") and "ValueError: deliberate failure inside the sandbox" in text
    assert "in nested_failure" in text  # frames survive; only the source lines (file reads) are missing


def test_memory_grows_within_the_limit_and_fails_cleanly_beyond_it(worker: WorkloadProcess) -> None:
    grown = json.loads(worker.call(b"alloc", json.dumps({"mb": 200}).encode())[1])
    assert grown == {"sum": 200 * MiB / 8}
    too_much = json.loads(worker.call(b"alloc", json.dumps({"mb": 2048}).encode())[1])
    assert "Unable to allocate" in too_much["memory_error"]
    assert worker.run(np.ones((1, 64), np.float32), np.ones((1, 3, 4, 4), np.float32))["y"].shape == (1, 64)


def test_forbidden_actions_fail_softly_where_designed(worker: WorkloadProcess) -> None:
    assert worker.attempt("file_read") == "EPERM"
    assert json.loads(worker.call(b"status")[1]) == {"pid": worker.pid, "proc_readable": False}


@pytest.mark.parametrize("probe", ["exec", "network_socket", "unix_socket", "fork", "exec_memory", "signal"])
def test_forbidden_actions_kill_the_worker(model_path: str, tmp_path: Path, probe: str) -> None:
    process = WorkloadProcess(tmp_path, model_path).start()
    try:
        with pytest.raises(WorkerDied) as died:
            process.attempt(probe)
        assert died.value.returncode == -signal.SIGSYS
    finally:
        process.close()


def test_audit_policy_serves(model_path: str, tmp_path: Path) -> None:
    with WorkloadProcess(tmp_path, model_path, serve_policy="audit") as process:
        x = np.ones((4, 64), np.float32)
        np.testing.assert_allclose(process.run(x, np.ones((1, 3, 8, 8), np.float32))["y"], expected_outputs(model_path, x), rtol=1e-4)
