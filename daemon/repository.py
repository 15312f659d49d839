"""Model repository layout: `<repo>/<model>/<version>/model.onnx`, optional `<repo>/<model>/config.toml`."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .modelconfig import ConfigError, ModelConfig, parse_model_config

log = logging.getLogger("openinfer.repository")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODEL_FILE = "model.onnx"


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


def scan_repository(root: Path) -> list[ModelEntry]:
    """All model directories under `root`, sorted by name. Problems are reported per model, not raised."""
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    entries: list[ModelEntry] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entries.append(_scan_model(model_dir))
    return entries


def _scan_model(model_dir: Path) -> ModelEntry:
    name = model_dir.name
    if not MODEL_NAME.match(name):
        return ModelEntry(name, ModelConfig(), (), error=f"invalid model name {name!r}")
    config = ModelConfig()
    config_path = model_dir / "config.toml"
    if config_path.exists():
        try:
            config = parse_model_config(config_path)
        except ConfigError as exc:
            return ModelEntry(name, config, (), error=str(exc))
    versions = []
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit() and (child / MODEL_FILE).is_file():
            versions.append(ModelVersionEntry(name, int(child.name), child / MODEL_FILE))
    versions.sort(key=lambda v: v.version)
    if not versions:
        return ModelEntry(name, config, (), error=f"no <version>/{MODEL_FILE} under {model_dir}")
    if config.version_policy == "latest":
        versions = versions[-1:]
    return ModelEntry(name, config, tuple(versions))
