"""What workers and the prepare helper write to stderr, logged as data tagged with the process.

A worker may be compromised: its output must never pass for the supervisor's own log lines. Each line
becomes one record of the `openinfer.worker.output` logger carrying the worker's id and pid; a line that
is a JSON object (the worker's own structured log) is nested under `record`, anything else is kept as
text under `line`. Lines are bounded in length; reads are bounded per loop pass; and what is logged is
bounded by a budget per process (OUTPUT_BYTES_PER_S, a burst of OUTPUT_BURST_BYTES: a crash's traceback fits),
past which lines are counted, not logged, and the count is logged once a second (round 63: a worker writing
"a\n" without pause became 82,000 log records a second, 13 MB of log, and one read of 64 KiB - 32,768
lines - held the supervisor's loop for seconds: other clients' requests waited up to 11.8 s).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

log = logging.getLogger("openinfer.worker.output")

MAX_LINE = 8192  # characters kept of one line (a JSON record: as the log writes it)
MAX_DEPTH = 16  # a record nested deeper is kept as text: the log's encoder recurses too
MAX_PENDING = 64 * 1024  # bytes of an unfinished line kept before it is cut
_READS = 4  # of _READ bytes per pump: the loop comes back while there is more
_READ = 65536
OUTPUT_BYTES_PER_S = 16 * 1024  # what one process's output may add to the log, sustained
OUTPUT_BURST_BYTES = 256 * 1024  # and at once
MIN_LINE_COST = 128  # a line costs at least this much of the budget: <= 128 lines/s
RECORD_BYTES = 120  # what the log writes around a line besides the source's fields: time, level, logger, msg, key
DROPPED_REPORT_NS = 1_000_000_000  # lines dropped are reported at most this often


class OutputBudget:
    """What a model's processes may add to the log: OUTPUT_BYTES_PER_S, a burst of OUTPUT_BURST_BYTES, in
    bytes as the log writes them. One per model version, shared by its workers and their replacements and
    its prepare helper (round 64: a budget per process gave every respawned worker a fresh burst - a step
    writing 256 KiB then exiting, one good request between to keep the crash count at zero: 2-3 MB/s)."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._left = float(OUTPUT_BURST_BYTES)
        self._at_ns = clock()

    def refill(self) -> None:
        now = self._clock()
        self._left = min(OUTPUT_BURST_BYTES, self._left + (now - self._at_ns) * OUTPUT_BYTES_PER_S / 1e9)
        self._at_ns = now

    def take(self, cost: int) -> bool:
        if cost > self._left:
            return False
        self._left -= cost
        return True


class StderrRelay:
    def __init__(self, fd: int, source: dict[str, Any], budget: OutputBudget | None = None, call_at: Callable[[int, Callable[[], None]], object] | None = None, clock: Callable[[], int] = time.monotonic_ns) -> None:
        """`budget`: the model's (a fresh one if None); `call_at(when_ns, callback)` (the loop's timers):
        lines dropped after the last report are reported DROPPED_REPORT_NS later, also when the process
        writes nothing more."""
        self.fd = fd
        self.source = source  # e.g. {"worker": 3, "pid": 1234, "model": "m:1"}
        self.budget = budget if budget is not None else OutputBudget(clock)
        # Charged with every line: the record it is written in (round 66: uncounted, 126-character lines
        # came to 2.3 times the budget in the log).
        self._envelope = RECORD_BYTES + len(json.dumps(source, separators=(",", ":")))
        self._call_at = call_at
        self._clock = clock
        self._pending = b""
        self._report_due = False
        self.dropped = 0  # lines not logged since the last report
        self._reported_ns: int | None = None

    def pump(self, final: bool = False) -> bool:
        """Read what is there (at most _READS reads) and log complete lines within the budget; False once the
        pipe is closed."""
        open_ = True
        for _ in range(_READS):
            try:
                chunk = os.read(self.fd, _READ)
            except BlockingIOError:
                break
            except OSError:
                open_ = False
                break
            if not chunk:
                open_ = False
                break
            self._take(chunk)
        if (final or not open_) and self._pending:
            self._log_lines([self._pending])
            self._pending = b""
        self._report_dropped(final or not open_)
        return open_

    def _take(self, chunk: bytes) -> None:
        data = self._pending + chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._pending = data
        else:
            self._pending = data[end + 1 :]
            self._log_lines(_LinesOf(data, end))
        if len(self._pending) > MAX_PENDING:
            self._log_lines([self._pending])
            self._pending = b""

    def _log_lines(self, lines: "_LinesOf | list[bytes]") -> None:
        """Each line while the budget lasts, at what it costs written to the log (round 64: charged its raw
        length, a line of invalid UTF-8 or control bytes was written six times longer, as \\u escapes);
        the rest only counted, never split into lines: a flood costs a count of its newlines. An empty
        line is charged too: a flood of them is not looked at one by one past the budget."""
        self.budget.refill()
        for line in lines:
            level, extra, cost = _entry(line, self.source)
            if not self.budget.take(max(cost + self._envelope, MIN_LINE_COST)):
                self.dropped += 1 + (lines.count_rest() if isinstance(lines, _LinesOf) else 0)
                return
            if extra is not None:
                log.log(level, "worker output", extra=extra)

    def _report_dropped(self, final: bool) -> None:
        if not self.dropped:
            return
        now = self._clock()
        if final or self._reported_ns is None or now - self._reported_ns >= DROPPED_REPORT_NS:
            log.warning("worker output dropped: over its budget", extra={**self.source, "lines": self.dropped, "budget_bytes_per_s": OUTPUT_BYTES_PER_S})
            self.dropped = 0
            self._reported_ns = now
        elif self._call_at is not None and not self._report_due:
            self._report_due = True
            self._call_at(self._reported_ns + DROPPED_REPORT_NS, self._report_later)

    def _report_later(self) -> None:
        self._report_due = False
        self._report_dropped(False)


def _entry(raw: bytes, source: dict[str, Any]) -> tuple[int, dict[str, Any] | None, int]:
    """(level, the record's fields or None for an empty line, its length as the log writes it)."""
    text = raw.decode("utf-8", "replace").rstrip("\r")
    if not text:
        return logging.INFO, None, 0
    extra: dict[str, Any] = dict(source)
    record = _json_object(text)
    if record is not None:
        extra["record"] = record
        level = logging.WARNING if record.get("level") in ("warning", "error", "critical") else logging.INFO
        return level, extra, len(json.dumps(record, separators=(",", ":")))
    extra["line"] = text[:MAX_LINE]
    if len(text) > MAX_LINE:
        extra["cut_chars"] = len(text) - MAX_LINE  # (a line is written MAX_LINE characters at most)
    return logging.WARNING, extra, len(json.dumps(extra["line"]))


class _LinesOf:
    """The complete lines of data[:end], one at a time; what is left uncounted can be counted at once."""

    def __init__(self, data: bytes, end: int) -> None:
        self._data, self._end, self._at = data, end, 0

    def __iter__(self) -> "_LinesOf":
        return self

    def __next__(self) -> bytes:
        if self._at > self._end:
            raise StopIteration
        newline = self._data.find(b"\n", self._at, self._end)
        stop = self._end if newline < 0 else newline
        line, self._at = self._data[self._at : stop], stop + 1
        return line

    def count_rest(self) -> int:
        rest = 0 if self._at > self._end else self._data.count(b"\n", self._at, self._end) + 1
        self._at = self._end + 1
        return rest


def _json_object(text: str) -> dict[str, Any] | None:
    """The worker's own structured log line, or None: the line is then kept as text (cut to MAX_LINE).
    A record is kept only if it is written back (as the log does) in MAX_LINE characters and nested at
    most MAX_DEPTH deep, and nothing the parser raises on hostile input escapes: a line nested 100 000
    deep raised RecursionError out of the relay, and the worker's lines after it in the same read were
    never logged; a 60 KB record was logged whole."""
    if not text.startswith("{") or len(text) > MAX_LINE:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or not _nested_within(record, MAX_DEPTH):
            return None
        if len(json.dumps(record, separators=(",", ":"))) > MAX_LINE:  # \u escapes make it longer
            return None
    except (ValueError, RecursionError):
        return None
    return record


def _nested_within(value: Any, depth: int) -> bool:
    """Whether `value` nests lists and objects at most `depth` deep (without recursing itself)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > depth:
                return False
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True
