"""Attacks on the verdict cache (issue #19), found by an independent attacker and fixed:

- a cache shared by every caller is an oracle: another uid that sends a guess and gets `cache: "hit"`
  (or a fast answer) learns that someone sent exactly that before - whether a given attachment was
  scanned. Each identity now has its own entries; `[cache] shared = true` is the operator's opt-in.
- a `[cache]` larger than the worker's memory limit let any client fill the worker with answers until it
  died of MemoryError, failing every request queued there. A worker's cache is now capped at a quarter
  of its memory limit, and a cache that cannot grow empties itself instead of failing the request.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from openinfer.client import Client
from other_uid import run_as
from repo_builder import ModelRepo

pytestmark = pytest.mark.attack

NOBODY = 65534
GUESS = """
import json, sys
import numpy as np
from openinfer.client import Client
with Client(sys.argv[1], direct=sys.argv[3] == "direct") as client:
    x = np.full((1, 64), float(sys.argv[2]), np.float32)
    print(json.dumps([client.infer(model, {"x": x}).cache for model in ("private", "shared")]))
"""


@pytest.fixture
def repo() -> Iterator[Path]:
    models = ModelRepo("oi-cache-attack-")
    models.model("private", onnx_builders.matmul_model, config="workers = 1\n\n[cache]\n")
    models.model("shared", onnx_builders.matmul_model, config="workers = 1\n\n[cache]\nshared = true\n")
    models.model("big", onnx_builders.matmul_model, config="workers = 1\nmemory_limit_mb = 600\n\n[cache]\nentries = 1000\nmax_bytes = 8000000000\n")
    yield models.ready()
    models.remove()


@pytest.mark.parametrize("path", ["direct", "front-door"])
def test_a_cached_answer_tells_another_identity_nothing(daemon_factory: Any, repo: Path, path: str) -> None:
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    secret = 1234.0
    with Client(daemon.address, direct=path == "direct") as victim:
        x = np.full((1, 64), secret, np.float32)
        assert [victim.infer(model, {"x": x}).cache for model in ("private", "shared")] == ["miss", "miss"]
    guesses = {}
    for guess in (secret - 1, secret, secret + 1):
        done = run_as(NOBODY, GUESS, daemon.address, str(guess), path)
        assert done.returncode == 0, done.stderr
        guesses[guess] = json.loads(done.stdout)
    # Per identity (the default): the right guess is a miss like the wrong ones - nothing learned.
    assert [guesses[g][0] for g in sorted(guesses)] == ["miss", "miss", "miss"], guesses
    # A shared cache is the operator's explicit choice, and it answers the victim's input from the cache.
    assert guesses[secret][1] == "hit" and guesses[secret - 1][1] == "miss", guesses
    again = run_as(NOBODY, GUESS, daemon.address, str(secret), path)
    assert json.loads(again.stdout)[0] == "hit"  # the attacker's own entry, now


def test_a_client_cannot_fill_a_worker_with_answers(daemon_factory: Any, repo: Path) -> None:
    """`max_bytes` of 8 GB on a worker limited to 600 MiB: answers of 25.6 MB each, all different."""
    daemon = daemon_factory(repo)
    rows = 100_000
    with Client(daemon.address, timeout=60) as client:
        for i in range(30):  # 768 MB of answers: more than the worker may hold
            x = np.full((rows, 64), float(i), np.float32)
            assert client.infer("big", {"x": x}).cache == "miss"
        workers = [w for w in client.status()["workers"] if w["model"] == "big"]
        assert workers and all(w["restarts"] == 0 for w in workers), workers
        assert client.infer("big", {"x": np.full((rows, 64), 29.0, np.float32)}).cache == "hit"  # still a cache
    assert "cache.max_bytes is over a quarter of the worker's memory limit: capped" in daemon.log_text()
