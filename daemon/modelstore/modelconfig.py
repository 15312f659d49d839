"""Per-model settings from `<repo>/<model>/config.toml`, validated strictly (unknown keys are errors)."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from openinfer.daemon.steps.steps_config import StepsConfig, StepsConfigError, parse_steps
from openinfer.wire.protocol import MAX_TIMEOUT_MS

MAX_CONFIG_DOTS = 1024  # in a model's config.toml: a bound on what tomllib spends on dotted keys (parse_model_config)


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
    # The chains of this repository that may run this model: a chain's worker reads its members' files and
    # weights and runs them as its own steps decide, so a member says which chains may (round 35: without
    # it, any entry declaring `[chain] models = ["victim"]` read the victim's weights).
    chains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Bound:
    """The values a number in config.toml may take, and why its ceiling is there (said when one is over it)."""

    low: int
    high: int
    why: str


# Every number of a model's config.toml has a ceiling. Whoever writes the repository (a model's publisher)
# should not be obeyed without limit: these counts start processes and threads as the daemon's children
# (all of a model's workers at once, each with its onnxruntime threads, before any rlimit), hold memory,
# and pass through fixed-width fields (a worker's stop message packs max_compute_ms in ns as 64 bits).
# A value over its ceiling fails the model with the key, the value and the ceiling; other models serve.
TiB = 1 << 40
BOUNDS: dict[str, Bound] = {
    "workers": Bound(1, 64, "worker processes per version, all started at once"),
    "intra_op_threads": Bound(1, 64, "onnxruntime threads per worker, started before its limits are set"),
    "timeout_ms": Bound(1, MAX_TIMEOUT_MS, "the longest timeout a client may send, about 24.8 days"),
    "max_compute_ms": Bound(1, MAX_TIMEOUT_MS, "the longest timeout a client may send, about 24.8 days"),
    "max_request_bytes": Bound(1, TiB, "1 TiB"),
    "memory_limit_mb": Bound(1, TiB >> 20, "1 TiB of address space"),
    "max_queue": Bound(1, 65_536, "queued requests of one model"),
    "batching.max_batch_size": Bound(1, 1 << 20, "rows in one batch"),
    "batching.preferred_batch_sizes": Bound(1, 1 << 20, "rows in one batch"),
    "batching.max_queue_delay_us": Bound(0, 10_000_000, "10 s of waiting for company"),
    "batching.quiet_us": Bound(0, 1_000_000, "1 s of quiet"),
    "cache.entries": Bound(1, 1 << 20, "answers kept per worker"),
    "cache.max_bytes": Bound(1, TiB, "1 TiB"),
    "cache.ttl_s": Bound(0, 365 * 24 * 3600, "one year"),
}
MAX_PREFERRED_BATCH_SIZES = 16  # entries of batching.preferred_batch_sizes, each looked at per batch
_INT_KEYS = {key for key in BOUNDS if "." not in key}  # the top-level numbers; the others are in their tables


def _bounded_int(path: Path, key: str, value: Any, zero: str = "") -> int:
    """`value` as the integer `key` (a dotted name, e.g. "batching.quiet_us") may take, else a
    ConfigError naming the key, the value and the bound. `zero`: what 0 means, where it is allowed."""
    bound = BOUNDS[key]
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # Not printed: str() of a 0x-literal of 5,000 digits raises (round 39).
        raise ConfigError(f"{path}: `{key}` is {'over' if value > 0 else 'under'} its bound{'' if value < 0 else f' {bound.high}'}: an integer of {value.bit_length()} bits")
    if not isinstance(value, int) or isinstance(value, bool) or value < bound.low:
        kind = "a positive integer" if bound.low == 1 else f"an integer >= {bound.low}{zero}"
        raise ConfigError(f"{path}: `{key}` must be {kind}, got {value!r}")
    if value > bound.high:
        raise ConfigError(f"{path}: `{key}` = {value} is over its bound {bound.high} ({bound.why})")
    return value


def parse_model_config(path: Path, text: str | None = None) -> ModelConfig:
    """`text`: the file's contents, when the caller read them itself (the repository scan does, without
    following symlinks); `path` then only names the file in messages."""
    try:
        text = path.read_text() if text is None else text
    except OSError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if text.count(".") > MAX_CONFIG_DOTS:
        # tomllib keeps every prefix of a dotted key: a key of N parts costs N^2 (round 72: one line of 64,000
        # parts, 128 KB, held the supervisor 21.8 s and 7.8 GB at a reload, at the start too).
        raise ConfigError(f"{path}: more than {MAX_CONFIG_DOTS} dots (dotted keys, table names, numbers and strings together): a model's config.toml needs far fewer")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a number of 5,000 digits, arrays nested 600 deep (round 39)
        raise ConfigError(f"{path}: cannot be read: {type(exc).__name__} (a number too long, or values nested too deep)") from None
    try:
        return _parse_model_config(path, raw)
    except ConfigError:  # (a ValueError itself)
        raise
    except (ValueError, RecursionError):  # a value that cannot even be shown in the message about it
        raise ConfigError(f"{path}: a value in it is too large to read or to show (an integer of thousands of digits?)") from None


def _parse_model_config(path: Path, raw: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key `{key}` (known: {', '.join(sorted(known))})")
        if key in _INT_KEYS:
            values[key] = _bounded_int(path, key, value)
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
        elif key == "chains":
            values[key] = _model_names(path, "chains", value, MAX_CHAINS_OF_A_MODEL, "chains of this repository that may run this model, e.g. [\"ocr\"]", empty=True)
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
        if values.get("chains"):
            raise ConfigError(f"{path}: a `[chain]` is never another chain's model: remove `chains`")
        if values.get("steps") is None:
            raise ConfigError(f"{path}: a `[chain]` needs `[steps] module = ...` with a `drive(inputs, models)` step that calls its models {list(chain.models)}")
    return replace(ModelConfig(), **values)


MAX_CHAIN_MODELS = 8
MAX_CHAINS_OF_A_MODEL = 64
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a model directory's name (a chain names its models so)


def _parse_chain(path: Path, raw: Any) -> ChainConfig:
    items = dict(_table_items(path, "chain", raw, ChainConfig))
    return ChainConfig(_model_names(path, "chain.models", items.get("models"), MAX_CHAIN_MODELS, "model names of this repository, e.g. [\"ocr_det\", \"ocr_rec\"]"))


def _model_names(path: Path, key: str, names: Any, most: int, what: str, empty: bool = False) -> tuple[str, ...]:
    """`names` as a list of model directory names, each once, at most `most`, else a ConfigError."""
    if not isinstance(names, list) or not (names or empty) or not all(isinstance(m, str) for m in names):
        raise ConfigError(f"{path}: `{key}` must be a {'' if empty else 'non-empty '}list of {what}")
    bad = [m for m in names if not MODEL_NAME.match(m)]
    if bad:
        raise ConfigError(f"{path}: `{key}` entry {bad[0]!r} is not a model name")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: `{key}` names a model twice")
    if len(names) > most:
        raise ConfigError(f"{path}: `{key}` names {len(names)} models; at most {most}")
    return tuple(names)


def _table_items(path: Path, name: str, raw: Any, table: type) -> list[tuple[str, Any]]:
    """The keys of the `[name]` table, each one of `table`'s fields (a dataclass), else a ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: `{name}` must be a table")
    known = {f.name for f in fields(table)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: unknown key `{name}.{key}` (known: {', '.join(sorted(known))})")
    return list(raw.items())


def _parse_cache(path: Path, raw: Any) -> CacheConfig:
    values: dict[str, Any] = {}
    for key, value in _table_items(path, "cache", raw, CacheConfig):
        if key == "shared":
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: `cache.shared` must be true or false, got {value!r}")
            values[key] = value
        elif key == "ttl_s":
            values[key] = _bounded_int(path, "cache.ttl_s", value, " (0: no expiry)")
        else:
            values[key] = _bounded_int(path, f"cache.{key}", value)
    return replace(CacheConfig(), **values)


def _parse_batching(path: Path, raw: Any) -> BatchingConfig:
    values: dict[str, Any] = {}
    for key, value in _table_items(path, "batching", raw, BatchingConfig):
        if key == "preferred_batch_sizes":
            if not isinstance(value, list):
                raise ConfigError(f"{path}: `batching.preferred_batch_sizes` must be a list of integers")
            if len(value) > MAX_PREFERRED_BATCH_SIZES:
                raise ConfigError(f"{path}: `batching.preferred_batch_sizes` lists {len(value)} sizes; at most {MAX_PREFERRED_BATCH_SIZES}")
            values[key] = tuple(_bounded_int(path, f"batching.{key}", v) for v in value)
        else:  # max_queue_delay_us, quiet_us: 0 = never wait / always wait the whole delay
            values[key] = _bounded_int(path, f"batching.{key}", value)
    config = replace(BatchingConfig(), **values)
    too_big = [size for size in config.preferred_batch_sizes if size > config.max_batch_size]
    if too_big:
        raise ConfigError(f"{path}: `batching.preferred_batch_sizes` {too_big} exceed max_batch_size {config.max_batch_size}")
    return config
