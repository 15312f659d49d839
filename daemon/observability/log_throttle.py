"""Which of many like events is logged: the 1st, 2nd, 4th, 8th ... of each kind from each source.

What a peer can make happen once per message - a refusal, a malformed request, a broken connection - it
can make happen a hundred thousand times a second, and a log line each was a disk filled from any
unprivileged client (rounds 65 and 67: 16-24 MB in 8-10 s). Counting per source keeps each source's
first event in the log however much another one floods (round 67: junk hand-shakes, counted together
with everyone's, hid a replayed box on an admitted session). Every logged line says its count.
"""
from __future__ import annotations

MAX_SOURCES = 4096  # (kind, source) pairs counted apart; sources past them are counted together
OTHERS = "(other sources)"


class LogThrottle:
    def __init__(self, max_sources: int = MAX_SOURCES) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._max = max_sources

    def due(self, kind: str, source: str) -> int:
        """One more `kind` event from `source`: its count if it is to be logged, else 0. Once MAX_SOURCES
        pairs are counted, a new source's events are counted with all such under OTHERS - never a reset
        (round 68: clearing the table at its bound let 6,000 IPv6 /64s, reused, log every request)."""
        key = (kind, source)
        count = self._counts.get(key)
        if count is None and len(self._counts) >= self._max:
            key = (kind, OTHERS)
            count = self._counts.get(key)
        count = (count or 0) + 1
        self._counts[key] = count
        return count if count & (count - 1) == 0 else 0
