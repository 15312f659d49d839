"""Per-model settings from `<repo>/<model>/config.toml`, validated strictly (unknown keys are errors)."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from openinfer.daemon.steps.steps_config import StepsConfig, StepsConfigError, parse_steps


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and key."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 8
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    # Where a worker batches its own arrivals (the direct path): a batch that has not filled also leaves
    # once no request has come for this long - a closed-loop load that sends fewer requests per worker
    # than max_batch_size would otherwise wait out the whole delay every time. 0: wait the whole delay.
    quiet_us: int = 100


@dataclass(frozen=True)
class CacheConfig:
    """`[cache]`: answers kept per worker (daemon/worker/verdict_cache.py)."""

    entries: int = 1024
    max_bytes: int = 16 * 1024 * 1024
    ttl_s: int = 0  # 0: entries never expire (they go with their model version's workers)
    # False: each identity (uid, CURVE key) has its own entries - a hit would otherwise tell any caller
    # that someone sent these inputs before (by its `cache` field and by its time). True: one cache for
    # all, an operator's choice for inputs that are no secret (found by an attacker, issue #19).
    shared: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "max_bytes": self.max_bytes, "ttl_s": self.ttl_s, "shared": self.shared}


@dataclass(frozen=True)
class ChainConfig:
    """`[chain]`: this entry runs other models of the repository as one request (daemon/steps/, `drive`).
    Its directory has no version of its own: its worker loads each member's newest version, on that
    member's shared weights, under one sandbox."""

    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """Defaults apply when a model has no config.toml; `workers`/`intra_op_threads` may be None = use the pool default."""

    workers: int | None = None
    intra_op_threads: int | None = None
    timeout_ms: int = 30_000  # default per-request deadline when the client sends none
    max_compute_ms: int = 60_000  # hard ceiling on one task's time in a worker, whatever the client asks
    max_request_bytes: int | None = None  # None = the daemon-wide limit
    memory_limit_mb: int | None = None  # RLIMIT_AS for the worker after loading; None = the daemon default
    max_queue: int = 1024  # queued (not yet running) tasks before RESOURCE_EXHAUSTED
    version_policy: str = "all"  # "all" versions in the repository, or "latest" only
    batching: BatchingConfig | None = None
    steps: StepsConfig | None = None  # pre/post processing run inside the worker (daemon/steps/)
    cache: CacheConfig | None = None  # verdicts kept per worker (daemon/worker/verdict_cache.py)
    chain: ChainConfig | None = None  # runs these models of the repository as one request


_INT_KEYS = {"workers", "intra_op_threads", "timeout_ms", "max_compute_ms", "max_request_bytes", "memory_limit_mb", "max_queue"}


def _positive_int(path: Path, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{path}: `{key}` must be a positive integer, got {value!r}")
    return value


def parse_model_config(path: Path, text: str | None = None) -> ModelConfig:
    """`text`: the file's contents, when the caller read them itself (the repository scan does, without
    following symlinks); `path` then only names the file in messages."""
    try:
        raw = tomllib.loads(path.read_text() if text is None else text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    known = {f.name for f in fields(ModelConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key `{key}` (known: {', '.join(sorted(known))})")
        if key in _INT_KEYS:
            values[key] = _positive_int(path, key, value)
        elif key == "version_policy":
            if value not in ("all", "latest"):
                raise ConfigError(f"{path}: `version_policy` must be \"all\" or \"latest\", got {value!r}")
            values[key] = value
        elif key == "batching":
            values[key] = _parse_batching(path, value)
        elif key == "cache":
            values[key] = _parse_cache(path, value)
        elif key == "chain":
            values[key] = _parse_chain(path, value)
        elif key == "steps":
            try:
                values[key] = parse_steps(str(path), value)
            except StepsConfigError as exc:
                raise ConfigError(str(exc)) from None
    if values.get("cache") is not None and values.get("batching") is not None:
        raise ConfigError(f"{path}: a model with `[cache]` cannot batch yet: remove `[batching]` or `[cache]`")
    if values.get("steps") is not None and values.get("batching") is not None:
        raise ConfigError(f"{path}: a model with `[steps]` cannot batch yet: remove `[batching]` (its requests are each one client's data, shaped by its pre step)")
    chain = values.get("chain")
    if chain is not None:
        if values.get("batching") is not None:
            raise ConfigError(f"{path}: a `[chain]` cannot batch: remove `[batching]` (batch its members instead)")
        if values.get("steps") is None:
            raise ConfigError(f"{path}: a `[chain]` needs `[steps] module = ...` with a `drive(inputs, models)` step that calls its models {list(chain.models)}")
    return replace(ModelConfig(), **values)


MAX_CHAIN_MODELS = 8
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a model directory's name (a chain names its models so)


def _parse_chain(path: Path, raw: Any) -> ChainConfig:
    items = dict(_table_items(path, "chain", raw, ChainConfig))
    models = items.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{path}: `chain.models` must be a non-empty list of model names of this repository, e.g. [\"ocr_det\", \"ocr_rec\"]")
    bad = [m for m in models if not MODEL_NAME.match(m)]
    if bad:
        raise ConfigError(f"{path}: `chain.models` entry {bad[0]!r} is not a model name")
    if len(set(models)) != len(models):
        raise ConfigError(f"{path}: `chain.models` names a model twice")
    if len(models) > MAX_CHAIN_MODELS:
        raise ConfigError(f"{path}: `chain.models` names {len(models)} models; at most {MAX_CHAIN_MODELS}")
    return ChainConfig(tuple(models))


def _table_items(path: Path, name: str, raw: Any, table: type) -> list[tuple[str, Any]]:
    """The keys of the `[name]` table, each one of `table`'s fields (a dataclass), else a ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: `{name}` must be a table")
    known = {f.name for f in fields(table)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: unknown key `{name}.{key}` (known: {', '.join(sorted(known))})")
    return list(raw.items())


def _non_negative_int(path: Path, key: str, value: Any, zero: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{path}: `{key}` must be an integer >= 0{zero}, got {value!r}")
    return value


def _parse_cache(path: Path, raw: Any) -> CacheConfig:
    values: dict[str, Any] = {}
    for key, value in _table_items(path, "cache", raw, CacheConfig):
        if key == "shared":
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: `cache.shared` must be true or false, got {value!r}")
            values[key] = value
        elif key == "ttl_s":
            values[key] = _non_negative_int(path, "cache.ttl_s", value, " (0: no expiry)")
        else:
            values[key] = _positive_int(path, f"cache.{key}", value)
    return replace(CacheConfig(), **values)


def _parse_batching(path: Path, raw: Any) -> BatchingConfig:
    values: dict[str, Any] = {}
    for key, value in _table_items(path, "batching", raw, BatchingConfig):
        if key == "preferred_batch_sizes":
            if not isinstance(value, list):
                raise ConfigError(f"{path}: `batching.preferred_batch_sizes` must be a list of integers")
            values[key] = tuple(_positive_int(path, f"batching.{key}", v) for v in value)
        elif key in ("max_queue_delay_us", "quiet_us"):  # 0: never wait / always wait the whole delay
            values[key] = _non_negative_int(path, f"batching.{key}", value)
        else:
            values[key] = _positive_int(path, f"batching.{key}", value)
    config = replace(BatchingConfig(), **values)
    too_big = [size for size in config.preferred_batch_sizes if size > config.max_batch_size]
    if too_big:
        raise ConfigError(f"{path}: `batching.preferred_batch_sizes` {too_big} exceed max_batch_size {config.max_batch_size}")
    return config
