"""What the supervisor tells a worker at spawn (one JSON argument; the environment stays empty)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


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
    repository: str = ""  # the model repository model_path is opened beneath (daemon/model_files.py)
    work_dir: str = ""  # an empty directory to run in: a relative path the worker did not check resolves nowhere
    sandbox: WorkerSandboxConfig = field(default_factory=WorkerSandboxConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerBootConfig":
        raw = json.loads(text)
        sandbox = raw.pop("sandbox")
        sandbox["read_paths"] = tuple(sandbox.get("read_paths", ()))
        return cls(sandbox=WorkerSandboxConfig(**sandbox), **raw)
