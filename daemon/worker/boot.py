"""The worker's boot order, written once, in order (docs/SANDBOX.md explains each step):

 1. fresh process, empty environment, only stdin/stdout/stderr + the status pipe (done by the spawner)
    Imports (numpy, pyzmq, onnxruntime) and the model bytes are loaded first, while the files are still
    readable: after step 3 the Python installation may not be (e.g. a venv under /root).
 2. die with the supervisor (PR_SET_PDEATHSIG), not dumpable, RLIMIT_CORE=0, file-size and fd limits
 3. as root: drop to the unprivileged worker uid/gid
 4. best effort: new user/network/IPC namespaces, Landlock read-only view of Python + the model
 5. boot seccomp policy
 6. load the model, warm up, HELLO on the channel (the socketpair inherited at spawn), wait for ACK
 7. malloc_trim, memory limit (RLIMIT_AS)
 8. serve seccomp policy (TSYNC: every thread)
 9. READY, then serve
Any failure before READY is written to the status pipe (one JSON line) and the process exits 3.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from openinfer.daemon.jsonlog import configure_logging

from .bootconfig import WorkerBootConfig

log = logging.getLogger("openinfer.worker")
PREPARED_MISMATCH = "prepared artefact mismatch"
STATUS_FD = 3  # the spawner passes the write end of the status pipe as fd 3 (spawner.STATUS_FD)
CHANNEL_FD = 4  # and the worker's end of its socketpair with the supervisor as fd 4 (spawner.CHANNEL_FD)
EXIT_BOOT_FAILED = 3


class BootFailure(Exception):
    """A boot step failed; the message is what `openinfer status` shows for the model."""


def _report_failure(message: str) -> None:
    try:
        os.write(STATUS_FD, (json.dumps({"error": message}) + "\n").encode())
    except OSError:
        pass


def _isolate_process(config: WorkerBootConfig, sandbox_state: dict[str, Any], writable: tuple[str, ...] = ()) -> None:
    from openinfer.sandbox import hardening

    hardening.set_parent_death_signal()
    if os.getppid() != config.supervisor_pid:  # supervisor died before the death signal was armed
        raise BootFailure("supervisor exited during worker start")
    hardening.set_not_dumpable()
    try:  # under memory pressure the kernel should pick a worker, never the supervisor
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass
    # Workers write no files at all; the prepare helper writes about twice the source (packed + original).
    max_file = 4 * os.path.getsize(config.model_path) + (64 << 20) if writable else 0
    hardening.apply_boot_rlimits(max_open_files=config.sandbox.max_open_files, max_file_size_bytes=max_file)
    sb = config.sandbox
    # Namespaces first: as root, new net/IPC namespaces need no user namespace; after a uid drop they
    # would, and a user namespace hands the worker capabilities inside it.
    if sb.namespaces:
        sandbox_state["namespaces_entered"] = hardening.enter_namespaces()
        if not sandbox_state["namespaces_entered"]:
            log.warning("namespaces unavailable; worker shares the host's network and IPC namespaces", extra={"worker": config.worker_id})
    if os.geteuid() == 0 and sb.uid is not None and sb.gid is not None:
        hardening.drop_privileges(sb.uid, sb.gid)
        # The kernel clears the parent-death signal when credentials change: arm it again.
        hardening.set_parent_death_signal()
        if os.getppid() != config.supervisor_pid:
            raise BootFailure("supervisor exited during worker start")
    if sb.landlock:
        read_paths = [*sb.read_paths, os.path.realpath("/proc/self"), "/proc/cpuinfo", os.path.dirname(config.model_path)]
        read_paths += [p for p in (config.prepared_dir, config.cache_dir) if p]
        abi = hardening.apply_landlock(read_paths, writable)
        sandbox_state["landlock_abi"] = abi
        if not abi:
            log.warning("Landlock unavailable; file access limited by seccomp and uid only", extra={"worker": config.worker_id})


def _read_model(path: str) -> bytes:
    try:
        with open(path, "rb") as model_file:
            return model_file.read()
    except OSError as exc:
        raise BootFailure(f"cannot read {path}: {exc.strerror}") from None


def _open_channel() -> Any:
    """Our end of the socketpair the supervisor gave us at spawn (fd 4): the only way to reach it, and
    nobody else can connect to it."""
    import socket

    from openinfer.wire.zmtp import FrameStream, Limits

    from .messages import CHANNEL_LIMITS

    sock = socket.socket(fileno=CHANNEL_FD)
    sock.setblocking(False)
    return FrameStream(sock, Limits(**CHANNEL_LIMITS))


def _await_ack(channel: Any, timeout_ms: int = 30_000) -> None:
    import select

    from . import messages

    poller = select.poll()
    poller.register(channel.sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if channel.out_bytes:
            channel.flush()
        if remaining_ms <= 0 or not poller.poll(remaining_ms):
            raise BootFailure("no ACK from supervisor")
        events = channel.read()
        if events:
            frames = events[0]
            if isinstance(frames, list) and bytes(frames[0]) == messages.ACK:
                return
            raise BootFailure("expected ACK from the supervisor")


def boot_and_serve(config: WorkerBootConfig) -> None:
    from openinfer.wire.protocol import pack

    from . import messages

    sandbox_state: dict[str, Any] = {"enabled": config.sandbox.enabled}
    from . import serve as _serve_module  # noqa: F401  (preload: see the module docstring)
    from .prepare import load_prepared, verify_prepared
    from .session import build_session, describe_session, warm_up

    model_bytes = None if config.prepared_dir else _read_model(config.model_path)
    if config.sandbox.enabled:
        from openinfer.sandbox import apply_policy, hardening, load_policy

        # Policies are read now: after the uid drop and Landlock their files may be out of reach.
        boot_policy = load_policy(config.sandbox.boot_policy)
        serve_policy = load_policy(config.sandbox.serve_policy)
        _isolate_process(config, sandbox_state)
        apply_policy(boot_policy)
    else:
        log.warning("worker running WITHOUT sandbox (--insecure-no-sandbox)", extra={"worker": config.worker_id})

    started = time.monotonic_ns()
    try:
        if config.prepared_dir:
            session = load_prepared(Path(config.prepared_dir), config.intra_op_threads)
        else:
            session = build_session(model_bytes, config.intra_op_threads)  # type: ignore[arg-type]
        del model_bytes
        description = describe_session(session)
    except Exception as exc:
        raise BootFailure(f"onnxruntime could not load {config.prepared_dir or config.model_path}: {type(exc).__name__}: {exc}") from None
    if config.prepared_dir:
        try:
            verify_prepared(session, Path(config.prepared_dir))
        except (ValueError, OSError) as exc:
            raise BootFailure(f"{PREPARED_MISMATCH}: {exc}") from None
    loaded = time.monotonic_ns()
    if config.sandbox.enabled:
        # Before the warm-up: a hostile model's first run must already be held by the memory limit.
        hardening.set_memory_limit(config.sandbox.memory_limit_bytes)
    warmup_error = warm_up(session, description["inputs"])
    warmed = time.monotonic_ns()
    channel = _open_channel()
    hello = {
        "pid": os.getpid(),
        **description,
        "load_ms": (loaded - started) / 1e6,
        "warmup_ms": (warmed - loaded) / 1e6,
        "warmup_error": warmup_error,
    }
    channel.send([messages.HELLO, pack(hello)])
    _await_ack(channel)

    if config.sandbox.enabled:
        hardening.malloc_trim()
        # /proc is read now: under the serve policy it cannot be. Our own keys win over the snapshot's.
        sandbox_state = {**hardening.describe_sandbox(), **sandbox_state}
        apply_policy(serve_policy)
        sandbox_state["seccomp_filters"] = sandbox_state.get("seccomp_filters", 0) + 1  # the serve filter just added
        sandbox_state["policy"] = config.sandbox.serve_policy
        sandbox_state["boot_policy"] = config.sandbox.boot_policy
        sandbox_state["memory_limit_bytes"] = config.sandbox.memory_limit_bytes
    channel.send([messages.READY, pack(sandbox_state)])

    from .serve import serve

    serve(channel, session, [o["name"] for o in description["outputs"]])
    channel.close()


def prepare_and_exit(config: WorkerBootConfig) -> None:
    """Prepare mode: reuse a valid prepared directory from the cache, or write a new one; report by pipe."""
    from .prepare import cache_key, file_sha256, prepare, prepared_is_valid

    assert config.prepare_into is not None
    source = Path(config.model_path)
    if config.sandbox.enabled:
        from openinfer.sandbox import apply_policy, load_policy

        policy = load_policy("prepare")
        _isolate_process(config, {}, writable=(config.prepare_into,))
        apply_policy(policy)
    try:
        source_sha256 = file_sha256(source)
        key = cache_key(source_sha256)
        if config.cache_dir and prepared_is_valid(Path(config.cache_dir) / key, source_sha256):
            result: dict[str, Any] = {"key": key, "reused": True}
        else:
            result = {"key": key, "reused": False, **prepare(source, Path(config.prepare_into), config.intra_op_threads)}
    except Exception as exc:
        raise BootFailure(f"cannot prepare shared weights: {type(exc).__name__}: {exc}"[:1000]) from None
    os.write(STATUS_FD, (json.dumps({"result": result}) + "\n").encode())


def main(argv: list[str]) -> int:
    config = WorkerBootConfig.from_json(argv[1])
    configure_logging(config.log_level)
    try:
        if config.prepare_into:
            prepare_and_exit(config)
            return 0
        boot_and_serve(config)
    except BootFailure as exc:
        _report_failure(str(exc))
        log.error("worker boot failed", extra={"worker": config.worker_id, "model": config.model, "reason": str(exc)})
        return EXIT_BOOT_FAILED
    except Exception as exc:
        _report_failure(f"{type(exc).__name__}: {exc}")
        log.exception("worker failed", extra={"worker": config.worker_id, "model": config.model})
        return EXIT_BOOT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
