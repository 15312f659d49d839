"""When a crashed or overrun worker is replaced (daemon/workerpool/pool.py `_respawn_later`, `_respawn`), on
the pool's own code with its clock and timers stood in for: the delays a model's exits get, and where no
replacement goes."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from openinfer.daemon.modelstore.models import ModelState
from openinfer.daemon.workerpool import pool as pool_module
from openinfer.daemon.workerpool.pool import WorkerPool

pytestmark = pytest.mark.unit

SECOND = 1_000_000_000
BOOT = SECOND // 3  # a worker's boot, here: killed the moment it is ready


class Scene:
    """A pool (its settings, timers and clock) and one model whose every replacement dies when ready."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, base_ms: int, max_ms: int) -> None:
        self.now = 10**12
        self.due: list[int] = []
        monkeypatch.setattr(pool_module, "time", SimpleNamespace(monotonic_ns=lambda: self.now))
        self.pool: Any = SimpleNamespace(respawns_due=0, settings=SimpleNamespace(pool=SimpleNamespace(respawn_backoff_ms=base_ms, respawn_backoff_max_ms=max_ms)),
                                         timers=SimpleNamespace(call_at=lambda at, _: self.due.append(at)))
        self.model: Any = SimpleNamespace(replaced_ns=0, respawn_crashes=0, key="hostile:1", consecutive_crashes=0)

    def delays_ms(self, exits: int) -> list[int]:
        """The delay each of `exits` exits in a row gets, each replacement dying as it comes up."""
        delays = []
        for _ in range(exits):
            WorkerPool._respawn_later(self.pool, self.model)
            delays.append((self.due[-1] - self.now) // 1_000_000)
            self.now = self.due[-1] + BOOT
        return delays


def test_the_delay_doubles_to_its_ceiling_and_a_quiet_minute_starts_it_again(monkeypatch: pytest.MonkeyPatch) -> None:
    scene = Scene(monkeypatch, 100, 10_000)
    assert scene.delays_ms(9) == [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
    scene.now += 60 * SECOND
    assert scene.delays_ms(2) == [100, 200]


def test_a_ceiling_past_a_minute_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 76: the quiet minute counted from a replacement's scheduling, so a delay over a minute passed
    for one and the doubling started again (31 s, 62 s, 31 s with a ceiling of 600 s)."""
    scene = Scene(monkeypatch, 31_000, 600_000)
    assert scene.delays_ms(6) == [31_000, 62_000, 124_000, 248_000, 496_000, 600_000]


def _respawned(model: Any, shutting_down: bool = False, halting: bool = False) -> bool:
    spawned: list[Any] = []
    pool: Any = SimpleNamespace(shutting_down=shutting_down or halting, halting=halting, spawn=spawned.append)
    pool._none_while_stopping = lambda of: WorkerPool._none_while_stopping(pool, of)  # (the pool's own rule)
    WorkerPool._respawn(pool, model)
    return spawned == [model]


def _model(state: ModelState = ModelState.READY, queued: int = 0) -> Any:
    return SimpleNamespace(state=state, retiring=False, workers=[], worker_count=1, queue=[object()] * queued)


def test_no_replacement_goes_into_a_model_its_crash_loop_made_unavailable() -> None:
    """Round 76: a replacement timed before the fifth crash booted a worker into the UNAVAILABLE model,
    which kept it, serving nothing, until a reload."""
    assert _respawned(_model())
    assert not _respawned(_model(ModelState.UNAVAILABLE))


def test_a_stopping_daemon_replaces_a_worker_only_for_its_models_queued_tasks() -> None:
    """Round 76: a worker that died just before or during a drain was not replaced, and the tasks queued
    for its model waited out the whole grace (30 s) before UNAVAILABLE; a drain finishes them."""
    assert _respawned(_model(queued=1), shutting_down=True)
    assert not _respawned(_model(), shutting_down=True)


def test_a_hard_stop_replaces_no_worker_whatever_is_queued() -> None:
    """Round 77: a task put back in its queue after the hard stop had answered the queues (its worker
    killed for overrunning) had a replacement booted for it, and the stop waited for that worker - past
    the grace, past a third SIGTERM (18.7 s with a 0.2 s grace; 37 s with four SIGTERMs)."""
    assert not _respawned(_model(queued=1), halting=True)
