"""Drive tests/sandbox/sandbox_workload.py as a real, separately spawned worker over a socketpair
(ZMTP framing, like the daemon's worker channel).

The test process never imports onnxruntime or creates a ZeroMQ context, so it stays safe to fork from for
the probe tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import select
import socket
import time

import numpy as np

from openinfer.wire.zmtp import FrameStream, Limits, PeerClosed

WORKLOAD = Path(__file__).resolve().parent / "sandbox_workload.py"


class WorkerDied(Exception):
    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"worker exited with {returncode}")
        self.returncode = returncode


class WorkloadProcess:
    """One worker-like subprocess: boot policy, session, channel, serve policy, then request/reply."""

    def __init__(
        self,
        workdir: Path,
        model: str,
        *,
        threads: int = 1,
        boot_policy: str = "boot",
        serve_policy: str = "worker",
        memory_limit_mb: int = 0,
        isolate: bool = False,
    ) -> None:
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(exist_ok=True)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.channel = FrameStream(ours, Limits(frames=1 << 16, first_frame=1 << 30, message_bytes=1 << 40))
        self._pending: list[Any] = []
        self.env = {
            "ORT_DISABLE_TELEMETRY": "1",
            "HOME": str(self.home),
            "PATH": "/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "LANG": "C.UTF-8",
        }
        command = [sys.executable, "-I", str(WORKLOAD), "--model", model, "--channel-fd", str(theirs.fileno()), "--threads", str(threads),
                   "--boot-policy", boot_policy, "--serve-policy", serve_policy, "--memory-limit-mb", str(memory_limit_mb)]
        if isolate:
            command.append("--isolate")
        self.process = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(theirs.fileno(),))
        theirs.close()
        self.started = False
        self.ready_status: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout_s: float = 30.0) -> WorkloadProcess:
        kind, _ = self._receive(timeout_s)
        assert kind == b"hello", kind
        self.started = True
        self._send([b"ack"])
        kind, status = self._receive(timeout_s)
        assert kind == b"ready", kind
        self.ready_status = json.loads(status)
        return self

    def call(self, *frames: Any, timeout_s: float = 30.0) -> list[bytes]:  # bytes or buffers (ndarrays)
        self._send(list(frames))
        return self._receive(timeout_s)

    def _send(self, frames: list[Any]) -> None:
        self.channel.send([f if isinstance(f, bytes) else memoryview(np.ascontiguousarray(f)).cast("B") for f in frames])
        poller = select.poll()
        poller.register(self.channel.sock.fileno(), select.POLLOUT)
        while self.channel.out_bytes:
            if self.process.poll() is not None:
                raise WorkerDied(self.process.returncode)
            poller.poll(100)
            self.channel.flush()

    def run(self, x: np.ndarray, img: np.ndarray) -> dict[str, np.ndarray]:
        spec = {"inputs": {"x": ["float32", list(x.shape)], "img": ["float32", list(img.shape)]}}
        reply = self.call(b"run", json.dumps(spec).encode(), np.ascontiguousarray(x), np.ascontiguousarray(img))
        assert reply[0] == b"ok", reply[:2]
        shapes = json.loads(reply[1])
        return {name: np.frombuffer(data, np.float32).reshape(shape) for (name, shape), data in zip(shapes.items(), reply[2:])}

    def attempt(self, probe: str) -> str:
        reply = self.call(b"attempt", json.dumps({"probe": probe}).encode())
        assert reply[0] == b"ok", reply
        return str(json.loads(reply[1])["how"])

    def threads_from_outside(self) -> dict[str, dict[str, str]]:
        """Seccomp/NoNewPrivs of every thread, read by this (unsandboxed) process from /proc/PID/task."""
        states: dict[str, dict[str, str]] = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with open(f"/proc/{self.pid}/task/{tid}/status") as status:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
            states[tid] = {k: fields[k].strip() for k in ("Name", "Seccomp", "NoNewPrivs")}
        return states

    def wait_exit(self, timeout_s: float = 15.0) -> int:
        return self.process.wait(timeout_s)

    def close(self) -> str:
        """Stop the worker (QUIT, then SIGKILL) and return its stderr."""
        if self.process.poll() is None and self.started:
            try:
                self.call(b"quit", timeout_s=5)
            except (WorkerDied, TimeoutError):
                pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _, stderr = self.process.communicate()
        self.channel.close()
        return stderr.decode(errors="replace")

    def __enter__(self) -> WorkloadProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self, timeout_s: float) -> list[bytes]:
        poller = select.poll()
        poller.register(self.channel.sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._pending:
                return [bytes(f) for f in self._pending.pop(0)]
            if poller.poll(100):
                try:
                    self._pending.extend(self.channel.read())
                    continue
                except PeerClosed:  # the worker's end is closed: it exited (or is exiting)
                    self.process.wait(10)
            if self.process.poll() is not None:
                raise WorkerDied(self.process.returncode)
        raise TimeoutError(f"no reply from worker within {timeout_s}s")
