"""Work the supervisor's loop must not wait for - hashing a model or its prepared weights, hundreds of MiB -
done on one background thread, cheapest first: a job's `cost` is the bytes it reads, so a model waits
behind at most one larger model's hash (the one already running), never behind every larger one queued
before it (attacker round 5: one huge file in the repository held up every model queued after it).

A job's result (its return value, or the exception it raised) comes back through a pipe the loop's poller
watches, and the job's callback runs on the loop's own thread: no supervisor state is touched by the
background thread, only what the job itself reads.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import sys
import threading
from typing import Any, Callable

log = logging.getLogger("openinfer.supervisor")
Job = tuple[Callable[[], Any], Callable[[Any], None]]


class OffLoopRunner:
    def __init__(self) -> None:
        self.fd, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._todo: queue.PriorityQueue[tuple[int, int, Job | None]] = queue.PriorityQueue()  # (cost, order, job)
        self._order = itertools.count()  # equal costs run in the order submitted; jobs are never compared
        self._done: queue.SimpleQueue[tuple[Callable[[Any], None], Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="openinfer-offloop", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], Any], then: Callable[[Any], None], cost: int = 0) -> None:
        """Run `work()` on the background thread, after the queued jobs of lower `cost` (the bytes it will
        read); `then(result or exception)` later, from collect()."""
        self._todo.put((cost, next(self._order), (work, then)))

    def collect(self) -> None:
        """The loop saw `fd` readable: run the callbacks of finished jobs."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                then, result = self._done.get_nowait()
            except queue.Empty:
                return
            then(result)

    def close(self) -> None:
        self._todo.put((sys.maxsize, next(self._order), None))  # after every queued job, as the thread's last
        self._thread.join(5)
        for fd in (self.fd, self._wake):
            os.close(fd)

    def _run(self) -> None:
        while (job := self._todo.get()[2]) is not None:
            work, then = job
            try:
                result = work()
            except Exception as exc:  # handed to the callback, which decides what it means
                result = exc
            self._done.put((then, result))
            try:
                os.write(self._wake, b"!")
            except OSError:  # full of wake-ups already, or closed by close()
                pass
