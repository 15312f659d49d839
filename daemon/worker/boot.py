"""The worker's boot order, written once, in order (docs/SANDBOX.md explains each step):

 1. fresh process, empty environment, only stdin/stdout/stderr + the status pipe (done by the spawner)
    Imports (numpy, onnxruntime) and the policy files are loaded first, while the files are still
    readable: after step 3 the Python installation may not be (e.g. a venv under /root).
 2. die with the supervisor (PR_SET_PDEATHSIG), not dumpable, RLIMIT_CORE=0, file-size and fd limits;
    move into the empty working directory the supervisor made (a relative path nobody checked finds nothing)
 3. best effort: new network/IPC namespaces; as root: drop to the unprivileged worker uid/gid
 4. open the model's version directory beneath the repository, as that user; best effort: Landlock
    read-only view of Python + that directory (+ the prepared weights), nothing else
 5. open the model file, read it, list its external-data references (worker/external_refs.py: protobuf tags
    and lengths, no onnx) and open and map each beneath the version directory (worker/model_source.py)
 6. boot seccomp policy: onnxruntime parses the model only after it
 7. load the model, warm up, HELLO on the channel (the socketpair inherited at spawn, fd 4), wait for ACK
 8. malloc_trim, memory limit (RLIMIT_AS)
 9. serve seccomp policy (TSYNC: every thread)
10. READY, then serve
Any failure before READY is written to the status pipe (one JSON line) and the process exits 3.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from openinfer.daemon.observability.jsonlog import configure_logging

from .bootconfig import WorkerBootConfig

if TYPE_CHECKING:
    from openinfer.daemon.steps.sources import StepSources

    from .model_source import ModelSource

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


def _worker_user(config: WorkerBootConfig) -> str:
    """Whose rights the model is read with, for messages (read while /etc/passwd is still readable)."""
    from openinfer.daemon.files.model_files import describe_user

    sb = config.sandbox
    dropping_to = sb.uid if sb.enabled and os.geteuid() == 0 else None
    return describe_user(os.geteuid() if dropping_to is None else dropping_to)


def _enter_work_dir(config: WorkerBootConfig) -> None:
    try:
        os.chdir(config.work_dir or "/nonexistent")  # never stay in / (the spawner's cwd): fail instead
    except OSError as exc:
        raise BootFailure(f"cannot enter the working directory {config.work_dir!r}: {exc.strerror}") from None


def _open_version_dir(config: WorkerBootConfig, user: str) -> int:
    from openinfer.daemon.files.model_files import ModelFileError, open_version_dir

    try:
        return open_version_dir(config.repository, config.model_path, user)
    except ModelFileError as exc:
        raise BootFailure(str(exc)) from None


def _isolate_process(config: WorkerBootConfig, sandbox_state: dict[str, Any], user: str, writable: tuple[str, ...] = (), before_landlock: Callable[[], None] | None = None, stage_dirs: list[int] | None = None) -> int:
    """Steps 2-4; returns the model's version directory (an O_PATH descriptor) opened as the worker user
    (a chain's: the directory of its config.toml, and each member's version directory into `stage_dirs`).
    `before_landlock` reads what else the worker needs from beside the model (its steps) while it can."""
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
    # Workers write no files at all; the prepare helper no more than the supervisor will accept.
    max_file = config.prepare_limit_bytes if writable else 0
    hardening.apply_boot_rlimits(max_open_files=config.sandbox.max_open_files, max_file_size_bytes=max_file)
    _enter_work_dir(config)
    sb = config.sandbox
    # Namespaces first: as root, new net/IPC namespaces need no user namespace; after a uid drop they
    # would, and a user namespace hands the worker capabilities inside it.
    if sb.namespaces:
        # A worker with a direct endpoint must see its clients' uids (a lease names one): in a user
        # namespace, an unprivileged worker saw every client as uid 65534 - a daemon not run as root (the
        # shipped unit) refused every lease, "issued to uid=0, not to this connection's uid=65534", and
        # one issued to uid 65534 held for any uid. Such a worker enters the namespaces root can enter
        # without one, or none: seccomp already refuses it every socket() and SysV IPC call, and the unit
        # gives the whole service a network of its own (PrivateNetwork=yes).
        direct = config.direct is not None
        sandbox_state["namespaces_entered"] = hardening.enter_namespaces(user_namespace=not direct)
        if not sandbox_state["namespaces_entered"]:
            if direct and os.geteuid() != 0:
                log.info("no network/IPC namespaces for a worker with a direct endpoint when the daemon is not root: a user namespace would hide its clients' uids (seccomp refuses it sockets and SysV IPC)", extra={"worker": config.worker_id})
            else:
                log.warning("namespaces unavailable; worker shares the host's network and IPC namespaces", extra={"worker": config.worker_id})
    if os.geteuid() == 0 and sb.uid is not None and sb.gid is not None:
        hardening.drop_privileges(sb.uid, sb.gid)
        # The kernel clears the parent-death signal when credentials change: arm it again.
        hardening.set_parent_death_signal()
        if os.getppid() != config.supervisor_pid:
            raise BootFailure("supervisor exited during worker start")
    # After the drop: the worker user's rights decide, and Landlock is granted exactly the directory opened.
    version_dir = _open_version_dir(config, user)
    if stage_dirs is not None:
        stage_dirs.extend(_open_version_dir(config.stage(member), user) for member in config.chain)
    if before_landlock is not None:
        before_landlock()
    if sb.landlock:
        read_paths: list[str | int] = [*sb.read_paths, os.path.realpath("/proc/self"), "/proc/cpuinfo", version_dir, *(stage_dirs or ())]
        read_paths.extend(d for d in (config.prepared_dir, *(member["prepared_dir"] for member in config.chain)) if d)
        abi = hardening.apply_landlock(read_paths, writable)
        sandbox_state["landlock_abi"] = abi
        if not abi:
            log.warning("Landlock unavailable; file access limited by seccomp and uid only", extra={"worker": config.worker_id})
    return version_dir


def _open_source(config: WorkerBootConfig, version_dir: int, user: str) -> "ModelSource":
    """Step 5: the model source (worker/model_source.py); every refusal becomes the boot failure's reason."""
    from openinfer.daemon.files.model_files import ModelFileError

    from .external_data import ExternalDataError
    from .model_source import PreparedInvalid, open_model_source

    try:
        return open_model_source(config, version_dir, user)
    except PreparedInvalid as exc:  # the supervisor prepares again, then loads the model unshared
        raise BootFailure(f"{PREPARED_MISMATCH}: {exc}") from None
    except (ModelFileError, ExternalDataError) as exc:
        raise BootFailure(str(exc)) from None
    finally:
        os.close(version_dir)


def _open_sources(config: WorkerBootConfig, version_dir: int, stage_dirs: list[int], user: str) -> list[tuple[WorkerBootConfig, "ModelSource"]]:
    """Step 5 for the model, or for each member of a chain (whose own directory holds no model). A failure
    ends the worker (BootFailure): what is still open goes with it."""
    if not config.chain:
        return [(config, _open_source(config, version_dir, user))]
    os.close(version_dir)
    stages = [config.stage(member) for member in config.chain]
    return [(stage, _open_source(stage, stage_dir, user)) for stage, stage_dir in zip(stages, stage_dirs)]


def _load_session(config: WorkerBootConfig, source: "ModelSource") -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    """Step 7's load of one model: from its prepared, shared weights (checked against the known answer the
    helper recorded) or from its file."""
    from .prepare import load_prepared, verify_prepared
    from .session import build_session, describe_session

    try:
        if source.prepared_dir:
            session = load_prepared(Path(source.prepared_dir), config.intra_op_threads)
        else:
            assert source.model is not None  # open_model_source gives the bytes whenever there is no prepared_dir
            session = build_session(source.model, config.intra_op_threads, source.external)
        description = describe_session(session)
    except Exception as exc:
        raise BootFailure(f"onnxruntime could not load {config.prepared_dir or config.model_path}: {type(exc).__name__}: {exc}") from None
    finally:
        source.close()  # onnxruntime copied what it needs while creating the session
    if config.prepared_dir:
        try:
            verify_prepared(session, Path(config.prepared_dir))
        except (ValueError, OSError) as exc:
            raise BootFailure(f"{PREPARED_MISMATCH}: {exc}") from None
    return session, description


def _read_steps(config: WorkerBootConfig, user: str, into: list["StepSources"]) -> None:
    """The model's steps module and data files (daemon/steps/sources.py), as the worker user, before Landlock."""
    if config.steps is None:
        return
    from openinfer.daemon.files.model_files import ModelFileError
    from openinfer.daemon.steps.sources import read_step_sources
    from openinfer.daemon.steps.steps_config import StepsConfig

    try:
        into.append(read_step_sources(StepsConfig.from_dict(config.steps), config.repository, config.steps_dir, user))
    except ModelFileError as exc:
        raise BootFailure(str(exc)) from None


def _open_channel() -> Any:
    """Our end of the socketpair the supervisor gave us at spawn (fd 4): the only way to reach it, and
    nobody else can connect to it."""
    import socket

    from openinfer.wire.zmtp import FrameStream, Limits

    from .messages import CHANNEL_LIMITS

    sock = socket.socket(fileno=CHANNEL_FD)
    sock.setblocking(False)
    return FrameStream(sock, Limits(**CHANNEL_LIMITS))


def _await_ack(channel: Any, timeout_ms: int = 30_000) -> tuple[bytes, list[Any]]:
    """Wait for ACK; returns the lease key it carries (empty without a direct endpoint) and what was read
    after it in the same read: a reload's KEY or a stop's QUIT sent before this worker was READY, which the
    serve loop handles first (attacker round 79: a KEY read with the ACK was dropped, and the worker kept
    the revoked key - refusing every fresh lease, taking old ones - until the next reload)."""
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
                return (bytes(frames[1]) if len(frames) > 1 else b""), events[1:]
            raise BootFailure("expected ACK from the supervisor")


def _preload_builtin_steps(config: WorkerBootConfig) -> None:
    """A built-in steps module that says PRELOAD is imported now, before the drop to the worker user, like
    onnxruntime: it is openinfer's own code, and the libraries it imports (OpenCV, Pillow) may lie where
    that user cannot read. A repository's steps file never runs before the sandbox (daemon/steps/loader.py)."""
    if config.steps is None:
        return
    from openinfer.daemon.steps.steps_config import StepsConfig

    builtin = StepsConfig.from_dict(config.steps).builtin
    if builtin is not None:
        from openinfer.daemon.steps.sources import import_builtin

        import_builtin(builtin)


def _load_steps(sources: "StepSources") -> Any:
    from openinfer.daemon.steps.loader import StepsLoadError, load_steps

    try:
        return load_steps(sources)
    except StepsLoadError as exc:
        raise BootFailure(str(exc)) from None


def boot_and_serve(config: WorkerBootConfig) -> None:
    from openinfer.wire.protocol import pack

    from . import messages

    sandbox_state: dict[str, Any] = {"enabled": config.sandbox.enabled}
    from . import serve as _serve_module  # noqa: F401  (preload: see the module docstring)
    from .prepare import load_prepared  # noqa: F401  (preload: _load_session imports it after Landlock)

    _preload_builtin_steps(config)
    from .session import warm_up

    user = _worker_user(config)
    step_sources: list[StepSources] = []
    stage_dirs: list[int] = []
    if config.sandbox.enabled:
        from openinfer.sandbox import apply_policy, hardening, load_policy

        # Policies are read now: after the uid drop and Landlock their files may be out of reach.
        boot_policy = load_policy(config.sandbox.boot_policy)
        serve_policy = load_policy(config.sandbox.serve_policy)
        version_dir = _isolate_process(config, sandbox_state, user, before_landlock=lambda: _read_steps(config, user, step_sources), stage_dirs=stage_dirs)
        sources = _open_sources(config, version_dir, stage_dirs, user)
        apply_policy(boot_policy)
    else:
        log.warning("worker running WITHOUT sandbox (--insecure-no-sandbox)", extra={"worker": config.worker_id})
        _enter_work_dir(config)
        _read_steps(config, user, step_sources)
        stage_dirs.extend(_open_version_dir(config.stage(member), user) for member in config.chain)
        sources = _open_sources(config, _open_version_dir(config, user), stage_dirs, user)

    started = time.monotonic_ns()
    # By name for a chain's drive step; "" for a model's own (a failure ends the worker, sources and all).
    loaded_models = {stage.model if config.chain else "": _load_session(stage, source) for stage, source in sources}
    loaded = time.monotonic_ns()
    if config.sandbox.enabled:
        # Before the warm-up: a hostile model's first run must already be held by the memory limit.
        hardening.set_memory_limit(config.sandbox.memory_limit_bytes)
    warmup_errors = [error for session, description in loaded_models.values() if (error := warm_up(session, description["inputs"])) is not None]
    warmup_error = "; ".join(warmup_errors) or None
    warmed = time.monotonic_ns()
    # The steps module's own code runs first here: under the boot policy and the memory limit, like the
    # model's parse. Clients see the model through its steps.
    steps = _load_steps(step_sources[0]) if step_sources else None
    if config.chain and (steps is None or steps.drive is None):
        raise BootFailure(f"the chain's steps module {steps.module if steps else '(none)'} defines no `drive(inputs, models)`: a chain's models are called by its drive step")
    description = loaded_models[""][1] if "" in loaded_models else {"inputs": [], "outputs": []}
    clients_view = steps.describe(description) if steps is not None else description
    channel = _open_channel()
    hello = {
        "pid": os.getpid(),
        **clients_view,
        "load_ms": (loaded - started) / 1e6,
        "warmup_ms": (warmed - loaded) / 1e6,
        "warmup_error": warmup_error,
    }
    channel.send([messages.HELLO, pack(hello)])
    lease_key, pending = _await_ack(channel)
    # Everything the serve loop touches exists before the serve policy: the poller, the direct endpoint.
    import select

    from .direct_setup import direct_serving
    from .session import Runner

    from .verdict_cache import VerdictCache

    cache = VerdictCache(config.cache["entries"], config.cache["max_bytes"], config.cache["ttl_s"], config.cache["shared"]) if config.cache else None
    runner: Any = Runner(loaded_models[""][0]) if "" in loaded_models else None
    if steps is not None:
        from openinfer.daemon.steps.runner import Stage, StepRunner

        runner = StepRunner({name: Stage.of(Runner(session), model) for name, (session, model) in loaded_models.items()}, steps, clients_view)
    poller = select.epoll()
    from .run_watch import RunWatch

    watch = RunWatch(runner.new_run_options())  # its thread starts now: the serve policy allows no new one
    direct = direct_serving(config, clients_view, runner, poller, lease_key, watch, cache) if config.direct is not None else None

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

    serve(channel, runner, [o["name"] for o in clients_view["outputs"]], poller, direct, watch, cache, pending)
    channel.close()


def prepare_and_exit(config: WorkerBootConfig) -> None:
    """Prepare mode: write a prepared directory into `prepare_into`, report success by pipe. The supervisor
    chose the cache key and checks what was written; this process parses the untrusted model."""
    from openinfer.daemon.files.cache_key import onnxruntime_version
    from openinfer.daemon.files.prepared_layout import REPORT

    from . import prepare as preparation  # looked up at call time: tests stand in a hostile helper here

    assert config.prepare_into is not None
    user = _worker_user(config)
    onnxruntime_version()  # cached now: reading package metadata imports modules the sandbox may hide
    if config.sandbox.enabled:
        from openinfer.sandbox import apply_policy, load_policy

        policy = load_policy("prepare")
        version_dir = _isolate_process(config, {}, user, writable=(config.prepare_into,))
        source = _open_source(config, version_dir, user)
        apply_policy(policy)
    else:
        _enter_work_dir(config)
        source = _open_source(config, _open_version_dir(config, user), user)
    try:
        assert source.model is not None
        preparation.prepare(source.model, source.external, Path(config.prepare_into), config.intra_op_threads, config.model_path)
    except Exception as exc:
        raise BootFailure(f"cannot prepare shared weights: {type(exc).__name__}: {exc}"[:1000]) from None
    finally:
        source.close()
    os.write(STATUS_FD, (json.dumps(REPORT) + "\n").encode())


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
