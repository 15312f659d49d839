"""A heap of (when, callback) timers for the supervisor loop: deadlines, batch delays, respawn backoff.

The loop's poller only takes millisecond timeouts, which would round a 500 us batch delay up to 1-2 ms.
So the heap also keeps a Linux timerfd armed at its earliest entry when that is near (CLOCK_MONOTONIC,
the clock of `time.monotonic_ns`): the poller watches the fd and wakes at the microsecond the first
timer is due. Timers further out than _TIMERFD_HORIZON_NS use the poller's timeout (1 ms resolution).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import itertools
import logging
import os
import time
from typing import Callable

log = logging.getLogger("openinfer.timers")

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1
# Timers due sooner than this wake the loop through the timerfd (microseconds); later ones through the
# poller's millisecond timeout. Setting a timerfd costs ~10 us here (a VM exit to program the timer),
# and re-arming it for every queued request's deadline, seconds out, bought nothing.
_TIMERFD_HORIZON_NS = 5_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class MonotonicTimerFd:
    """A one-shot timerfd (Python 3.11 has no os.timerfd_*; libc does)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._settime = libc.timerfd_settime
        self._settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd: int = fd
        self._spec = _Itimerspec()

    def arm_at(self, when_ns: int) -> None:
        """Fire once at `when_ns` (monotonic); a time already past fires at once. 0 disarms."""
        when_ns = max(when_ns, 1) if when_ns else 0
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(when_ns, 1_000_000_000)
        if self._settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


Timer = list  # [when_ns, sequence, callback or None]: what call_at returns, to cancel it


class TimerHeap:
    """Timers as [when, seq, callback] lists in a heap. A cancelled timer drops its callback at once
    (so whatever the callback referenced, e.g. a queued task's tensors, is freed now, not at its
    deadline) and its entry is removed when it comes up or when cancelled entries are half the heap."""

    def __init__(self, wakeup: MonotonicTimerFd | None = None) -> None:
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self.wakeup = wakeup
        self._armed_ns = 0  # what the timerfd is set to (0: disarmed)

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> Timer:
        timer = [when_ns, next(self._seq), callback]
        heapq.heappush(self._heap, timer)
        return timer

    def cancel(self, timer: Timer) -> None:
        if timer[2] is None:
            return
        timer[2] = None
        self._cancelled += 1
        if self._cancelled > 1024 and self._cancelled * 2 > len(self._heap):
            self._heap[:] = [t for t in self._heap if t[2] is not None]  # in place: run_due may hold it
            heapq.heapify(self._heap)
            self._cancelled = 0

    def timeout_ms(self, default_ms: int) -> int:
        """How long the poller may sleep; with a timerfd, also re-arm it at the earliest timer."""
        heap = self._heap
        while heap and heap[0][2] is None:  # cancelled: never wake up for it
            heapq.heappop(heap)
            self._cancelled -= 1
        if not heap:
            return default_ms
        head = heap[0][0]
        wait_ns = head - time.monotonic_ns()
        if self.wakeup is None:
            return max(0, min(default_ms, wait_ns // 1_000_000 + 1))
        if wait_ns < _TIMERFD_HORIZON_NS:
            # Only ever earlier: when the earliest timer was cancelled, the wake-up already set is merely
            # early (it finds nothing due and re-arms); moving it later was a syscall per loop turn.
            if self._armed_ns == 0 or head < self._armed_ns:
                self.wakeup.arm_at(head)
                self._armed_ns = head
            return default_ms
        # Far away (a request's deadline, seconds out): no syscall; the poller wakes the loop in time to
        # arm the timerfd for the last few milliseconds, so even these fire to the microsecond.
        return max(0, min(default_ms, (wait_ns - _TIMERFD_HORIZON_NS // 2) // 1_000_000))

    def run_due(self) -> None:
        heap = self._heap
        if not heap:
            return
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now:
            callback = heapq.heappop(heap)[2]
            if callback is None:
                self._cancelled -= 1
                continue
            try:
                callback()
            except Exception:  # as in the loop's dispatch: one bug must not take the daemon (and every client) down
                log.exception("internal error in a supervisor timer; continuing")

    def on_wakeup(self) -> None:
        """The timerfd fired: it is one-shot, so it must be re-armed for the next head."""
        if self.wakeup is not None:
            self.wakeup.clear()
            self._armed_ns = 0

    def close(self) -> None:
        if self.wakeup is not None:
            self.wakeup.close()
            self.wakeup = None

    def __len__(self) -> int:
        return len(self._heap)
