"""The supervisor's side of shared weights: where prepared directories live and how they come into place.

Prepared directories are written by a sandboxed helper into a private temporary directory, then renamed
into `<cache>/<key>` here and made read-only for everyone. A directory that failed verification is renamed
aside, never rewritten: workers that still map its files keep valid pages.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("openinfer.supervisor")


class PreparedStore:
    def __init__(self, base: Path, worker_uid: int | None) -> None:
        self.base = base
        self.worker_uid = worker_uid
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        self.sweep()

    def sweep(self) -> None:
        """Remove what an interrupted run left: temporary and retired directories."""
        for child in self.base.iterdir():
            if child.name.startswith((".tmp-", ".stale-")):
                shutil.rmtree(child, ignore_errors=True)

    def new_tmp_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.base))
        if self.worker_uid is not None:
            os.chown(path, self.worker_uid, -1)  # the helper runs as the worker user and writes here
        return path

    def finalize(self, tmp: Path, key: str, reused: bool) -> Path:
        final = self.base / key
        if reused:
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():
            self.discard(key)
        for path in [tmp, *tmp.iterdir()]:
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.rename(tmp, final)
        return final

    def discard(self, key: str) -> None:
        final = self.base / key
        if final.exists():
            os.rename(final, self.base / f".stale-{key}-{time.monotonic_ns()}")
            log.warning("prepared weights retired", extra={"key": key})
