"""Starts worker processes fresh (exec, never fork of this process's state) with an empty environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from .worker.bootconfig import WorkerBootConfig

# What a worker's environment holds; nothing is inherited from the supervisor.
WORKER_ENV_BASE: dict[str, str] = {
    "ORT_DISABLE_TELEMETRY": "1",  # onnxruntime phones home by default (DESIGN §4)
    "LANG": "C.UTF-8",
    "HOME": "/nonexistent",
    "PYTHONHASHSEED": "random",
    # One BLAS thread: threads before unshare() break user namespaces, and onnxruntime has its own pool.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    # Keep big tensor buffers in the heap and reuse them: fresh mmaps cost ~2.9 ms per 4 MiB here (DESIGN §5).
    "MALLOC_MMAP_THRESHOLD_": str(64 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(128 * 1024 * 1024),
}


@dataclass
class SpawnedProcess:
    process: subprocess.Popen[bytes]
    pidfd: int  # readable when the process exits: the supervisor's poller watches it
    status_fd: int  # read end of the boot status pipe
    stderr_fd: int  # read end of the worker's stderr: the supervisor relays its JSON lines to its own stderr

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        self.relay_stderr()
        for fd in (self.pidfd, self.status_fd, self.stderr_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def relay_stderr(self) -> None:
        """Copy what the worker logged to our stderr. A pipe, not an inherited file, because the worker's
        RLIMIT_FSIZE would turn every log write into EFBIG if stderr were a regular file."""
        while True:
            try:
                chunk = os.read(self.stderr_fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            try:
                os.write(2, chunk)
            except OSError:
                return

    def read_report(self) -> dict[str, Any] | None:
        """The one JSON line the process wrote to its status pipe before exiting, if any."""
        try:
            raw = os.read(self.status_fd, 1 << 20)
        except (BlockingIOError, OSError):
            return None
        if not raw:
            return None
        try:
            report = json.loads(raw.decode().splitlines()[0])
        except (ValueError, IndexError):
            return {"error": raw.decode(errors="replace")[:500]}
        return report if isinstance(report, dict) else {"error": str(report)[:500]}

    def read_status(self) -> str | None:
        """The boot failure the worker reported, if any (call after it exited)."""
        report = self.read_report()
        return None if report is None or "error" not in report else str(report["error"])


def spawn_worker(config: WorkerBootConfig) -> SpawnedProcess:
    status_read, status_write = os.pipe()
    os.set_blocking(status_read, False)
    try:
        # The worker expects the status pipe as fd 3: dup it there in the child via pass_fds + a shim.
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _SHIM, str(status_write), config.to_json()],
            env=dict(WORKER_ENV_BASE, OMP_NUM_THREADS=str(config.intra_op_threads)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # relayed line by line to the supervisor's stderr (journald)
            close_fds=True,
            pass_fds=(status_write,),
            cwd="/",
        )
    finally:
        os.close(status_write)
    assert process.stderr is not None
    stderr_fd = os.dup(process.stderr.fileno())
    process.stderr.close()
    os.set_blocking(stderr_fd, False)
    return SpawnedProcess(process=process, pidfd=os.pidfd_open(process.pid), status_fd=status_read, stderr_fd=stderr_fd)


# Moves the status pipe to fd 3 and hands over to the boot sequence; runs before anything else imports.
_SHIM = (
    "import os,sys\n"
    "fd=int(sys.argv[1])\n"
    "if fd!=3:\n os.dup2(fd,3,inheritable=False); os.close(fd)\n"
    "from openinfer.daemon.worker.boot import main\n"
    "sys.exit(main([sys.argv[0], sys.argv[2]]))\n"
)
