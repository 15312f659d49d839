"""Run client code as another uid, for attacks "as another local user".

`setpriv --reuid=65534 python ...` cannot work here: the interpreter and the venv live under /root, which
other users cannot read. So the child starts as root, imports what it needs, then drops to the target
uid/gid (no supplementary groups) before it opens any connection: the kernel records the credentials of
the process at connect() time (SO_PEERCRED), which is what the daemon sees.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
