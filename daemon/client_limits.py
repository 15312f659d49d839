"""Per-client admission: concurrency and rate limits from a policy file (policies/clients.toml)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from openinfer.client.errors import ResourceExhausted

from .modelconfig import ConfigError
from .policy_files import read_policy_toml


@dataclass(frozen=True)
class ClientLimit:
    max_in_flight: int = 256
    rate_per_s: float = 0.0  # 0 = unlimited
    burst: int = 100


@dataclass(frozen=True)
class ClientPolicy:
    default: ClientLimit = ClientLimit()
    by_name: tuple[tuple[str, ClientLimit], ...] = ()
    source: str = "built-in"

    def limit_for(self, name: str | None) -> ClientLimit:
        if name:
            for candidate, limit in self.by_name:
                if candidate == name:
                    return limit
        return self.default


def _parse_limit(where: str, raw: Any) -> ClientLimit:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name for f in fields(ClientLimit)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key `{key}` (known: {', '.join(sorted(known))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}: `{key}` must be a non-negative number")
        values[key] = float(value) if key == "rate_per_s" else int(value)
    return ClientLimit(**values)


def load_client_policy(name_or_path: str) -> ClientPolicy:
    """"" = built-in defaults; a bare name is a file in policies/; anything else is a path."""
    if not name_or_path:
        return ClientPolicy()
    path, raw = read_policy_toml(name_or_path, "client")
    unknown = set(raw) - {"default", "clients"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)} (known: default, clients)")
    default = _parse_limit(f"{path} [default]", raw.get("default", {}))
    clients = raw.get("clients", {})
    if not isinstance(clients, dict):
        raise ConfigError(f"{path}: [clients] must be a table of tables")
    by_name = tuple((name, _parse_limit(f'{path} [clients."{name}"]', table)) for name, table in clients.items())
    return ClientPolicy(default, by_name, str(path))


class ClientLimiter:
    """Counts each client's requests in flight and its token bucket. Called once per accepted request
    (admit) and once per answered one (release)."""

    def __init__(self, policy: ClientPolicy) -> None:
        self.policy = policy
        self.in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, int]] = {}  # client -> (tokens, last refill ns)
        self.rejected: dict[str, int] = {}

    def admit(self, client: str, name: str | None, now_ns: int) -> None:
        limit = self.policy.limit_for(name)
        current = self.in_flight.get(client, 0)
        if current >= limit.max_in_flight:
            self.count_rejection("max_in_flight")
            raise ResourceExhausted(f"client {name or client} has {current} requests in flight: limit max_in_flight={limit.max_in_flight} ({self.policy.source})")
        if limit.rate_per_s > 0:
            tokens, last = self._buckets.get(client, (float(limit.burst), now_ns))
            tokens = min(float(limit.burst), tokens + (now_ns - last) / 1e9 * limit.rate_per_s)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now_ns)
                self.count_rejection("rate_per_s")
                raise ResourceExhausted(f"client {name or client} is over its rate limit: rate_per_s={limit.rate_per_s:g}, burst={limit.burst} ({self.policy.source})")
            self._buckets[client] = (tokens - 1.0, now_ns)
        self.in_flight[client] = current + 1

    def count_rejection(self, limit: str) -> None:
        self.rejected[limit] = self.rejected.get(limit, 0) + 1

    def release(self, client: str) -> None:
        left = self.in_flight.get(client, 0) - 1
        if left > 0:
            self.in_flight[client] = left
        else:
            self.in_flight.pop(client, None)
