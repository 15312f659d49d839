"""Structured logs: one JSON object per line on stderr (journald keeps each line as one entry)."""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return json.dumps(entry, default=str, separators=(",", ":"))
        except (RecursionError, ValueError, TypeError):
            # A value that cannot be written (nested past the encoder's recursion limit, a circular one):
            # the record is still written, that value named instead. logging re-raises RecursionError out
            # of the caller's log call (round 63: a worker's READY nested 1,021 deep did so in the middle of
            # the supervisor's handling of it).
            return json.dumps({key: _writable(value) for key, value in entry.items()}, default=str, separators=(",", ":"))


def _writable(value: Any) -> Any:
    try:
        json.dumps(value, default=str)
    except (RecursionError, ValueError, TypeError) as exc:
        return f"<{type(value).__name__} not logged: {type(exc).__name__}>"
    return value


def configure_logging(level: str = "info") -> None:
    """Route every `openinfer.*` logger to stderr as JSON lines. Idempotent."""
    root = logging.getLogger("openinfer")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.propagate = False
