"""What the supervisor tells a worker at spawn (one JSON argument; the environment stays empty)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class WorkerSandboxConfig:
    enabled: bool = True
    boot_policy: str = "boot"
    serve_policy: str = "worker"
    uid: int | None = None  # drop to this uid/gid when started as root
    gid: int | None = None
    memory_limit_bytes: int | None = None
    max_open_files: int = 64
    landlock: bool = True
    namespaces: bool = True
    read_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class DirectConfig:
    """The worker's own endpoint for clients holding a lease (worker/direct.py): present only when the
    front door is ipc:// (the spawner then passes the listening socket as fd 5 and the deadline page as
    fd 6)."""

    max_connections: int = 128
    max_connections_per_identity: int = 32
    max_request_bytes: int = 64 * 1024 * 1024
    max_reply_backlog_bytes: int = 64 * 1024 * 1024
    strike_limit: int = 16
    timeout_ms: int = 30_000
    max_compute_ms: int = 60_000
    starvation_ms: int = 1000
    spin_us: int = 0
    batching: dict[str, Any] | None = None  # the model's [batching] (modelconfig.BatchingConfig fields)


@dataclass(frozen=True)
class WorkerBootConfig:
    worker_id: int
    model: str
    version: int
    model_path: str
    intra_op_threads: int
    supervisor_pid: int
    log_level: str = "info"
    prepared_dir: str | None = None  # serve from these prepared, shared weights (see worker/prepare.py)
    prepare_into: str | None = None  # prepare mode: write a prepared directory here, then exit
    prepare_limit_bytes: int = 0  # prepare mode: largest file it may write (the supervisor accepts no larger)
    repository: str = ""  # the model repository model_path is opened beneath (daemon/files/model_files.py)
    max_model_bytes: int = 2 * 1024**3  # pool.max_model_bytes: a larger model file fails the boot, unread
    work_dir: str = ""  # an empty directory to run in: a relative path the worker did not check resolves nowhere
    sandbox: WorkerSandboxConfig = field(default_factory=WorkerSandboxConfig)
    direct: DirectConfig | None = None
    steps: dict[str, Any] | None = None  # the model's [steps] (steps_config.StepsConfig.to_dict)
    cache: dict[str, Any] | None = None  # the model's [cache] (modelconfig.CacheConfig.to_dict)
    # A chain's members ([chain]: its model_path is its config.toml): each {name, version, model_path,
    # prepared_dir}, loaded into this one worker, in this order, and handed to its drive step.
    chain: tuple[dict[str, Any], ...] = ()

    def stage(self, member: dict[str, Any]) -> "WorkerBootConfig":
        """What one member of a chain is loaded from: its own file, on its own shared weights."""
        return replace(self, model=member["name"], version=member["version"], model_path=member["model_path"], prepared_dir=member["prepared_dir"], chain=())

    @property
    def steps_dir(self) -> str:
        """Where config.toml and the steps' files are: beside a chain's config.toml, two levels above a
        model's file."""
        return os.path.dirname(self.model_path) if self.chain else os.path.dirname(os.path.dirname(self.model_path))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerBootConfig":
        raw = json.loads(text)
        sandbox = raw.pop("sandbox")
        sandbox["read_paths"] = tuple(sandbox.get("read_paths", ()))
        direct = raw.pop("direct", None)
        raw["chain"] = tuple(raw.get("chain", ()))
        return cls(sandbox=WorkerSandboxConfig(**sandbox), direct=DirectConfig(**direct) if direct is not None else None, **raw)
