"""Reading a daemon policy file (access, clients): a bare name is `policies/<name>.toml`, else a path."""
from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from openinfer.daemon.modelstore.modelconfig import ConfigError


def read_policy_toml(name_or_path: str, kind: str) -> tuple[Path, dict[str, Any]]:
    """(path, parsed TOML); ConfigError naming the file when it is missing or not TOML."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        text = path.read_text() if path.exists() else None
    else:
        entry = resources.files("openinfer.policies") / f"{name_or_path}.toml"
        path = Path(str(entry))
        text = entry.read_text() if entry.is_file() else None
    if text is None:
        raise ConfigError(f"{kind} policy {name_or_path!r} not found")
    try:
        return path, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
