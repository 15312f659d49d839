"""Model repository layout: `<repo>/<model>/<version>/model.onnx`, optional `<repo>/<model>/config.toml`.

The scan (as the daemon's user, often root) never follows a symlink below the repository root: a model
directory, version directory, model file or config.toml that is a symlink makes the model fail with a
reason saying so. Workers and the prepare helper open the files again themselves, beneath the repository
and with the worker user's rights (daemon/files/model_files.py); this scan only finds what to serve.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .modelconfig import MODEL_NAME, ConfigError, ModelConfig, parse_model_config

log = logging.getLogger("openinfer.repository")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
MAX_CONFIG_BYTES = 64 * 1024  # a model's config.toml: the shipped ones are 33 bytes to 1.3 KB
MAX_SERVED_VERSIONS = 16  # of one model, with version_policy = "all"
MAX_VERSION_DIGITS = 18  # a version travels as a msgpack integer: well inside 64 bits
VERSION_NAME = re.compile(rf"^(0|[1-9][0-9]{{0,{MAX_VERSION_DIGITS - 1}}})$")
CHAIN_VERSION = 1  # a chain (`[chain]` in config.toml) is served as version 1 of its name


@dataclass(frozen=True)
class ModelVersionEntry:
    name: str
    version: int
    path: Path  # the model.onnx file


@dataclass(frozen=True)
class ModelEntry:
    """One model directory as found on disk. `error` is set when the directory cannot be served at all."""

    name: str
    config: ModelConfig
    versions: tuple[ModelVersionEntry, ...]
    error: str | None = None


class _Refused(Exception):
    """Something in a model directory the scan will not follow or read; the message says what and why."""


def scan_repository(root: Path) -> list[ModelEntry]:
    """All model directories under `root`, sorted by name. Problems are reported per model, not raised."""
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):  # the root itself is the operator's setting: it may be reached through a symlink
            raise ConfigError(f"model repository {root} is not a directory")
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:  # (EACCES raised out of the start and every reload: round 41)
        raise ConfigError(f"model repository {root}: {exc.strerror}") from None
    entries: list[ModelEntry] = []
    for child in children:
        if child.name.startswith("."):
            continue
        shown = _printable(child.name)
        if shown != child.name:  # not UTF-8: msgpack could not send the name in any reply (round 39)
            entries.append(ModelEntry(shown, ModelConfig(), (), error=f"invalid model name {shown!r}: not UTF-8"))
        elif child.is_symlink():
            entries.append(ModelEntry(child.name, ModelConfig(), (), error=_symlink(Path(child.path))))
        elif child.is_dir(follow_symlinks=False):
            entries.append(_scan_model(Path(child.path)))
    return entries


def _printable(name: str) -> str:
    """A file name as a reply can carry it: bytes that are not UTF-8 (which os.scandir gives back as lone
    surrogates) written as backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _scan_model(model_dir: Path) -> ModelEntry:
    name = model_dir.name
    if not MODEL_NAME.match(name):
        return ModelEntry(name, ModelConfig(), (), error=f"invalid model name {name!r}")
    try:
        config = _read_config(model_dir / CONFIG_FILE)
        versions = _scan_versions(name, model_dir)
    except (_Refused, ConfigError) as exc:
        return ModelEntry(name, ModelConfig(), (), error=str(exc))
    except OSError as exc:  # a directory the daemon may not list: this model's failure, not the scan's
        return ModelEntry(name, ModelConfig(), (), error=f"{exc.filename or model_dir}: {exc.strerror}")
    except Exception as exc:  # noqa: BLE001  (whatever else one entry's files raise fails that entry alone)
        log.exception("a model directory could not be read", extra={"model": name})
        return ModelEntry(name, ModelConfig(), (), error=f"{model_dir} cannot be read ({type(exc).__name__}): the daemon's log has the details")
    if config.chain is not None:
        if versions:
            return ModelEntry(name, config, (), error=f"{model_dir} has `[chain]` and a <version>/{MODEL_FILE}: a chain runs its members' models and has none of its own")
        if name in config.chain.models:
            return ModelEntry(name, config, (), error=f"{model_dir / CONFIG_FILE}: a chain cannot name itself in `chain.models`")
        # One version, 1, whose "file" is config.toml: what a reload compares (with its members').
        return ModelEntry(name, config, (ModelVersionEntry(name, CHAIN_VERSION, model_dir / CONFIG_FILE),))
    if not versions:
        return ModelEntry(name, config, (), error=f"no <version>/{MODEL_FILE} under {model_dir}")
    if config.version_policy == "latest":
        versions = versions[-1:]
    elif len(versions) > MAX_SERVED_VERSIONS:
        # Each version served is walked at every reload, on the supervisor's loop (its files' stamps, up to
        # 1,000 entries a version): round 72's 1,000 versions of 999 entries held it 4.5-7.3 s a reload.
        return ModelEntry(name, config, (), error=f"{model_dir} has {len(versions)} versions and `version_policy = \"all\"`: at most {MAX_SERVED_VERSIONS} are served at once; remove old version directories, or serve the newest only (`version_policy = \"latest\"`)")
    return ModelEntry(name, config, tuple(versions))


def _scan_versions(name: str, model_dir: Path) -> list[ModelVersionEntry]:
    versions = []
    for child in os.scandir(model_dir):
        if not child.name.isdigit():
            continue
        if not VERSION_NAME.match(child.name):
            # str.isdigit() is true of "²", "١" and "01" too: int() of the first raised out of the scan and
            # stopped every reload and the start (round 37); the others were a second "version 1".
            raise _Refused(f"{child.path}: a version directory is named by a decimal number in ASCII digits, without leading zeros, at most {MAX_VERSION_DIGITS} digits (e.g. 1, 2, 20261207)")
        if child.is_symlink():
            raise _Refused(_symlink(Path(child.path)))
        model_file = Path(child.path) / MODEL_FILE
        if not child.is_dir(follow_symlinks=False) or not os.path.lexists(model_file):
            continue
        mode = os.lstat(model_file).st_mode
        if stat.S_ISLNK(mode):
            raise _Refused(_symlink(model_file))
        if not stat.S_ISREG(mode):
            raise _Refused(f"{model_file} is not a regular file")
        versions.append(ModelVersionEntry(name, int(child.name), model_file))
    return sorted(versions, key=lambda v: v.version)


def _read_config(path: Path) -> ModelConfig:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ModelConfig()
    except OSError as exc:
        raise _Refused(_symlink(path) if os.path.islink(path) else f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Refused(f"{path} is not a regular file")
        raw = file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise _Refused(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return parse_model_config(path, raw.decode())
    except UnicodeDecodeError:
        raise _Refused(f"{path} is not UTF-8 text") from None


def _symlink(path: Path) -> str:
    return (
        f"{path} is a symlink; the model repository is read without following symlinks: put the file or "
        "directory itself there"
    )
