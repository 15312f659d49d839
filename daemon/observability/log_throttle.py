"""Which of many like events is logged: the 1st, 2nd, 4th, 8th ... of each kind from each source.

What a peer can make happen once per message - a refusal, a malformed request, a broken connection - it
can make happen a hundred thousand times a second, and a log line each was a disk filled from any
unprivileged client (rounds 65 and 67: 16-24 MB in 8-10 s). Counting per source keeps each source's
first event in the log however much another one floods (round 67: junk hand-shakes, counted together
with everyone's, hid a replayed box on an admitted session). Every logged line says its count.
"""
from __future__ import annotations

MAX_SOURCES = 4096  # anonymous (kind, source) pairs counted apart; past them new ones are counted together
MAX_IDENTIFIED = 65536  # and pairs of identified sources (a uid, an admitted CURVE key)
OTHERS = "(other sources)"
ANONYMOUS_PREFIXES = ("tcp=", "tcp:")  # plain tcp:// hosts, and the pre-auth CURVE source


class LogThrottle:
    """Two tables: sources any remote peer can multiply (plain tcp:// hosts: IPv6 /64s by the thousand)
    apart from identified ones (uids, admitted keys: as many as the kernel or the policy makes), so that
    filling the first cannot hide an identified peer's events (round 69: 4,100 addresses did)."""

    def __init__(self, max_sources: int = MAX_SOURCES, max_identified: int = MAX_IDENTIFIED) -> None:
        self._anonymous: dict[tuple[str, str], int] = {}
        self._identified: dict[tuple[str, str], int] = {}
        self._max = max_sources
        self._max_identified = max_identified

    def due(self, kind: str, source: str) -> int:
        """One more `kind` event from `source`: its count if it is to be logged, else 0. Past its table's
        bound, a new source's events are counted with all such under OTHERS - never a reset (round 68:
        clearing the table at its bound let 6,000 IPv6 /64s, reused, log every request)."""
        anonymous = source.startswith(ANONYMOUS_PREFIXES)
        counts, bound = (self._anonymous, self._max) if anonymous else (self._identified, self._max_identified)
        key = (kind, source)
        count = counts.get(key)
        if count is None and len(counts) >= bound:
            key = (kind, OTHERS)
            count = counts.get(key)
        count = (count or 0) + 1
        counts[key] = count
        return count if count & (count - 1) == 0 else 0
