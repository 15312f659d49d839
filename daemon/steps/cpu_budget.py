"""A CPU-time budget for a block of Python code in the worker's main thread: past it, the block is
interrupted where it stands.

Image decoding is the case: Pillow's parsers read some layouts a byte or an entry at a time in Python, and
every attacker round found another one within the size a request may have (16 MiB of junk before a JPEG's
markers, a TIFF tag listed twice - rounds 44-49). The layout checks in rapidocr.py refuse the known ones
with a reason; this bounds the ones nobody has found yet, by what they cost rather than by what they look
like. The process's CPU clock (ITIMER_PROF) rather than the wall: an honest file must not be refused
because the machine is busy.

The interruption is OverBudget, a BaseException: the code it lands in (Pillow wraps its parsers in
`except Exception`) cannot take it for a parse error and go on. The timer repeats until the block ends, so
even code that swallows each interruption cannot finish as if within budget, and the block's end disarms it in a loop that
survives an interruption landing there: nothing is ever raised outside a block. The handler stays
installed for the worker's life (SIGPROF's default action ends the process): a signal that arrives after
the block ended finds it disarmed and does nothing.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

REPEAT_S = 0.01  # once spent, interrupted again every 10 ms of CPU until the block ends


class OverBudget(BaseException):
    """The block spent its CPU budget (a BaseException: see the module docstring)."""


_armed = False
_fired = False  # the budget was spent during the block, whether or not the block let the interruption out
_installed = False


def _on_sigprof(signum: int, frame: FrameType | None) -> None:
    global _fired
    if _armed:
        _fired = True
        raise OverBudget()


def _disarm() -> None:
    global _armed
    signal.setitimer(signal.ITIMER_PROF, 0.0)
    _armed = False


@contextmanager
def cpu_budget(seconds: float) -> Iterator[None]:
    """Run the block with `seconds` of the process's CPU time (user + system, every thread); raises
    OverBudget from wherever the block stands once they are spent. Main thread only (Python runs signal
    handlers there): elsewhere it refuses rather than run the block unbounded."""
    global _armed, _fired, _installed
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("cpu_budget works in the main thread only (signal handlers run there)")
    if not _installed:
        signal.signal(signal.SIGPROF, _on_sigprof)
        _installed = True
    spent = False
    try:
        _fired = False
        _armed = True
        signal.setitimer(signal.ITIMER_PROF, max(seconds, 1e-6), REPEAT_S)
        yield
    except OverBudget:
        spent = True
    finally:
        while True:
            try:
                _disarm()
                break
            except OverBudget:  # the interruption landed here, after the block: it was spent all the same
                spent = True
    if spent or _fired:
        raise OverBudget()
