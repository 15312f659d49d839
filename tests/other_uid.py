"""Run client code as another uid, for attacks "as another local user".

`setpriv --reuid=65534 python ...` cannot work here: the interpreter and the venv live under /root, which
other users cannot read. So the child starts as root, imports what it needs, then drops to the target
uid/gid (no supplementary groups) before it opens any connection: the kernel records the credentials of
the process at connect() time (SO_PEERCRED), which is what the daemon sees.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

NOBODY = 65534
TESTS_DIR = Path(__file__).resolve().parent

_PRELUDE = """
import os, sys
sys.path.insert(0, {tests!r})
import json, socket, time
import numpy as np
import zmq
import msgpack
from openinfer.client import Client, AsyncClient, OpenInferError
from openinfer.wire import zmtp
_uid = {uid}
os.setgroups([])
os.setresgid(_uid, _uid, _uid)
os.setresuid(_uid, _uid, _uid)
assert os.getuid() == _uid
"""


def _command(uid: int, code: str, args: tuple[str, ...]) -> list[str]:
    script = _PRELUDE.format(tests=str(TESTS_DIR), uid=uid) + textwrap.dedent(code)
    return [sys.executable, "-c", script, *args]


def run_as(uid: int, code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `code` as `uid` to completion; stdout/stderr captured as text."""
    return subprocess.run(_command(uid, code, args), capture_output=True, text=True, timeout=timeout)


def start_as(uid: int, code: str, *args: str) -> subprocess.Popen[str]:
    """Start `code` as `uid` in the background (stdin, stdout and stderr piped, as text)."""
    return subprocess.Popen(_command(uid, code, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def call_as(uid: int, call: Callable[[], Any], gid: int | None = None, groups: tuple[int, ...] = ()) -> Any:
    """Fork, drop to `uid` (primary group `gid`, default the uid's number; supplementary `groups`: the
    kernel records them at connect, SO_PEERGROUPS), run `call()` and return its JSON-able result; what it
    raised is raised here as an AssertionError naming it. For code already imported in this process.
    The child keeps the garbage collector off what it inherited (gc.freeze): a collection there once ran
    the destructor of an onnxruntime session an earlier test of this process had left, which waited
    forever on a lock of a thread pool that does not exist after the fork (the full suite hung 20 min)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        gc.freeze()
        try:
            os.close(read_fd)
            os.setgroups(list(groups))
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            os.write(write_fd, json.dumps({"result": call()}).encode())
        except BaseException as exc:  # noqa: BLE001
            os.write(write_fd, json.dumps({"raised": repr(exc)}).encode())
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 1 << 20):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    outcome = json.loads(data)
    assert "raised" not in outcome, f"as uid {uid}: {outcome['raised']}"
    return outcome["result"]
