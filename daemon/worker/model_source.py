"""What a worker or the prepare helper loads, all of it opened before the boot policy and with the rights of
the worker user: the model file (beneath the repository, no symlinks: daemon/files/model_files.py) and its
external-data files (beneath its version directory: external_data.py), or, for a worker on shared weights,
the prepared directory's model, whose external references are checked too (the helper that wrote it ran
the untrusted model)."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from openinfer.daemon.files.model_files import ModelFileError, check_model_size, open_model_file, read_model
from openinfer.daemon.files.prepared_layout import OPT_MODEL, output_limit_bytes

from .bootconfig import WorkerBootConfig
from .external_data import ExternalDataError, ExternalFiles, check_prepared_refs, map_external_files
from .external_refs import MalformedModel, external_refs


class PreparedInvalid(ValueError):
    """The prepared directory is not what the supervisor checked it to be; its weights must not be used."""


@dataclass
class ModelSource:
    model: bytes | None  # the source model's bytes; None when serving from prepared_dir
    external: ExternalFiles = field(default_factory=ExternalFiles)
    prepared_dir: str | None = None

    def close(self) -> None:
        self.external.close()
        self.model = None


def open_model_source(config: WorkerBootConfig, version_dir_fd: int, user: str) -> ModelSource:
    """Raises ModelFileError, ExternalDataError or PreparedInvalid with a message for `openinfer status`.
    The source model is opened even when serving prepared weights: a worker user that cannot read the
    model must not serve it from the cache either."""
    model_fd = open_model_file(version_dir_fd, config.model_path, config.repository, user)
    try:
        # Before a byte is read (the supervisor checked it too, but the file may have grown since, and with
        # pool.share_weights off the supervisor never opens it).
        size = check_model_size(model_fd, config.model_path, config.max_model_bytes)
        if config.prepared_dir:
            _check_prepared(config.prepared_dir, config.max_model_bytes)
            return ModelSource(None, prepared_dir=config.prepared_dir)
        model = read_model(model_fd, config.model_path, size)  # no more than was checked: it may grow meanwhile
    finally:
        os.close(model_fd)
    try:
        refs = external_refs(model)
    except MalformedModel as exc:
        raise ModelFileError(f"{config.model_path} is not a valid ONNX model: {exc}") from None
    return ModelSource(model, map_external_files(refs, version_dir_fd, os.path.dirname(config.model_path)))


def _check_prepared(directory: str, max_model_bytes: int) -> None:
    """The prepared model's external references stay in its directory. Its file is read no larger than
    the helper may write one (output_limit_bytes, as the supervisor checks it before taking the directory
    in), nor past the size it had here: nothing a worker reads goes unbounded."""
    try:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PreparedInvalid(f"{directory}: {exc.strerror}") from None
    try:
        model_fd = os.open(OPT_MODEL, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(model_fd).st_mode):
                raise PreparedInvalid(f"{directory}/{OPT_MODEL} is not a regular file")
            path = f"{directory}/{OPT_MODEL}"
            size = os.fstat(model_fd).st_size
            if size > output_limit_bytes(max_model_bytes):
                raise PreparedInvalid(f"{path} is {size} bytes, more than the prepare helper may write for a source of at most {max_model_bytes} bytes")
            check_prepared_refs(external_refs(read_model(model_fd, path, size)), dir_fd, directory)
        finally:
            os.close(model_fd)
    except (OSError, MalformedModel, ExternalDataError, ModelFileError) as exc:
        raise PreparedInvalid(f"{directory}/{OPT_MODEL}: {exc}") from None
    finally:
        os.close(dir_fd)
