"""A per-instance private directory for the worker channel (and prepared weights), removed at exit and
swept at the next start if a SIGKILLed supervisor left it behind.

The base it lives in is verified before use (daemon/files/private_dir.py): it belongs to the daemon's user, nobody
else may write to it, it is not a symlink. Inside, everything goes through descriptors.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil

from .private_dir import open_private_dir

log = logging.getLogger("openinfer.supervisor")
PREFIX = "instance-"
WORK_DIR = "cwd"  # inside the instance directory: empty, where workers run (no relative path finds anything)
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def base_runtime_dir(configured: str) -> Path:
    """server.runtime_dir; else systemd's $RUNTIME_DIRECTORY; else $TMPDIR/openinfer-<euid> (verified like
    the others when it is opened: anyone may have created it first)."""
    if configured:
        return Path(configured)
    if os.environ.get("RUNTIME_DIRECTORY"):  # systemd's RuntimeDirectory=
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    return Path(tempfile.gettempdir()) / f"openinfer-{os.geteuid()}"


def sweep_stale(base_fd: int, base: Path) -> list[str]:
    """Remove instance directories whose supervisor is gone."""
    removed: list[str] = []
    for child in os.scandir(base_fd):
        if not child.name.startswith(PREFIX):
            continue
        try:
            pid = int(child.name[len(PREFIX) :])
        except ValueError:
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid):
            shutil.rmtree(child.name, dir_fd=base_fd, ignore_errors=True)
            removed.append(child.name)
    if removed:
        log.info("removed stale runtime directories", extra={"base": str(base), "paths": removed})
    return removed


def create_instance_dir(base: Path, worker_gid: int | None) -> Path:
    """`<base>/instance-<pid>` (0700, or 0710 with the workers' group), holding the empty WORK_DIR.
    Raises private_dir.UnsafeDirectory when `base` cannot be trusted."""
    base_fd = open_private_dir(base, 0o711, "runtime directory")
    try:
        sweep_stale(base_fd, base)
        name = f"{PREFIX}{os.getpid()}"
        shutil.rmtree(name, dir_fd=base_fd, ignore_errors=True)
        os.mkdir(name, 0o700, dir_fd=base_fd)
        instance_fd = os.open(name, _OPEN_DIR, dir_fd=base_fd)
        try:
            if worker_gid is not None:  # workers run as another uid and must reach the channel socket
                os.fchown(instance_fd, -1, worker_gid)
                os.fchmod(instance_fd, 0o710)
            os.mkdir(WORK_DIR, 0o500, dir_fd=instance_fd)
            work_fd = os.open(WORK_DIR, _OPEN_DIR, dir_fd=instance_fd)
            try:
                os.fchmod(work_fd, 0o555)  # enterable by the workers, writable by nobody, whatever the umask
            finally:
                os.close(work_fd)
        finally:
            os.close(instance_fd)
    finally:
        os.close(base_fd)
    return base / name
