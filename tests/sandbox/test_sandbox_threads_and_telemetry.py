"""TSYNC reaches threads that existed before the policy; onnxruntime's telemetry stays off.

Both need onnxruntime, so each runs in a freshly spawned interpreter.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

THREADED_SCRIPT = r"""
import os, sys, threading
import numpy as np
import onnxruntime as ort
import zmq
from openinfer.sandbox import apply_policy

stop = threading.Event()
helpers = [threading.Thread(target=stop.wait, name=f"helper-{i}") for i in range(3)]
for thread in helpers:
    thread.start()
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], sess_options=options, providers=["CPUExecutionProvider"])
feed = {"x": np.ones((2, 64), np.float32), "img": np.ones((1, 3, 8, 8), np.float32)}
before = session.run(None, feed)[0]
context = zmq.Context(io_threads=1)
channel = context.socket(zmq.PAIR)
apply_policy("worker")
sys.stdout.write("applied\n"); sys.stdout.flush()
sys.stdin.readline()
stop.set()
for thread in helpers:
    thread.join()
after = session.run(None, feed)[0]
sys.stdout.write("same\n" if np.array_equal(before, after) else "different\n"); sys.stdout.flush()
channel.close(linger=0)
context.term()
"""

TELEMETRY_SCRIPT = r"""
import sys
if sys.argv[2] == "isolate":  # the control phones home: keep it inside a network namespace
    from openinfer.sandbox import hardening
    assert hardening.enter_namespaces()
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
session.run(None, {"x": np.ones((1, 64), np.float32), "img": np.ones((1, 3, 4, 4), np.float32)})
"""


def thread_states(pid: int) -> dict[str, tuple[str, str, str]]:
    states = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        states[task.name] = (fields["Name"].strip(), fields["Seccomp"].strip(), fields["NoNewPrivs"].strip())
    return states


def test_policy_reaches_every_thread_that_already_runs(model_path: str) -> None:
    env = {"ORT_DISABLE_TELEMETRY": "1", "OPENBLAS_NUM_THREADS": "1", "HOME": "/nonexistent"}
    with subprocess.Popen([sys.executable, "-I", "-c", THREADED_SCRIPT, model_path], env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stdin is not None
        line = process.stdout.readline()
        assert line == "applied\n", process.stderr.read() if process.stderr else ""
        states = thread_states(process.pid)
        process.stdin.write("\n")
        process.stdin.flush()
        verdict = process.stdout.readline()
        assert process.wait(30) == 0
    names = [name for name, _, _ in states.values()]
    assert len(names) >= 7  # main, 3 helpers, onnxruntime's pool thread, libzmq's I/O thread and reaper
    assert {"ZMQbg/IO/0", "ZMQbg/Reaper"} <= set(names)
    assert all(seccomp == "2" and nnp == "1" for _, seccomp, nnp in states.values()), states
    assert verdict == "same\n"


def run_session(model_path: str, home: Path, *, telemetry_off: bool) -> None:
    env = {"HOME": str(home), "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    if telemetry_off:
        env["ORT_DISABLE_TELEMETRY"] = "1"
    mode = "plain" if telemetry_off else "isolate"
    subprocess.run([sys.executable, "-I", "-c", TELEMETRY_SCRIPT, model_path, mode], env=env, check=True, timeout=60,
                   capture_output=True)


def test_telemetry_off_writes_nothing_under_home(model_path: str, tmp_path: Path) -> None:
    quiet_home, chatty_home = tmp_path / "quiet", tmp_path / "chatty"
    quiet_home.mkdir()
    chatty_home.mkdir()
    run_session(model_path, quiet_home, telemetry_off=True)
    assert list(quiet_home.rglob("*")) == []
    run_session(model_path, chatty_home, telemetry_off=False)  # the control: telemetry on does write there
    assert any(path.name == "onnxruntime.db" for path in chatty_home.rglob("*"))
