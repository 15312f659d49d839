"""Starts worker processes fresh (exec, never fork of this process's state) with an empty environment."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from openinfer.daemon.worker.bootconfig import WorkerBootConfig

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


# The descriptors a worker finds at fixed numbers (the spawner puts them there; nothing else is open).
STATUS_FD = 3  # write end of the boot status pipe: one JSON line if boot fails (or the helper's report)
CHANNEL_FD = 4  # the worker's end of its socketpair with the supervisor: no one else can connect to it
DIRECT_FD = 5  # its listening socket for clients holding a lease (when it has a direct endpoint)
DEADLINE_FD = 6  # the page where it says when its direct run must be done (deadline_page.py)


@dataclass
class SpawnedProcess:
    process: subprocess.Popen[bytes]
    pidfd: int  # readable when the process exits: the supervisor's loop watches it
    status_fd: int  # read end of the boot status pipe
    stderr_fd: int  # read end of the worker's stderr: relayed as data tagged with the worker
    channel: socket.socket | None = None  # the supervisor's end of the worker's socketpair

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL through the pidfd, which names this process and no other: once it is reaped (its pidfd
        closed) nothing is sent - its pid may be another process's by then (round 64: a timer set at a hard
        stop SIGKILLed, as root, whatever had taken the pid of a worker reaped a second before)."""
        if self.pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for fd in (self.pidfd, self.status_fd, self.stderr_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pidfd = self.status_fd = self.stderr_fd = -1  # (a closed number may be reused by the next open)
        if self.channel is not None:
            self.channel.close()

    def read_report(self) -> dict[str, Any] | None:
        """The one JSON line the process wrote to its status pipe before exiting, if any: a flat map of
        scalars, else {"error": the line's text}. Never raises: a worker may be compromised, and this is read
        in the middle of handling its exit (round 66: a line nested 5,000 deep raised RecursionError out of
        the reaping - the dead worker stayed `busy` for good, its model got no replacement, and the daemon
        no longer stopped on SIGTERM)."""
        try:
            raw = os.read(self.status_fd, 65536)
        except OSError:
            return None
        if not raw:
            return None
        line = raw.split(b"\n", 1)[0].decode("utf-8", "replace")
        try:
            report = json.loads(line)
        except (ValueError, RecursionError):
            return {"error": line[:500]}
        if isinstance(report, dict) and all(value is None or isinstance(value, (str, int, float, bool)) for value in report.values()):
            return report
        return {"error": line[:500]}

    def read_status(self) -> str | None:
        """The boot failure the worker reported, if any (call after it exited)."""
        report = self.read_report()
        return None if report is None or "error" not in report else str(report["error"])


def spawn_worker(config: WorkerBootConfig, *, with_channel: bool = True, direct_fds: tuple[int, int] | None = None) -> SpawnedProcess:
    """Start a worker (or the prepare helper, without a channel) with only the descriptors it needs.

    stderr is a pipe, not an inherited file: the worker's RLIMIT_FSIZE would turn every log write into
    EFBIG on a regular file, and the supervisor logs what arrives as data tagged with the worker."""
    status_read, status_write = os.pipe()
    os.set_blocking(status_read, False)
    child_fds = [status_write]
    ours: socket.socket | None = None
    theirs: socket.socket | None = None
    if with_channel:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        child_fds.append(theirs.fileno())
    if direct_fds is not None:
        child_fds.extend(direct_fds)  # fds 5 and 6 in the worker
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _SHIM, ",".join(map(str, child_fds)), config.to_json()],
            env=dict(WORKER_ENV_BASE, OMP_NUM_THREADS=str(config.intra_op_threads)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
            pass_fds=tuple(child_fds),
            cwd="/",
        )
    except BaseException:
        if ours is not None:
            ours.close()
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
        if theirs is not None:
            theirs.close()
    assert process.stderr is not None
    stderr_fd = os.dup(process.stderr.fileno())
    process.stderr.close()
    os.set_blocking(stderr_fd, False)
    return SpawnedProcess(process=process, pidfd=os.pidfd_open(process.pid), status_fd=status_read, stderr_fd=stderr_fd, channel=ours)


# Puts the inherited descriptors at 3, 4, ... (STATUS_FD, CHANNEL_FD) and hands over to the boot
# sequence; runs before anything else imports.
_SHIM = (
    "import os,sys,fcntl\n"
    "fds=[int(f) for f in sys.argv[1].split(',')]\n"
    "high=[fcntl.fcntl(f,fcntl.F_DUPFD_CLOEXEC,16) for f in fds]\n"
    "for i,f in enumerate(high): os.dup2(f,3+i,inheritable=False)\n"
    "for f in set(fds+high)-set(range(3,3+len(fds))): os.close(f)\n"
    "from openinfer.daemon.worker.boot import main\n"
    "sys.exit(main([sys.argv[0], sys.argv[2]]))\n"
)
