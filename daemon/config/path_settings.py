"""Path settings, resolved once when `openinfer serve` starts.

The supervisor, the preparation helper and the workers all read what the path settings name, but not
from the same place: workers and the helper run with `/` as their working directory, so a relative
`--models some/dir` worked for the supervisor's scan and then failed in every worker ("cannot read
some/dir/m/1/model.onnx"). `resolve_paths` makes every setting marked `path=` in settings.py absolute
against the directory the daemon was started in (the same one on reload: the daemon never changes
it, and `openinfer serve` captures it at start), and checks that each one exists, so a typo stops the
daemon at once with the setting and the path named, instead of failing later and elsewhere.

Policies are a shipped name (`worker`, policies/worker.toml) or a file; only a file is made absolute.
"""
from __future__ import annotations

import os
import re
from dataclasses import fields, replace
from importlib import resources
from pathlib import Path

from openinfer.daemon.modelstore.modelconfig import ConfigError
from .settings import CREATED_DIR, CREATED_FILE, EXISTING_DIR, KEY_FILE, POLICY, SECRET_FILE, SECTIONS, Settings

_SHIPPED_NAME = re.compile(r"[A-Za-z0-9_-]+")  # as openinfer.sandbox.loader reads a policy name


def resolve_paths(settings: Settings, start_dir: Path) -> Settings:
    """Every path setting absolute against `start_dir`; ConfigError naming the first setting whose
    path does not exist (or, for what the daemon creates, whose parent directory does not)."""
    for section, cls in SECTIONS.items():
        group = getattr(settings, section)
        updates: dict[str, str] = {}
        for f in fields(cls):
            kind = f.metadata.get("path")
            value = getattr(group, f.name)
            if kind is None or not value:  # empty: the setting is off or takes its default place
                continue
            updates[f.name] = _resolve(f"{section}.{f.name}", kind, value, start_dir)
        if updates:
            settings = replace(settings, **{section: replace(group, **updates)})
    return settings


def _resolve(key: str, kind: str, value: str, start_dir: Path) -> str:
    if kind == POLICY and _SHIPPED_NAME.fullmatch(value):
        shipped = Path(str(resources.files("openinfer.policies")))
        if not (shipped / f"{value}.toml").is_file():
            names = ", ".join(sorted(p.stem for p in shipped.glob("*.toml")))
            raise ConfigError(f"{key}: no shipped policy named {value!r} (shipped: {names}); a policy file needs a path, e.g. ./{value}.toml")
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(os.path.normpath(start_dir / path))
    note = f" (given as {value!r}, relative to {start_dir}, where openinfer serve started)" if value != str(path) else ""
    if kind == EXISTING_DIR:
        _check_dir(key, path, note)
    elif kind in (KEY_FILE, POLICY, SECRET_FILE):  # (a secret file's privacy is checked where it is read: read_secret_file)
        _check_file(key, path, note)
        if kind == KEY_FILE and os.path.lexists(f"{path}.pub"):  # (optional: the public key is derived from the secret one)
            _check_file(f"{key} (its public key)", Path(f"{path}.pub"), note)
    elif kind in (CREATED_DIR, CREATED_FILE):
        if kind == CREATED_DIR and path.exists():
            _check_dir(key, path, note)
        elif not path.parent.is_dir():
            raise ConfigError(f"{key}: {path} cannot be created: {path.parent} does not exist{note}")
    else:
        raise AssertionError(f"{key}: unknown path kind {kind!r}")
    return str(path)


def _check_dir(key: str, path: Path, note: str) -> None:
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist{note}")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory{note}")


def _check_file(key: str, path: Path, note: str) -> None:
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist{note}")
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory, not a file{note}")
