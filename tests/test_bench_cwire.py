"""bench/cwire, the C load generator of bench/batching.py: it must speak the protocol and its results
file must parse, or the benchmark's figures mean nothing. Built with make like client/c (a missing
library is a failure naming the packages, not a skip); a short run against the real daemon."""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
import pytest

from daemon_harness import REPO_ROOT, RunningDaemon

sys.path.insert(0, str(REPO_ROOT / "bench"))
from cwireload import CWirePool  # noqa: E402

pytestmark = pytest.mark.live


@pytest.fixture
def pool() -> Iterator[CWirePool]:
    with CWirePool("tiny", "x", np.ones((1, 64), np.float32)) as generator:
        yield generator


def test_cwire_drives_the_daemon_and_reports_every_answer(daemon: RunningDaemon, pool: CWirePool) -> None:
    before = daemon.client().stats()["models"]["tiny"]["requests"]
    result = pool.run(daemon.address, 4, duration_s=0.4, warmup_s=0.05)
    answered = daemon.client().stats()["models"]["tiny"]["requests"] - before
    assert result.errors == {}
    # The window counts only requests sent and answered inside it; the daemon also saw the rest.
    assert 50 < result.completed <= answered
    assert (result.latencies_ns > 0).all() and np.median(result.latencies_ns) < 1e9
    for stage in ("queue_us", "compute_us", "total_us"):
        values = result.stages_us[stage]
        assert values.size == result.completed and (values >= 0).all(), stage
    # Server time is part of the client's round trip.
    assert np.median(result.stages_us["total_us"]) * 1000 < np.median(result.latencies_ns)


def test_cwire_counts_error_replies_by_code(daemon: RunningDaemon) -> None:
    with CWirePool("no-such-model", "x", np.ones((1, 64), np.float32)) as generator:
        result = generator.run(daemon.address, 2, duration_s=0.3, warmup_s=0.05)
    assert result.completed == 0
    assert set(result.errors) == {"NOT_FOUND"} and result.errors["NOT_FOUND"] > 10, result.errors
