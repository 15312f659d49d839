"""Measure which syscalls a realistic worker makes, per phase (boot vs serve), under `strace -f`.

Run by hand when onnxruntime, pyzmq, numpy or the platform changes, and compare with policies/*.toml:

    python tests/sandbox/sandbox_measure.py [--threads 1 2] [--daemon-malloc-env]

Not collected by pytest (no test_ prefix). Needs strace.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sandbox_model import build_model  # noqa: E402

MARKER = "/openinfer-serve-phase-marker"
CALL = re.compile(r"^(\d+)\s+(?:\d+:\d+:\d+\.\d+\s+)?([a-z_0-9]+)\((.*)")
DETAIL_ARG = {"mmap": 2, "mprotect": 2, "clone": 1, "clone3": 0, "socket": 0, "openat": 2, "open": 1,
              "kill": 1, "tgkill": 2, "prctl": 0, "madvise": 2, "ioctl": 1, "fcntl": 1, "connect": 0}


def drive(router: zmq.Socket, identity: bytes) -> None:  # type: ignore[type-arg]
    def call(*frames: Any) -> list[bytes]:  # bytes or buffers (ndarrays)
        router.send_multipart([identity, *frames])
        return router.recv_multipart()[1:]

    def run(x_rows: int, img: tuple[int, int, int, int]) -> None:
        x = np.ones((x_rows, 64), np.float32)
        image = np.ones(img, np.float32)
        spec = {"inputs": {"x": ["float32", list(x.shape)], "img": ["float32", list(image.shape)]}}
        reply = call(b"run", json.dumps(spec).encode(), x, image)
        assert reply[0] == b"ok", reply

    for _ in range(20):
        run(1, (1, 3, 16, 16))
    for _ in range(5):
        run(16384, (2, 3, 256, 256))  # 4 MiB MatMul input, 1.5 MiB image, 16 MiB conv output
        run(8, (1, 3, 512, 512))
    assert call(b"error")[0] == b"ok"
    assert call(b"alloc", json.dumps({"mb": 200}).encode())[0] == b"ok"
    assert call(b"status")[0] == b"ok"
    assert call(b"quit")[0] == b"bye"


def measure(threads: int, daemon_malloc_env: bool, workdir: Path) -> Path:
    model = build_model(workdir / "model.onnx")
    endpoint = f"ipc://{workdir}/channel"
    trace = workdir / f"trace-{threads}.txt"
    env = {"ORT_DISABLE_TELEMETRY": "1", "HOME": str(workdir / "home"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": str(threads)}
    if daemon_malloc_env:
        env |= {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    process = subprocess.Popen(
        ["strace", "-f", "-qq", "-s", "64", "-o", str(trace), sys.executable, "-I", str(HERE / "sandbox_workload.py"),
         "--model", model, "--endpoint", endpoint, "--threads", str(threads), "--marker"],
        env=env,
    )
    identity, hello, _ = router.recv_multipart()
    assert hello == b"hello"
    router.send_multipart([identity, b"ack"])
    assert router.recv_multipart()[1] == b"ready"
    drive(router, identity)
    process.wait(60)
    router.close(0)
    context.term()
    return trace


def summarize(trace: Path) -> dict[str, collections.Counter[str]]:
    phases: dict[str, collections.Counter[str]] = {"boot": collections.Counter(), "serve": collections.Counter()}
    details: dict[str, set[str]] = collections.defaultdict(set)
    phase = "boot"
    for line in trace.read_text(errors="replace").splitlines():
        if MARKER in line:
            phase = "serve"
            continue
        match = CALL.match(line)
        if not match:
            continue
        name, rest = match.group(2), match.group(3)
        phases[phase][name] += 1
        if name in DETAIL_ARG:
            args = [a.strip() for a in rest.split(", ")]
            if len(args) > DETAIL_ARG[name]:
                details[f"{phase}:{name}"].add(args[DETAIL_ARG[name]].split(")")[0][:60])
    for phase_name, counts in phases.items():
        print(f"== {phase_name}: {len(counts)} distinct syscalls, {sum(counts.values())} calls")
        print("   " + " ".join(f"{n}:{c}" for n, c in sorted(counts.items())))
    for key in sorted(details):
        print(f"   {key}: {sorted(details[key])[:12]}")
    return phases


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--daemon-malloc-env", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("MEASURE_KEEP")) as tmp:
        workdir = Path(tmp)
        (workdir / "home").mkdir()
        for threads in args.threads:
            print(f"##### intra_op_num_threads={threads} daemon_malloc_env={args.daemon_malloc_env}")
            summarize(measure(threads, args.daemon_malloc_env, workdir))
        leftovers = list((workdir / "home").rglob("*"))
        print(f"files written under HOME: {leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
