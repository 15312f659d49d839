"""Stopping a direct run that overstays its deadline, from inside the worker.

onnxruntime checks a run's `RunOptions.terminate` between kernels (and in every Loop iteration), and
the flag may be set from another thread. A watch thread started at boot looks at the running deadline
every TICK_S (no wake-up per request: arming is two writes under an uncontended lock) and sets the
flag once it has passed. The run then raises, the request is answered DEADLINE_EXCEEDED, a batch's
members run again alone (only the guilty one fails) and the worker lives on. A single kernel that never
returns is still killed by the supervisor, a grace period after the deadline (deadline_page.py).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

TICK_S = 0.02  # how late, at most, a run is stopped after its deadline


class RunStopped(Exception):
    """The run was stopped at its deadline."""


class RunWatch:
    def __init__(self, options: Any) -> None:
        self.options = options  # one onnxruntime RunOptions for every direct run
        self._lock = threading.Lock()
        self._deadline_ns = 0  # of the run in progress; 0 = none
        self.stopped = False  # the watch stopped the last run
        threading.Thread(target=self._watch, name="openinfer-run-watch", daemon=True).start()

    def arm(self, deadline_ns: int) -> None:
        with self._lock:
            self.stopped = False
            self._deadline_ns = deadline_ns

    def disarm(self) -> bool:
        """The run returned (or raised); True when the watch had stopped it."""
        with self._lock:
            self._deadline_ns = 0
            self.options.terminate = False  # the next run starts clean, even if the flag was just set
            return self.stopped

    def run(self, call: Callable[[Any], T], stop_at_ns: int, ended: Callable[[], None] | None = None) -> T:
        """call(run options), stopped at stop_at_ns: RunStopped when the watch stopped it - also when it
        returned anyway (a step that swallowed the stop returns a cut-short answer, which is no answer).
        `ended` runs as soon as the run is over, whatever happened."""
        self.arm(stop_at_ns)
        try:
            result = call(self.options)
        except Exception:
            stopped = self.disarm()
            if ended is not None:
                ended()
            if stopped:
                raise RunStopped() from None
            raise
        stopped = self.disarm()
        if ended is not None:
            ended()
        if stopped:
            raise RunStopped()
        return result

    def _watch(self) -> None:
        while True:
            time.sleep(TICK_S)
            with self._lock:
                if self._deadline_ns and time.monotonic_ns() >= self._deadline_ns:
                    self.options.terminate = True
                    self.stopped = True
                    self._deadline_ns = 0
