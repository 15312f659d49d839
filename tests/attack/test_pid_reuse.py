"""The daemon signals its workers as root: a signal sent by pid after the worker was reaped reaches
whatever process has that pid since (round 64). Played in a pid namespace of its own, where the probe can
make the next pid the one a worker had (tests/attack/pid_reuse_probe.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from repo_builder import ModelRepo
import onnx_builders

pytestmark = pytest.mark.attack

PROBE = Path(__file__).resolve().parent / "pid_reuse_probe.py"


@pytest.fixture
def models() -> Iterator[Path]:
    repo = ModelRepo("oi-pid-reuse-")
    repo.spinning_model("slow", "workers = 1\nmax_compute_ms = 10000\n")
    repo.model("idle", onnx_builders.matmul_model, config="workers = 1\n")
    yield repo.ready()
    repo.remove()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) (util-linux)")
def test_a_hard_stop_never_kills_a_process_that_took_a_reaped_workers_pid(models: Path) -> None:
    """Round 64 (high): a hard stop set a timer to SIGKILL each worker a second later, by pid; a worker that
    left at once was reaped and its pid free, and the timer killed, as root, the unrelated process that had
    it since. Workers are signalled through their pidfds now, and never once reaped."""
    done = subprocess.run(["unshare", "-pf", "--mount-proc", sys.executable, str(PROBE), str(models)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"decoys": 1, "killed": 0}, outcome
