"""A sandboxed daemon serving `canary` (a plain model) and `hostile` (the same model behind a steps module
an attacker wrote): what the attacks of test_hostile_steps.py and test_hostile_replies.py run against."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon
from repo_builder import ModelRepo


@contextmanager
def hostile_steps_daemon(prefix: str, hostile_config: str, steps: Callable[[Path], str]) -> Iterator[RunningDaemon]:
    """`hostile_config` is the hostile model's config.toml (it names `steps.py`); `steps(root)` that
    file's text, given the repository's root (also the daemon's `repo` attribute)."""
    repo = ModelRepo(prefix)
    repo.model("canary", onnx_builders.matmul_model, config="workers = 1\n")
    repo.model("hostile", onnx_builders.matmul_model, config=hostile_config)
    (repo.root / "hostile" / "steps.py").write_text(steps(repo.root))
    root: Path = repo.ready()
    # The tests crash the hostile model's workers on purpose, one after another, all as this uid: with
    # strikes (pool.crash_strikes, daemon/workerpool/crash_blame.py) the test's own client would be refused
    # the model after three. What strikes do is tests/attack/test_crash_strikes.py's.
    running = start_daemon(root, env={"OPENINFER_POOL_CRASH_STRIKES": "0"})
    running.repo = root  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        running.stop()
        cleanup_workdir(running)
        repo.remove()
