"""The one way a model's files are opened - by the supervisor (to hash the source for the cache key), the
prepare helper and every worker (to load it).

Beneath the repository root and without following any symlink (openat2, daemon/files/beneath.py), and with the
rights of the calling process: the helper and the workers call this after dropping to the worker user, so
a model that user cannot read fails in both the same way, with a reason naming the file, the user and what
to change - never a silent fallback (issue #16). The supervisor calls it as itself, only to hash bytes.
"""
from __future__ import annotations

import errno
import os
import pwd
import stat

from .beneath import OpenAt2Unavailable, open_beneath


class ModelFileError(Exception):
    """A model file cannot be opened safely; the message is what `openinfer status` shows for the model."""


class ModelTooLarge(ModelFileError):
    """The model file is over pool.max_model_bytes: the model fails to load, its bytes unread."""


def describe_user(uid: int) -> str:
    """"user nobody (uid 65534)": how messages name the user whose rights a model is read with."""
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def open_version_dir(repository: str, model_path: str, user: str, levels_up: int = 1) -> int:
    """An O_PATH descriptor of the directory that holds `model_path` (`<repo>/<model>/<version>`; with
    `levels_up = 2`, the model's own directory `<repo>/<model>`, where its config.toml is), resolved from
    `repository` with no symlink and no step outside it. `user` names whose rights apply, for messages."""
    relative = _relative(repository, model_path)
    for _ in range(levels_up - 1):
        relative = os.path.dirname(relative)
    try:
        root = os.open(repository, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # the operator's own setting
    except OSError as exc:
        raise ModelFileError(_explain(exc, model_path, repository, user)) from None
    try:
        return open_beneath(root, os.path.dirname(relative) or ".", os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise ModelFileError(_explain(exc, model_path, repository, user)) from None
    finally:
        os.close(root)


def open_model_file(version_dir_fd: int, model_path: str, repository: str, user: str) -> int:
    """A read-only descriptor of the model file itself, beneath its version directory; a regular file."""
    try:
        fd = open_beneath(version_dir_fd, os.path.basename(model_path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ModelFileError(_explain(exc, model_path, repository, user)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelFileError(f"{model_path} is not a regular file")
    return fd


def open_model(repository: str, model_path: str, user: str) -> tuple[int, int]:
    """(version directory, model file) descriptors: open_version_dir then open_model_file."""
    version_dir = open_version_dir(repository, model_path, user)
    try:
        return version_dir, open_model_file(version_dir, model_path, repository, user)
    except BaseException:
        os.close(version_dir)
        raise


def check_model_size(fd: int, model_path: str, max_bytes: int) -> int:
    """The size of the model file behind `fd`; ModelTooLarge when it is over `max_bytes` (pool.max_model_bytes).
    Its apparent size counts, not its blocks on disk: a sparse file of 64 GiB takes nothing on disk, yet
    hashing or reading it reads 64 GiB of zeros (attacker round 5: 100 s of the supervisor's one off-loop
    thread, and every model queued behind it waited)."""
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise ModelTooLarge(
            f"{model_path} is {size} bytes ({size / 2**30:.1f} GiB), over pool.max_model_bytes ({max_bytes} bytes): "
            "the daemon neither hashes nor reads a larger model file. Raise pool.max_model_bytes to serve it "
            "(though ONNX cannot parse any model file over 2 GiB, protobuf's limit: large weights belong in "
            "external-data files beside it)"
        )
    return size


def read_model(fd: int, model_path: str, checked_bytes: int) -> bytes:
    """The whole file behind `fd`, from its start, which had `checked_bytes` when check_model_size looked
    at it: at most that and one byte more are read. ModelTooLarge when the file grew past it meanwhile (a
    repository writer can grow it between the check and the read, and a sparse one costs nothing on disk:
    read to its end, a file checked under a 1 MiB bound returned 256 MiB, attacker round 6)."""
    with os.fdopen(os.dup(fd), "rb") as file:
        file.seek(0)
        data = file.read(checked_bytes + 1)
    if len(data) > checked_bytes:
        raise ModelTooLarge(
            f"{model_path} grew while it was read, past the {checked_bytes} bytes it had when its size was "
            "checked (against pool.max_model_bytes): a model file still being written, or grown on purpose, is "
            "not loaded. Write a new model file beside it and rename it into place, then reload"
        )
    return data


def _relative(repository: str, model_path: str) -> str:
    relative = os.path.relpath(os.path.abspath(model_path), os.path.abspath(repository))
    if relative == "." or relative == ".." or relative.startswith("../"):
        raise ModelFileError(f"{model_path} is not inside the model repository {repository}")
    return relative


def _explain(exc: OSError, path: str, repository: str, user: str) -> str:
    if isinstance(exc, OpenAt2Unavailable):
        return f"cannot open {path} safely: {exc.strerror}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot read {path} as {user}: {os.strerror(exc.errno)}. Workers and the prepare helper read model "
            f"files with this user's rights: make every directory from {repository} down to the file searchable "
            "by it and the file readable (e.g. chmod o+x on the directories and o+r on the file, or a group of "
            "that user), or run workers as another user (sandbox.worker_user)"
        )
    if exc.errno == errno.ELOOP:
        return (
            f"{path}: a symlink inside the model repository {repository}; models are read without following "
            "symlinks: put the file or directory itself there"
        )
    if exc.errno == errno.EXDEV:
        return f"{path} leads outside the model repository {repository}"
    return f"cannot open {path}: {os.strerror(exc.errno or 0)}"
