"""Attacker round 79 (high): onnxruntime aborts the whole process on silero_vad (a shipped model) given a
batch of no rows - `input` [0, 512], `state` [2, 0, 128] - SIGABRT inside its kernels. Any uid granted the
model crashed its worker with each such request, and five in a row put the model in its crash loop:
UNAVAILABLE for every client until an operator reloaded it. No tensor of no elements reaches onnxruntime
in a dimension the caller chooses: such a request is the caller's mistake (INVALID_ARGUMENT), on both
paths, and the worker serves on. A model of rows (every input and output [rows, fixed...], as `tiny`) is
answered no rows for no rows, without a run, as the protocol's conformance vector tiny_batch_0 says."""
from __future__ import annotations

import numpy as np
import pytest

from daemon_harness import RunningDaemon
from openinfer.client import Client, InvalidArgument

pytestmark = pytest.mark.attack

NO_ROWS = {"input": np.zeros((0, 512), np.float32), "state": np.zeros((2, 0, 128), np.float32), "sr": np.array(16000, np.int64)}
ONE_ROW = {"input": np.zeros((1, 512), np.float32), "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def silero_workers(client: Client) -> list[tuple[int, int]]:
    return sorted((w["pid"], w["restarts"]) for w in client.status()["workers"] if w["model"] == "silero_vad")


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_a_request_of_no_rows_is_refused_and_crashes_no_worker(daemon: RunningDaemon, direct: bool) -> None:
    with Client(daemon.address, timeout=30, direct=False) as admin, Client(daemon.address, timeout=30, direct=direct) as attacker:
        before = silero_workers(admin)
        for _ in range(6):  # one more than the crash loop's limit: the model went UNAVAILABLE for everyone
            with pytest.raises(InvalidArgument, match=r"input '(input|state)' \[.*0.*\] holds no elements"):
                attacker.infer("silero_vad", NO_ROWS)
        assert attacker.infer("silero_vad", ONE_ROW).outputs["output"].shape == (1, 1)
        assert attacker.infer("tiny", {"x": np.zeros((0, 64), np.float32)}).outputs["y"].shape == (0, 64)
        assert silero_workers(admin) == before, "a worker was replaced"
        assert admin.health()["ready"] and "silero_vad" not in str(admin.health()["failed"])
