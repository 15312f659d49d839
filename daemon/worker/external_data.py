"""A model's external-data files: each opened beneath the model's own version directory and handed to
onnxruntime from memory, so onnxruntime never resolves a location itself.

A location must name a regular file inside the version directory: no absolute path, no `..`, no symlink
anywhere on the way (openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS). Anything
else fails the load with a reason naming the tensor. onnxruntime copies what it needs while the session is
created (SessionOptions.add_external_initializers_from_files_in_memory matches its names against the
model's locations), so the mappings are closed right after.

A prepared model (model.opt.onnx, written by the untrusted prepare helper, loaded by path so that its
weights file is shared) may only name plain files present as regular files in its own directory.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from openinfer.daemon.files.beneath import open_beneath

from .external_refs import ExternalRef


class ExternalDataError(Exception):
    """An external-data reference the worker refuses to follow; the message names the tensor."""


@dataclass
class ExternalFiles:
    """The mapped contents of every location a model names, by location as the model spells it."""

    buffers: dict[str, mmap.mmap | bytes] = field(default_factory=dict)

    def add_to(self, options: Any) -> None:
        if self.buffers:
            names = list(self.buffers)
            buffers = [self.buffers[name] for name in names]
            options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])

    def close(self) -> None:
        for buffer in self.buffers.values():
            if isinstance(buffer, mmap.mmap):
                buffer.close()
        self.buffers.clear()


def map_external_files(refs: Sequence[ExternalRef], version_dir_fd: int, version_dir: str) -> ExternalFiles:
    """Open and map every referenced file beneath `version_dir_fd`; ExternalDataError on the first refusal."""
    files = ExternalFiles()
    try:
        for ref in refs:
            if ref.location is not None and ref.location in files.buffers:
                continue
            location = _checked_location(ref, version_dir)
            files.buffers[location] = _map(ref, location, version_dir_fd, version_dir)
    except BaseException:
        files.close()
        raise
    return files


def check_prepared_refs(refs: Sequence[ExternalRef], prepared_dir_fd: int, prepared_dir: str) -> None:
    """Every location of a prepared model is a plain file name of a regular file in its directory."""
    for ref in refs:
        location = ref.location or ""
        if location in ("", ".", "..") or "/" in location or "\0" in location:
            raise ExternalDataError(_refusal(ref, "is not a plain file name", prepared_dir))
        try:
            st = os.stat(location, dir_fd=prepared_dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise ExternalDataError(_refusal(ref, f"cannot be found ({exc.strerror})", prepared_dir)) from None
        if not stat.S_ISREG(st.st_mode):
            raise ExternalDataError(_refusal(ref, "is not a regular file", prepared_dir))


def _checked_location(ref: ExternalRef, version_dir: str) -> str:
    location = ref.location
    if location is None:
        raise ExternalDataError(_refusal(ref, "has no location", version_dir))
    if not location or "\0" in location:
        raise ExternalDataError(_refusal(ref, "is empty or holds a NUL byte", version_dir))
    if os.path.isabs(location):
        raise ExternalDataError(_refusal(ref, "is an absolute path", version_dir))
    if ".." in location.split("/"):
        raise ExternalDataError(_refusal(ref, "climbs out with '..'", version_dir))
    return location


def _map(ref: ExternalRef, location: str, version_dir_fd: int, version_dir: str) -> mmap.mmap | bytes:
    try:
        fd = open_beneath(version_dir_fd, location, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ExternalDataError(_refusal(ref, _why(exc), version_dir)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ExternalDataError(_refusal(ref, "is not a regular file", version_dir))
        return mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ) if st.st_size else b""
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is, or passes through, a symlink"
    if exc.errno == errno.EXDEV:
        return "leads outside the directory"
    if exc.errno == errno.ENOENT:
        return "does not exist"
    return f"cannot be opened ({exc.strerror})"


def _refusal(ref: ExternalRef, problem: str, directory: str) -> str:
    return (
        f"external data of tensor {ref.tensor!r} at {ref.location!r} {problem}: a model's external data must be "
        f"a regular file inside its own directory ({directory})"
    )
