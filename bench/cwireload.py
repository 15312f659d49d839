"""The C closed-loop load generator (bench/cwire/cwire.c) behind the interface of the Python pools.

The Python wire generator (wireload.py) costs ~20 us of CPU per request, on the same two cores as the
daemon and in the path of every request: at concurrency 16 a batch of 16 replies waits for the
generator to turn each one into the next request. cwire does the same protocol work in C (~5 us per
request), so the figures are the daemon's. One process, `c` requests in flight, each reply parsed as far
as its header (id, error code, timing). On ipc:// it sends them straight to the model's workers when the
daemon grants a lease (the direct path, PROTOCOL.md 17), else through one DEALER socket to the daemon's
socket (the front door); `path="front-door"` forces the latter, `path="direct"` refuses to run without
a lease. Each RunResult says which path it measured (`path`) and what the direct path did meanwhile
(`path_events`: leases taken, requests resent after an expired lease, GOAWAYs, worker connections lost).

`CWirePool` has the contract of wireload.WirePool: `prepare(address, c)`, `run(address, c, duration_s,
warmup_s) -> RunResult`, `pids`, `close()`. The binary is built with `make -C bench/cwire` on first use
(libzmq and msgpack-c development files, as for client/c, whose ZMTP link and lease code it compiles in).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from loadgen import RunResult, run_window

CWIRE_DIR = Path(__file__).resolve().parent / "cwire"
BINARY = CWIRE_DIR / "cwire"
CLIENT_C = CWIRE_DIR.parent.parent / "client" / "c"
SOURCES = (CWIRE_DIR / "cwire.c", CWIRE_DIR / "Makefile", *(CLIENT_C / name for name in ("zmtp_link.c", "zmtp_link.h", "lease.c", "lease.h", "openinfer.h")))
PATHS = ("auto", "direct", "front-door")


def build() -> Path:
    """Build (or rebuild when a source is newer) bench/cwire/cwire; raises with make's output on failure."""
    if BINARY.exists() and all(BINARY.stat().st_mtime >= source.stat().st_mtime for source in SOURCES):
        return BINARY
    if shutil.which("make") is None:
        raise RuntimeError("make not found: install build-essential (or use --generator wire)")
    done = subprocess.run(["make", "-C", str(CWIRE_DIR)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building bench/cwire failed (libzmq3-dev, libmsgpack-dev, pkg-config needed; or use --generator wire):\n{done.stdout}{done.stderr}")
    return BINARY


class CWirePool:
    def __init__(self, model: str, input_name: str, x: np.ndarray, path: str = "auto", distinct: bool = False) -> None:
        """`path`: "auto" (direct when the daemon grants a lease on ipc://), "direct" or "front-door".
        `distinct`: every request's input differs (its id in the first two values), e.g. to measure
        verdict-cache misses."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}")
        rows, cols = x.shape
        options = ([] if path == "auto" else [f"--{path}"]) + (["--distinct"] if distinct else [])
        self._process = subprocess.Popen([str(build()), *options, model, input_name, str(rows), str(cols)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._scratch = Path(tempfile.mkdtemp(prefix="cwire-"))
        self.paths: dict[str, str] = {}  # address -> the path cwire chose for it at prepare

    @property
    def pids(self) -> list[int]:
        return [self._process.pid]

    @property
    def size(self) -> int:
        return 1

    def _ask(self, command: str) -> str:
        """Send one command; the rest of its "ok" line (raises on "error ...")."""
        stdin, stdout = self._pipes()
        stdin.write(command + "\n")
        stdin.flush()
        answer = stdout.readline().strip()
        if answer != "ok" and not answer.startswith("ok "):
            raise RuntimeError(f"cwire: {command.split()[0]}: {answer or 'exited (status ' + str(self._process.poll()) + ')'}")
        return answer[3:]

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self._process.stdin is not None and self._process.stdout is not None
        return self._process.stdin, self._process.stdout

    def prepare(self, address: str, concurrency: int) -> None:
        self.paths[address] = self._ask(f"prepare {address}")

    def run(self, address: str, concurrency: int, duration_s: float, warmup_s: float) -> RunResult:
        self.prepare(address, concurrency)
        start_ns, measure_ns, end_ns = run_window(duration_s, warmup_s)
        path = self._scratch / "run.bin"
        self._ask(f"run {address} {concurrency} {start_ns} {measure_ns} {end_ns} {path}")
        latencies, stages, errors, used, events = read_results(path.read_bytes())
        return RunResult(concurrency, (end_ns - measure_ns) / 1e9, latencies, stages, errors, used, events)

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                stdin, _ = self._pipes()
                stdin.write("quit\n")
                stdin.flush()
                self._process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> "CWirePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_results(raw: bytes) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int], str, dict[str, int]]:
    """Parse cwire's results file (layout: write_results in cwire.c): latencies, stages, errors by code,
    the path ("direct" or "front-door") and the direct path's events."""
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        values = struct.unpack_from(fmt, raw, offset)
        offset += struct.calcsize(fmt)
        return values[0]

    def text() -> str:
        nonlocal offset
        length = take("<I")
        value = raw[offset : offset + length].decode()
        offset += length
        return value

    def array(dtype: str) -> np.ndarray:
        nonlocal offset
        count = take("<Q")
        values = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).copy()
        offset += count * 8
        return values

    latencies = array("<i8")
    stages = {}
    for _ in range(take("<I")):
        name = text()
        stages[name] = array("<f8")
    errors = {}
    for _ in range(take("<I")):
        code = text()
        errors[code] = take("<Q")
    used = text()
    events = {}
    for _ in range(take("<I")):
        name = text()
        events[name] = take("<Q")
    if offset != len(raw):
        raise ValueError(f"cwire results: {len(raw) - offset} bytes left over")
    return latencies, stages, errors, used, events
