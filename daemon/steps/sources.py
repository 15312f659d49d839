"""What a worker reads for its model's steps, while its files are still in reach: after the drop to the
worker user and before Landlock (worker/boot.py, step 4). Everything is opened beneath the model's own
directory (beside config.toml) without following any symlink, with the worker user's rights - the same
rules as the model file (daemon/files/model_files.py) - and read whole, with a size bound."""
from __future__ import annotations

import importlib
import os
import stat
from dataclasses import dataclass, field
from types import ModuleType

from openinfer.daemon.files.beneath import open_beneath
from openinfer.daemon.files.model_files import ModelFileError, open_version_dir

from .steps_config import MAX_FILE_BYTES, StepsConfig

BUILTIN_PACKAGE = "openinfer.daemon.steps.builtin"


@dataclass
class StepSources:
    config: StepsConfig
    source: bytes | None = None  # the module file's text; None for a built-in
    files: dict[str, bytes] = field(default_factory=dict)


def import_builtin(name: str) -> ModuleType:
    return importlib.import_module(f"{BUILTIN_PACKAGE}.{name}")


def builtin_files(name: str) -> tuple[str, ...]:
    """The data files a built-in reads beside config.toml (its FILES)."""
    return tuple(getattr(import_builtin(name), "FILES", ()))


def read_step_sources(config: StepsConfig, repository: str, steps_dir: str, user: str) -> StepSources:
    """`steps_dir`: the directory of the model's config.toml (`<repository>/<model>`). Raises ModelFileError
    naming the file and why."""
    builtin = config.builtin
    names = list(config.files)
    if builtin is not None:
        names = [*builtin_files(builtin), *names]
    # open_version_dir opens the directory holding a path: name a file inside steps_dir.
    dir_fd = open_version_dir(repository, os.path.join(steps_dir, "config.toml"), user)
    try:
        sources = StepSources(config)
        if builtin is None:
            sources.source = _read(dir_fd, config.module, steps_dir, user)
        for name in names:
            sources.files[name] = _read(dir_fd, name, steps_dir, user)
        return sources
    finally:
        os.close(dir_fd)


def _read(dir_fd: int, name: str, steps_dir: str, user: str) -> bytes:
    where = os.path.join(steps_dir, name)
    try:
        fd = open_beneath(dir_fd, name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ModelFileError(f"cannot read the steps file {where} as {user}: {exc.strerror} (files a model's steps need are read beside its config.toml, without following symlinks)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"the steps file {where} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ModelFileError(f"the steps file {where} is {info.st_size} bytes; at most {MAX_FILE_BYTES}")
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
    finally:
        os.close(fd)
