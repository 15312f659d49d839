"""A worker-like process for sandbox tests and syscall measurement (run as a script, never imported by pytest).

It does what a real OpenInfer worker does, in the same order (docs/SANDBOX.md §3): parent-death signal,
(optionally) not dumpable + rlimits + namespaces + Landlock, (optionally) boot policy, import onnxruntime,
build a session, warm up, HELLO/ACK on the socketpair inherited as fd 4 (ZMTP framing, as the real worker's
channel), malloc_trim, memory limit, (optionally) serve policy, READY, then serve a closed set of
operations:

  run     [b"run", json{"inputs": {name: [dtype, shape]}}, *raw]  -> [b"ok", json{name: shape}, *raw]
  error   raise and format an exception with traceback            -> [b"ok", traceback text]
  alloc   json{"mb": N}: allocate and touch N MiB with numpy       -> [b"ok", json{"sum": ...}] or MemoryError text
  status  describe_sandbox() as the worker sees it                 -> [b"ok", json{...}]
  attempt json{"probe": name}: run one forbidden action in-process -> [b"ok", json{"how": ...}] (or SIGSYS death)
  quit                                                              -> [b"bye"]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--channel-fd", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--boot-policy", default="")
    parser.add_argument("--serve-policy", default="")
    parser.add_argument("--memory-limit-mb", type=int, default=0)
    parser.add_argument("--isolate", action="store_true", help="the daemon's process layers before the boot policy")
    parser.add_argument("--marker", action="store_true", help="stat a marker path when serving starts (strace phases)")
    return parser.parse_args(argv)


def read_paths(model: str) -> list[str]:
    """What Python, numpy and onnxruntime read while loading (measured with strace), plus the model."""
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], os.path.dirname(model),
             os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/..",  # the openinfer source tree
             "/usr/lib", "/lib", "/lib64", "/usr/lib64", "/etc/ld.so.cache", "/proc/cpuinfo",
             "/sys/devices/system/cpu", "/dev/null", "/dev/urandom", "/proc/self"}  # /proc/self: our own pid only
    return sorted(os.path.realpath(p) for p in paths if os.path.exists(p))


def isolate(model: str) -> None:
    from openinfer.sandbox import hardening

    hardening.set_not_dumpable()
    hardening.apply_boot_rlimits(max_open_files=64)
    entered = hardening.enter_namespaces()
    abi = hardening.apply_landlock(read_paths(model))
    if not entered or not abi:
        raise SystemExit(f"isolation incomplete: namespaces={entered} landlock={abi}")


def thread_status() -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    for tid in os.listdir("/proc/self/task"):
        fields: dict[str, str] = {}
        with open(f"/proc/self/task/{tid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("Name", "Seccomp", "NoNewPrivs"):
                    fields[key] = value.strip()
        result[tid] = fields
    return result


def nested_failure(depth: int) -> None:
    if depth == 0:
        raise ValueError("deliberate failure inside the sandbox")
    nested_failure(depth - 1)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # Everything the serve loop uses must be imported before the serve policy: imports open files.
    import select
    import socket

    from openinfer.sandbox import hardening, probes  # noqa: F401
    from openinfer.wire.zmtp import FrameStream, Limits

    hardening.set_parent_death_signal()  # never outlive the test that spawned us
    if args.isolate:
        isolate(args.model)
    if args.boot_policy:
        from openinfer.sandbox import apply_policy

        apply_policy(args.boot_policy)

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(args.model, sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros((1, 64), np.float32), "img": np.zeros((1, 3, 8, 8), np.float32)})

    sock = socket.socket(fileno=args.channel_fd)
    sock.setblocking(False)
    channel = Channel(FrameStream(sock, Limits(frames=1 << 16, first_frame=1 << 30, message_bytes=1 << 40)), select)
    channel.send_multipart([b"hello", str(os.getpid()).encode()])
    if channel.recv_multipart()[0] != b"ack":
        return 2

    before_serve_policy = thread_status()  # /proc is unreadable under the serve policy
    if args.serve_policy:
        from openinfer.sandbox import apply_policy, hardening

        hardening.malloc_trim()
        if args.memory_limit_mb:
            hardening.set_memory_limit(args.memory_limit_mb * 1024 * 1024)
        apply_policy(args.serve_policy)
    if args.marker:
        try:
            os.stat("/openinfer-serve-phase-marker")
        except OSError:
            pass
    channel.send_multipart([b"ready", json.dumps(before_serve_policy).encode()])
    serve(channel, session, np)
    channel.stream.close()  # an unclosed socket's ResourceWarning would call getsockname: not allowed
    return 0


class Channel:
    """Blocking request/reply over the inherited socketpair, as the real worker's channel."""

    def __init__(self, stream: Any, select: Any) -> None:
        self.stream = stream
        self.poller = select.poll()
        self.poller.register(stream.sock.fileno(), select.POLLIN)
        self.select = select
        self.pending: list[Any] = []

    def send_multipart(self, frames: list[Any]) -> None:
        self.stream.send([bytes(f) if isinstance(f, bytes) else memoryview(f).cast("B") for f in frames])
        while self.stream.out_bytes:
            self.poller.modify(self.stream.sock.fileno(), self.select.POLLOUT)
            self.poller.poll()
            self.stream.flush()
        self.poller.modify(self.stream.sock.fileno(), self.select.POLLIN)

    def recv_multipart(self) -> list[Any]:
        while not self.pending:
            self.poller.poll()
            self.pending.extend(self.stream.read())
        return [bytes(f) for f in self.pending.pop(0)]


def serve(channel: Any, session: Any, np: Any) -> None:
    while True:
        frames = channel.recv_multipart()
        op = frames[0]
        if op == b"quit":
            channel.send_multipart([b"bye"])
            return
        try:
            reply = handle(op, frames, session, np)
        except Exception as exc:  # report, keep serving: the test decides what is expected
            reply = [b"err", f"{type(exc).__name__}: {exc}".encode()]
        channel.send_multipart(reply)


def handle(op: bytes, frames: list[Any], session: Any, np: Any) -> list[Any]:
    if op == b"run":
        spec = json.loads(frames[1])
        feed = {
            name: np.frombuffer(frame, dtype=dtype).reshape(shape)
            for (name, (dtype, shape)), frame in zip(spec["inputs"].items(), frames[2:])
        }
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, feed)
        shapes = {name: list(value.shape) for name, value in zip(names, outputs)}
        return [b"ok", json.dumps(shapes).encode(), *[np.ascontiguousarray(o) for o in outputs]]
    if op == b"error":
        try:
            nested_failure(5)
        except ValueError:
            return [b"ok", traceback.format_exc().encode()]
    if op == b"alloc":
        megabytes = json.loads(frames[1])["mb"]
        try:
            block = np.ones(megabytes * 1024 * 1024 // 8, dtype=np.float64)
            total = float(block.sum())
            del block
        except MemoryError as exc:
            return [b"ok", json.dumps({"memory_error": str(exc)}).encode()]
        return [b"ok", json.dumps({"sum": total}).encode()]
    if op == b"status":
        from openinfer.sandbox.hardening import describe_sandbox

        return [b"ok", json.dumps(describe_sandbox()).encode()]
    if op == b"attempt":
        from openinfer.sandbox.probes import attempt_in_process

        how = attempt_in_process(json.loads(frames[1])["probe"])
        return [b"ok", json.dumps({"how": how}).encode()]
    return [b"err", b"unknown op"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
