"""The HTTP side of bench/peers.py: FastAPI+uvicorn in a subprocess, and wrk driving it.

`UvicornServer` runs bench/peers_app.py as a user would deploy it (`uvicorn --workers N --loop uvloop
--http httptools`, access log off as OpenInfer's is by default) on 127.0.0.1 and a free port, and is
ready when every worker logged its startup and a POST came back with the model's output. `Wrk` runs
`wrk -t1 -cC` with bench/peers_post.lua (raw float32 body) and returns the run's figures: wrk keeps an
HDR histogram in microseconds and prints its percentiles through the script's `done()`; it has no
warm-up of its own, so `prepare` runs it for a second the first time each URL is seen.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "peers_post.lua"
BODY = b"\x00\x00\x80\x3f" * 64  # x = ones FP32[1, 64], as peers_post.lua and bench/cwire send
WRK_WARMUP_S = 1


class ServerNotReady(RuntimeError):
    """uvicorn exited or did not come up in time; the message holds its log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UvicornServer:
    """`uvicorn peers_app:app --workers N` in its own session; `pids()` = the parent and its workers."""

    def __init__(self, workdir: Path, workers: int = 2, model: Path | None = None) -> None:
        self.workers = workers
        self.port = free_port()
        self.log_path = workdir / "uvicorn.log"
        self.command = [
            sys.executable, "-m", "uvicorn", "peers_app:app", "--app-dir", str(BENCH_DIR), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
        ]
        self._env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", **({"PEERS_MODEL": str(model)} if model else {})}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/infer"

    def start(self, timeout: float = 60.0) -> "UvicornServer":
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerNotReady(f"uvicorn exited with status {self._process.returncode}: {self.log_tail()}")
            if self.log_path.read_text(errors="replace").count("Application startup complete.") >= self.workers and self._answers():
                return
            time.sleep(0.05)
        raise ServerNotReady(f"uvicorn not ready after {timeout:.0f} s: {self.log_tail()}")

    def _answers(self) -> bool:
        request = urllib.request.Request(self.url, data=BODY, headers={"Content-Type": "application/octet-stream"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200 and len(response.read()) == len(BODY)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        import psutil

        if self._process is None:
            return []
        try:
            parent = psutil.Process(self._process.pid)
            return [parent.pid, *(child.pid for child in parent.children(recursive=True))]
        except psutil.Error:
            return []

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to uvicorn's process group (it stops its workers), SIGKILL to the group if it lingers."""
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()


class Wrk:
    """wrk, one thread, `c` connections; each `run` is one wrk process of `duration` whole seconds."""

    def __init__(self) -> None:
        binary = shutil.which("wrk")
        if binary is None:
            raise RuntimeError("wrk not found: `apt-get install wrk` (bash examples/bootstrap.sh bench does it as root)")
        self.binary = binary
        self._warmed: set[str] = set()

    def prepare(self, url: str, concurrency: int) -> None:
        if url not in self._warmed:
            self._wrk(url, concurrency, WRK_WARMUP_S)
            self._warmed.add(url)

    def run(self, url: str, concurrency: int, duration_s: float) -> dict[str, Any]:
        """The run's figures (latency percentiles in us, requests, errors) plus `cpu_s`, wrk's own CPU."""
        self.prepare(url, concurrency)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        figures = self._wrk(url, concurrency, max(1, round(duration_s)))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        figures["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return figures

    def _wrk(self, url: str, concurrency: int, seconds: int) -> dict[str, Any]:
        args = [self.binary, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(LUA_SCRIPT), url]
        done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30)
        for line in done.stdout.splitlines():
            if line.startswith("PEERS_JSON "):
                return dict(json.loads(line[len("PEERS_JSON "):]))
        raise RuntimeError(f"wrk printed no figures (status {done.returncode}): {done.stdout[-400:]}{done.stderr[-400:]}")

    def close(self) -> None:
        pass
