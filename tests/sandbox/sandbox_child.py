"""Run a function in a forked child, optionally under a seccomp policy, and report how it ended.

The child never returns into pytest: whatever happens it leaves through os._exit. The function's return
value travels back as JSON over a pipe; a child killed by the filter shows up as signal SIGSYS.
"""
from __future__ import annotations

import errno
import gc
import json
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChildOutcome:
    value: Any  # what the function returned (JSON round-tripped); None if it never reported
    signal: int | None  # the signal that killed the child, if any
    exit_code: int | None
    error: str | None = None  # an exception that escaped the function

    @property
    def killed_by_sigsys(self) -> bool:
        return self.signal == signal.SIGSYS

    @property
    def blocked(self) -> bool:
        """The attacker's view: the attempt failed (an errno) or the process died of SIGSYS."""
        return self.killed_by_sigsys or (isinstance(self.value, str) and self.value in errno.errorcode.values())


def errno_name(action: Callable[[], object]) -> str:
    """Run `action`; "ok" if it worked, else the errno name of the OSError it raised."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def run_in_child(
    function: Callable[[], Any],
    *,
    policy: str | None = None,
    prepare: Callable[[], object] | None = None,
    timeout_s: float = 15.0,
) -> ChildOutcome:
    """fork; in the child run `prepare`, apply `policy` (if any), run `function`; report back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        gc.freeze()  # nothing inherited is collected here (tests/other_uid.py call_as: a deadlock in onnxruntime's destructor)
        try:
            os.close(read_end)
            if prepare is not None:
                prepare()
            if policy is not None:
                from openinfer.sandbox import apply_policy

                apply_policy(policy)
            try:
                report: dict[str, Any] = {"value": function()}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                report = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(report).encode())
        except BaseException as exc:  # noqa: BLE001
            try:
                os.write(write_end, json.dumps({"error": f"setup: {type(exc).__name__}: {exc}"}).encode())
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        return _collect(pid, read_end, timeout_s)
    finally:
        os.close(read_end)


def _collect(pid: int, read_end: int, timeout_s: float) -> ChildOutcome:
    deadline = time.monotonic() + timeout_s
    data = b""
    closed = False
    while True:
        if closed:
            time.sleep(0.002)  # the child closed its end: it is exiting
        elif select.select([read_end], [], [], 0.02)[0]:
            chunk = os.read(read_end, 65536)
            data += chunk
            closed = not chunk
            if chunk:
                continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            while not closed and select.select([read_end], [], [], 0)[0]:
                chunk = os.read(read_end, 65536)
                data += chunk
                closed = not chunk
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError("sandboxed child did not finish")
    report = json.loads(data) if data else {}
    return ChildOutcome(
        value=report.get("value"),
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        error=report.get("error"),
    )
