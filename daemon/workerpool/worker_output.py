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

MAX_LINE = 8192  # characters kept of one line
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
        record: Any = None
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:
                record = None
        if isinstance(record, dict):
            extra["record"] = record
            level = logging.WARNING if record.get("level") in ("warning", "error", "critical") else logging.INFO
        else:
            extra["line"] = text[:MAX_LINE]
            level = logging.WARNING
        log.log(level, "worker output", extra=extra)
