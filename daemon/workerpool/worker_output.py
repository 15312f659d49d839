"""What workers and the prepare helper write to stderr, logged as data tagged with the process.

A worker may be compromised: its output must never pass for the supervisor's own log lines. Each line
becomes one record of the `openinfer.worker.output` logger carrying the worker's id and pid; a line that
is a JSON object (the worker's own structured log) is nested under `record`, anything else is kept as
text under `line`. Lines are bounded in length and count per read, so a flood of output costs bounded
work per loop pass.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("openinfer.worker.output")

MAX_LINE = 8192  # characters kept of one line (a JSON record: as the log writes it)
MAX_DEPTH = 16  # a record nested deeper is kept as text: the log's encoder recurses too
MAX_PENDING = 64 * 1024  # bytes of an unfinished line kept before it is cut
_READ = 65536


class StderrRelay:
    def __init__(self, fd: int, source: dict[str, Any]) -> None:
        self.fd = fd
        self.source = source  # e.g. {"worker": 3, "pid": 1234, "model": "m:1"}
        self._pending = b""

    def pump(self, final: bool = False) -> bool:
        """Read what is there and log complete lines; False once the pipe is closed."""
        open_ = True
        for _ in range(16):  # bounded per call: the loop comes back while there is more
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
            self._pending += chunk
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                self._emit(line)
            if len(self._pending) > MAX_PENDING:
                self._emit(self._pending)
                self._pending = b""
        if (final or not open_) and self._pending:
            self._emit(self._pending)
            self._pending = b""
        return open_

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text:
            return
        extra: dict[str, Any] = dict(self.source)
        record = _json_object(text)
        if record is not None:
            extra["record"] = record
            level = logging.WARNING if record.get("level") in ("warning", "error", "critical") else logging.INFO
        else:
            extra["line"] = text[:MAX_LINE]
            level = logging.WARNING
        log.log(level, "worker output", extra=extra)


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
