"""The daemon's settings: one typed, frozen model that is the single source for the config file,
`OPENINFER_<SECTION>_<KEY>` environment variables, CLI flags and the table in docs/CONFIG.md.

Precedence: built-in default < config file < environment < command-line flag.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from openinfer.daemon.modelstore.modelconfig import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/openinfer/openinfer.toml")


# What a reload (SIGHUP, `openinfer reload`) does with a changed setting; declared per setting below and
# shown in docs/CONFIG.md. The reload's reply and log list the changed keys of each class.
LIVE = "live"  # applied at once (including the policy files, which every reload reads again)
NEW_WORKERS = "new workers"  # applied to workers (and preparations) started after the reload
RESTART = "restart"  # needs a restart; until then the running value stays in force
RELOAD_CLASSES = (LIVE, NEW_WORKERS, RESTART)


# What a path setting names (its `path` metadata). daemon/config/path_settings.py makes each one absolute
# against the directory `openinfer serve` started in, and checks it, before anything reads it.
EXISTING_DIR = "existing directory"
CREATED_DIR = "directory, created if missing"
KEY_FILE = "existing key file (and its .pub)"
SECRET_FILE = "existing file, private (mode 600 or 640)"
CREATED_FILE = "file, created if missing"
POLICY = "policy: a shipped name or an existing file"


def _opt(default: Any, help: str, path: str | None = None, reload: str = LIVE) -> Any:
    assert reload in RELOAD_CLASSES
    metadata = {"help": help, "reload": reload}
    if path is not None:
        metadata["path"] = path
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    models: str = _opt("", "Model repository directory: <models>/<name>/<version>/model.onnx.", EXISTING_DIR)
    socket: str = _opt("", "Address to serve on: ipc://PATH or tcp://HOST:PORT. Empty = $XDG_RUNTIME_DIR/openinfer/openinfer.sock, else /run/openinfer/openinfer.sock.", reload=RESTART)
    socket_mode: int = _opt(0o660, "Permission bits of the ipc:// socket file (owner + client group).", reload=RESTART)
    socket_group: str = _opt("", "Group given to the ipc:// socket file (clients in it may connect). Empty = unchanged.", reload=RESTART)
    max_request_bytes: int = _opt(64 * 1024 * 1024, "Largest request accepted: the sum of its tensor frames (the header, at most 64 KiB, is not counted). A larger one is answered RESOURCE_EXHAUSTED and its bytes are skipped, not stored.")
    max_queued_bytes: int = _opt(1024 * 1024 * 1024, "Bytes of request data held in queues across all models before RESOURCE_EXHAUSTED.")
    drain_grace_s: float = _opt(30.0, "On SIGTERM: seconds to finish queued and running tasks before stopping hard.")
    runtime_dir: str = _opt("", "Private directory for prepared weights and the workers' working directory (an instance-<pid> directory inside it). Empty = $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), else $TMPDIR/openinfer-<uid>. It must belong to the daemon's user, be writable by nobody else and not be a symlink, or the daemon refuses to start.", CREATED_DIR, reload=RESTART)
    cache_dir: str = _opt("", "Where prepared (shared, pre-packed) weights are kept across restarts, an entry per model version and its files; checked like runtime_dir. Entries no served version maps are set aside after each start, reload and preparation, and removed at the next start: one daemon per cache_dir (it holds `.lock` there; a second is refused at start). Empty = inside the runtime directory, removed at exit.", CREATED_DIR, reload=RESTART)
    access_policy: str = _opt("access", "Who may call which operations on which models: a policy name in policies/ or a path. Empty = every local peer may do everything.", POLICY)
    client_policy: str = _opt("clients", "Per-client limits: a policy name in policies/ or a path (see policies/clients.toml). Empty = built-in defaults.", POLICY)
    peer_strike_limit: int = _opt(16, "A connection that sends this many requests no conforming client sends (undecodable header, over a size limit) is dropped. 0 = never.")
    max_connections: int = _opt(512, "Client connections held at once, at most half of them still in their handshake (a new connection displaces the oldest handshake: docs/PROTOCOL.md 2.1); with every one past its handshake, more wait in the kernel's listen backlog until one closes. Keep it well below the process's open-file limit.")
    max_connections_per_identity: int = _opt(64, "Client connections one identity (a uid, a CURVE key) may hold at once; a connection over it is closed at once.")
    max_reply_backlog_bytes: int = _opt(64 * 1024 * 1024, "While more reply bytes than this wait for a connection to read them, its requests are not read (a slow reader slows only itself).")
    max_connection_buffers_bytes: int = _opt(0, "Bytes held for all client connections together (unfinished requests in, requests read and not handled yet, unread replies out); over it, the identity holding the most loses its connection holding the most, idle or not, until it holds. 0 = half the supervisor's memory limit.")
    max_worker_message_bytes: int = _opt(1024 * 1024 * 1024, "Largest message a worker may send the supervisor (one batch's outputs); a worker that sends more is retired. Also the largest reply a client of the direct path takes from a worker (the lease's max_reply_bytes).")
    max_supervisor_rss_mb: int = _opt(0, "Above this resident memory the supervisor cuts client connections holding buffered bytes, idle or not: the identity holding the most first, its largest connection. 0 = max_queued_bytes + 4 x max_request_bytes + 256 MiB.")
    lease_ttl_s: float = _opt(5.0, "How long a lease for the direct path lasts (docs/PROTOCOL.md section 17): the longest a client whose access was revoked can still use it. Every reload also revokes every lease at once (requests already accepted are still answered).")
    starvation_ms: int = _opt(1000, "A queued request waiting longer than this is served before higher priorities (aging).")
    curve_secret_key_file: str = _opt("", "tcp:// with CURVE: file holding the server's Z85 secret key (40 characters; `openinfer keygen`), private (mode 600, or 640 for a supplementary group of the daemon's - never its own group nor server.socket_group, which its clients get; root's or the daemon's; no ACL). Public key: the same path + .pub", KEY_FILE, reload=RESTART)
    insecure_tcp: bool = _opt(False, "Allow tcp:// without CURVE. Logged loudly; never on a shared network.", reload=RESTART)


@dataclass(frozen=True)
class PoolSettings:
    workers: int = _opt(1, "Worker processes per model version (a model's config.toml `workers` wins).")
    max_workers: int = _opt(64, "Worker processes alive at once, of all models and versions (a chain's own, and a retiring version's until they exit). A version that would need more fails to load, naming this key, and a later reload retries it; a replacement loads beside the version it replaces, so reloading a model needs room for both.")
    intra_op_threads: int = _opt(1, "onnxruntime intra-op threads per worker (a model's config.toml wins).", reload=NEW_WORKERS)
    ready_timeout_s: float = _opt(120.0, "A worker that is not ready this long after spawn is killed; so is a prepare helper not done this long after its start (its model's workers then load their own copies).", reload=NEW_WORKERS)
    respawn_backoff_ms: int = _opt(100, "First delay before replacing a worker that crashed or was killed for a run past max_compute_ms; doubles per such exit until the daemon sees a request answered through its socket, or a minute passes without one (a success a worker books in its direct-path ledger is its own word and does not reset it).")
    respawn_backoff_max_ms: int = _opt(10_000, "Ceiling of the respawn delay.")
    share_weights: bool = _opt(True, "Prepare each model once and let its workers map the same pre-packed weights. They are kept under a key of the model version (never shared by two) and of the bytes of model.onnx and of every file beside it in its version directory (its external data among them): a version directory of more than 1000 entries, or whose other files come to more than pool.max_model_bytes or sandbox.memory_limit_mb, whichever is larger (a model's own config.toml cannot raise it), loads unshared, with the reason in `openinfer status`.", reload=NEW_WORKERS)
    share_min_bytes: int = _opt(8 * 1024 * 1024, "Models smaller than this are loaded privately by each worker (sharing saves little).", reload=NEW_WORKERS)
    max_model_bytes: int = _opt(2 * 1024**3, "Largest model file (model.onnx) a model version may have, by its apparent size (a sparse file counts in full). A larger one fails to load at once, naming this key, before the supervisor hashes it or a worker reads it. 2 GiB is ONNX's own limit (protobuf's): larger weights go in external-data files, which this does not count.", reload=NEW_WORKERS)
    ping_interval_s: float = _opt(2.0, "How often idle workers are pinged (liveness).")
    ping_grace_s: float = _opt(5.0, "An idle worker that has not answered a ping this long is killed and replaced.")
    direct: bool = _opt(True, "Give each worker its own endpoint beside the socket (ipc:// only), so that clients holding a lease send infer to it in one hop instead of through the supervisor.", reload=NEW_WORKERS)
    worker_spin_us: int = _opt(50, "While requests keep arriving on its endpoint, a worker looks for the next one this long before it sleeps: a wake-up from sleep costs more than that on small VMs. 0 = never; an idle worker always sleeps.", reload=NEW_WORKERS)
    crash_loop_limit: int = _opt(5, "Consecutive crashes (without a successful task in between) before a model goes UNAVAILABLE.")
    crash_strikes: int = _opt(3, "A worker that ends itself (an abort, a fault, a forbidden system call, an exit) while it runs the requests of one client only was crashed by that client's input, as far as anyone can tell: its client's strike, not a step toward crash_loop_limit. A client with this many strikes on a model within 10 minutes is refused it (RESOURCE_EXHAUSTED, with retry_after_s) until the first of them is 10 minutes old; what it has queued is answered so and its leases are revoked. 0 = no strikes: such crashes count toward crash_loop_limit as any other. Off while the workers' uid is shared with other processes (sandbox.worker_user = \"nobody\" as root; the daemon says so at start): any process of that uid could send a worker an abort and have a client blamed.")


@dataclass(frozen=True)
class SandboxSettings:
    enabled: bool = _opt(True, "Run workers under seccomp, no_new_privs and rlimits. Off only with --insecure-no-sandbox (or false here, warned at start); a reload never turns it off: the workers it would start could rewrite another model's shared weights (round 43).", reload=RESTART)
    boot_policy: str = _opt("boot", "Policy (name in policies/ or a path) a worker loads its model under.", POLICY, reload=NEW_WORKERS)
    serve_policy: str = _opt("worker", "Policy (name in policies/ or a path) a worker serves under.", POLICY, reload=NEW_WORKERS)
    worker_user: str = _opt("nobody", "User workers drop to when the daemon runs as root: a user name, or UID:GID, ids of their own that need no account (never 0). `nobody` is shared: any process of uid 65534 can stop or kill the workers (the daemon logs a warning); give them ids no one else uses.", reload=RESTART)
    memory_limit_mb: int = _opt(4096, "Default address-space limit (RLIMIT_AS) per worker after loading, MiB; 0 = none.", reload=NEW_WORKERS)
    max_open_files: int = _opt(64, "RLIMIT_NOFILE for workers (onnxruntime and the worker's own descriptors need a few dozen); a worker takes at most this less 16 direct connections.", reload=NEW_WORKERS)
    landlock: bool = _opt(True, "Restrict worker file access with Landlock where the kernel has it.", reload=NEW_WORKERS)
    shared_uid_without_landlock: bool = _opt(False, "A daemon not run as root (the shipped unit) gives its workers its own uid; without Landlock (sandbox.landlock = false, or a kernel before 5.13) a worker taken over by its model then reads every file the daemon can - the CURVE secret key, the metrics token, the weights cache, every model - so the daemon refuses to start. true: start anyway, knowingly (a kernel without Landlock). Run as root with sandbox.worker_user instead where you can.", reload=RESTART)
    namespaces: bool = _opt(True, "Put workers in new network/IPC (and user) namespaces where allowed.", reload=NEW_WORKERS)


@dataclass(frozen=True)
class LogSettings:
    level: str = _opt("info", "Log level: debug, info, warning, error.")
    access_log_sample: float = _opt(0.0, "Fraction of tasks written to the access log (0 = off, 1 = every task).")


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = _opt("", "Serve Prometheus metrics over HTTP on HOST:PORT (loopback recommended; no authentication unless metrics.token_file). A scrape counts every request answered before it began. At most 8 connections at once (10 s each); 2 scrapes rendered a second after a burst of 10 (beyond: the last text again). Empty = off.", reload=RESTART)
    token_file: str = _opt("", "File holding the token every scrape of metrics.listen must send (`Authorization: Bearer TOKEN`; Prometheus: `authorization: {credentials_file: ...}`): 16 to 4096 visible ASCII characters, the file private (mode 600, or 640 for a supplementary group of the daemon's - never its own group nor server.socket_group, which its clients get; root's or the daemon's; no ACL). A scrape without it gets 401. Empty = no authentication: any local user can scrape.", SECRET_FILE, reload=RESTART)
    textfile: str = _opt("", "Write Prometheus metrics to this file (mode 0644) for node_exporter's textfile collector. Every local user who may enter its directory reads it - client labels and uids too, whatever metrics.token_file keeps from the HTTP endpoint (the log warns when both are set): put it in a directory only node_exporter may enter. Empty = off.", CREATED_FILE, reload=RESTART)
    textfile_interval_s: float = _opt(15.0, "How often the textfile is rewritten.", reload=RESTART)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Settings)}  # type: ignore[misc]


def describe_settings() -> list[tuple[str, str, str, Any, str, str]]:
    """(key, env var, type, default, help, reload class) for every setting: the source of docs/CONFIG.md."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            rows.append((f"{section}.{f.name}", env_name(section, f.name), hints[f.name].__name__, default, f.metadata.get("help", ""), f.metadata.get("reload", LIVE)))
    return rows


def reload_class(key: str) -> str:
    """LIVE, NEW_WORKERS or RESTART for a dotted key ("server.socket")."""
    section, _, name = key.partition(".")
    for f in fields(SECTIONS[section]):
        if f.name == name:
            return str(f.metadata.get("reload", LIVE))
    raise KeyError(key)


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose value differs, in declaration order."""
    changed = []
    for section in SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        for f in fields(before):
            if getattr(before, f.name) != getattr(after, f.name):
                changed.append(f"{section}.{f.name}")
    return changed


def keep_running_values(old: Settings, new: Settings, keys: list[str]) -> Settings:
    """`new`, except that `keys` keep their value from `old` (restart-only settings until a restart)."""
    grouped: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, _, name = key.partition(".")
        grouped.setdefault(section, {})[name] = getattr(getattr(old, section), name)
    for section, values in grouped.items():
        new = replace(new, **{section: replace(getattr(new, section), **values)})
    return new


def env_name(section: str, key: str) -> str:
    return f"OPENINFER_{section.upper()}_{key.upper()}"


def _coerce(where: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
    elif kind is float:  # finite only: nan passed every range check, and a reload applied it (round 22: the loop died)
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


_POSITIVE = {"pool.workers", "pool.intra_op_threads", "sandbox.max_open_files", "server.max_request_bytes", "server.max_connections", "server.max_connections_per_identity", "server.max_reply_backlog_bytes", "server.max_worker_message_bytes", "pool.max_model_bytes", "pool.max_workers"}
_LOG_LEVELS = ("debug", "info", "warning", "error")


# Ceilings for every number (round 23: `lease_ttl_s = 1e11` is finite, and every lease then overflowed
# 64 bits of nanoseconds - each direct request INTERNAL): a whole number of ms, us or bytes at most 2**40
# (in ns still under 2**63), seconds at most a year.
MAX_WHOLE_SETTING = 1 << 40
MAX_SECONDS_SETTING = 365 * 24 * 3600.0


def _check_range(where: str, dotted: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or (dotted in _POSITIVE and value <= 0):
            raise ConfigError(f"{where}: must be {'positive' if dotted in _POSITIVE else 'non-negative'}, got {value!r}")
        if isinstance(value, int) and value > MAX_WHOLE_SETTING:
            raise ConfigError(f"{where}: at most 2**40 ({MAX_WHOLE_SETTING}), got {value!r}")
        if isinstance(value, float) and value > MAX_SECONDS_SETTING:
            raise ConfigError(f"{where}: at most a year ({MAX_SECONDS_SETTING:.0f} s), got {value!r}")
    if dotted == "log.access_log_sample" and not 0 <= value <= 1:
        raise ConfigError(f"{where}: a fraction between 0 and 1, got {value!r}")
    if dotted == "log.level" and value not in _LOG_LEVELS:
        raise ConfigError(f"{where}: one of {', '.join(_LOG_LEVELS)}, got {value!r}")


def _apply(settings: Settings, values: Mapping[str, Any], source: str) -> Settings:
    """Apply {"section.key": value} onto settings; unknown keys and bad types name the key and the source."""
    grouped: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        cls = SECTIONS.get(section)
        if cls is None:
            raise ConfigError(f"{source}: unknown section `{section}` in `{dotted}` (known: {', '.join(SECTIONS)})")
        hints = get_type_hints(cls)
        if key not in hints:
            raise ConfigError(f"{source}: unknown key `{dotted}` (known in [{section}]: {', '.join(hints)})")
        value = _coerce(f"{source}: `{dotted}`", hints[key], value)
        _check_range(f"{source}: `{dotted}`", dotted, value)
        grouped.setdefault(section, {})[key] = value
    for section, updates in grouped.items():
        settings = replace(settings, **{section: replace(getattr(settings, section), **updates)})
    return settings


def _flatten_file(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    flat: dict[str, Any] = {}
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: `{section}` must be a [section] table")
        for key, value in table.items():
            flat[f"{section}.{key}"] = value
    return flat


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from the file (if given or present at the default path), the environment and flags."""
    settings = Settings()
    environ = os.environ if environ is None else environ
    path = config_file
    if path is None and environ.get("OPENINFER_CONFIG"):
        path = Path(environ["OPENINFER_CONFIG"])
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        settings = _apply(settings, _flatten_file(path), str(path))
    env_values: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            name = env_name(section, f.name)
            if name in environ:
                env_values[f"{section}.{f.name}"] = environ[name]
    settings = _apply(settings, env_values, "environment")
    return _apply(settings, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
