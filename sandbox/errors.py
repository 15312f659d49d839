"""The sandbox layer's two exceptions: one for anything that failed to isolate the process, one for bad policy files."""
from __future__ import annotations

import os


class SandboxError(Exception):
    """A mandatory isolation step failed; the caller must not go on to run untrusted work."""


class PolicyError(SandboxError):
    """A policy file is malformed or refers to something unknown.

    The message starts with `FILE:LINE:` so editors and CI logs can jump to it; `path` and `line` carry the
    same information for programs (line is None when the problem is not tied to one line).
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
