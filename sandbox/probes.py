"""Attack a policy from the inside: each probe forks a child that applies the policy, then tries one
forbidden thing. What `openinfer sandbox check` runs and renders.

Forking is only safe from a process that has not imported onnxruntime or created a ZeroMQ context (the
CLI, the test runner). Children leave with os._exit and never return into the caller's code.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .loader import load_policy
from .policy import Policy
from .probe_catalog import Probe, ProbeTargets, probe_catalog
from .seccomp_filter import apply_policy

log = logging.getLogger("openinfer.sandbox")

ALLOWED = "allowed!"
_EXIT_SETUP_FAILED = 3


@dataclass(frozen=True)
class ProbeResult:
    """blocked: the attempt failed with an error (how = errno name) or the child died of SIGSYS (how = "SIGSYS")."""

    name: str
    blocked: bool
    how: str
    description: str = ""


def probe_names() -> list[str]:
    return [probe.name for probe in probe_catalog()]


def run_probes(policy: str = "worker", *, timeout_s: float = 10.0) -> list[ProbeResult]:
    """Run every probe against `policy` (a shipped name or a path), each in a fresh child."""
    loaded = load_policy(policy)  # fail fast, in the caller, on a bad policy
    with tempfile.TemporaryDirectory(prefix="openinfer-probe-") as scratch:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener_path = os.path.join(scratch, "listener.sock")
            listener.bind(listener_path)
            listener.listen(16)
            victim = os.path.join(scratch, "victim")
            with open(victim, "w"):
                pass
            targets = ProbeTargets(parent_pid=os.getpid(), scratch_dir=scratch, listener_path=listener_path, victim_file=victim)
            return [_run_in_child(probe, loaded, targets, timeout_s) for probe in probe_catalog()]
        finally:
            listener.close()


def all_blocked(results: Sequence[ProbeResult]) -> bool:
    return bool(results) and all(result.blocked for result in results)


def attempt_in_process(name: str) -> str:
    """Run one probe's attempt in *this* process (already sandboxed by the caller); returns the errno name
    or "allowed!". Under a killing policy this process dies of SIGSYS. Only probes that need no scratch
    directory or listener can run this way.
    """
    probe = next((p for p in probe_catalog() if p.name == name), None)
    if probe is None or probe.needs_scratch:
        raise ValueError(f"no in-process probe {name!r}")
    return _outcome(probe.prepare(ProbeTargets(parent_pid=os.getppid())))


def _outcome(attempt: object) -> str:
    assert callable(attempt)
    try:
        attempt()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return ALLOWED


def _run_in_child(probe: Probe, policy: Policy, targets: ProbeTargets, timeout_s: float) -> ProbeResult:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_end)
        code = _EXIT_SETUP_FAILED
        try:
            attempt = probe.prepare(targets)
            apply_policy(policy, constants={"SELF_PID": os.getpid()})
            os.write(write_end, _outcome(attempt).encode())
            code = 0
        except BaseException as exc:  # report anything, then leave without unwinding into the caller
            try:
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode()[:512])
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        status, output = _wait(pid, read_end, timeout_s)
    finally:
        os.close(read_end)
    return _judge(probe, status, output)


def _wait(pid: int, read_end: int, timeout_s: float) -> tuple[int | None, str]:
    """The child's wait status (None on timeout, after killing it) and everything it wrote."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    closed = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, b"".join(chunks).decode(errors="replace")
        if closed:
            time.sleep(0.002)  # the child closed the pipe: it is exiting, poll for its status
        elif select.select([read_end], [], [], min(remaining, 0.05))[0]:
            chunk = os.read(read_end, 4096)
            chunks.append(chunk)
            closed = not chunk
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            while not closed and select.select([read_end], [], [], 0)[0]:  # what it wrote just before exiting
                chunk = os.read(read_end, 4096)
                chunks.append(chunk)
                closed = not chunk
            return status, b"".join(chunks).decode(errors="replace")


def _judge(probe: Probe, status: int | None, output: str) -> ProbeResult:
    def result(blocked: bool, how: str) -> ProbeResult:
        return ProbeResult(probe.name, blocked, how, probe.description)

    if status is None:
        return result(False, f"timeout ({output or 'no output'})")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSYS:
            return result(True, "SIGSYS")
        return result(False, f"died of {signal.Signals(sig).name}")
    code = os.WEXITSTATUS(status)
    if code == _EXIT_SETUP_FAILED:
        log.warning("probe could not run", extra={"probe": probe.name, "error": output})
        return result(False, f"probe failed: {output}")
    if output in ("", ALLOWED):  # "" when exec replaced the child before it could report
        return result(False, ALLOWED)
    return result(True, output)
