"""What systemd hears of the daemon's models (Type=notify): READY=1 once nothing is still loading, for a
start and after each reload (failed models do not hold startup back: they are in STATUS=, `health` and the
logs), and STATUS= whenever the model summary changes. Not per request."""
from __future__ import annotations

from typing import Any, Sequence

from openinfer.daemon.control.sdnotify import SystemdNotifier
from openinfer.daemon.modelstore.models import ModelState, ServedModel


class ServiceStatus:
    def __init__(self, notifier: SystemdNotifier) -> None:
        self.notifier = notifier
        self.ready_sent = False  # READY=1 sent for the current start or reload
        self._summary: tuple[Any, ...] = ()

    def reloading(self) -> None:
        self.notifier.reloading()
        self.ready_sent = False

    def tell(self, models: Sequence[ServedModel], workers: int, address: str, still_loading: bool, draining: bool) -> None:
        summary = tuple(sorted((m.key, m.state.value, m.ready_workers()) for m in models))
        if summary == self._summary and self.ready_sent:
            return
        self._summary = summary
        ready = sum(1 for m in models if m.state is ModelState.READY)
        bad = sorted(m.key for m in models if m.state in (ModelState.FAILED, ModelState.UNAVAILABLE))
        text = f"serving {ready} model versions, {workers} workers at {address}" + (f"; not serving: {', '.join(bad)}" if bad else "")
        loading = still_loading or any(m.state is ModelState.LOADING for m in models)
        if not self.ready_sent and not loading and not draining:
            self.notifier.ready(text)
            self.ready_sent = True
        else:
            self.notifier.status(text)
