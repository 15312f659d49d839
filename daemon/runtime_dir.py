"""A per-instance private directory for the worker channel (and prepared weights), removed at exit and
swept at the next start if a SIGKILLed supervisor left it behind."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil

log = logging.getLogger("openinfer.supervisor")
PREFIX = "instance-"


def base_runtime_dir(configured: str) -> Path:
    if configured:
        return Path(configured)
    if os.environ.get("RUNTIME_DIRECTORY"):  # systemd's RuntimeDirectory=
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    return Path(tempfile.gettempdir()) / f"openinfer-{os.geteuid()}"


def sweep_stale(base: Path) -> list[Path]:
    """Remove instance directories whose supervisor is gone."""
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    for child in base.iterdir():
        if not child.name.startswith(PREFIX):
            continue
        try:
            pid = int(child.name[len(PREFIX) :])
        except ValueError:
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        log.info("removed stale runtime directories", extra={"paths": [str(p) for p in removed]})
    return removed


def create_instance_dir(base: Path, worker_gid: int | None) -> Path:
    base.mkdir(mode=0o711, parents=True, exist_ok=True)
    sweep_stale(base)
    path = base / f"{PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    if worker_gid is not None:  # workers run as another uid and must reach the channel socket
        os.chown(path, -1, worker_gid)
        os.chmod(path, 0o710)
    return path
