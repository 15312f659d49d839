"""Per-client admission: concurrency and rate limits from a policy file (policies/clients.toml).

A client here is a kernel-proven identity — a local uid, or a CURVE public key over tcp:// — never the
`client` name a request carries (a label anyone can change per request, so limits keyed on it could be
escaped by rotating names). Every connection and process of one identity shares its budget.
"""
from __future__ import annotations

import pwd
from dataclasses import dataclass, fields
from typing import Any

from openinfer.wire.errors import PermissionDenied, ResourceExhausted

from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.policy_files import read_policy_toml


MAX_LIMIT = 1_000_000_000  # the largest number a limit may be (requests in flight, burst, requests a second)


@dataclass(frozen=True)
class ClientLimit:
    max_in_flight: int = 256
    rate_per_s: float = 0.0  # 0 = unlimited
    burst: int = 100
    max_priority: int = 9  # the highest `priority` its requests may ask for (9: any)


@dataclass(frozen=True)
class ClientPolicy:
    default: ClientLimit = ClientLimit()
    by_identity: tuple[tuple[str, ClientLimit], ...] = ()  # ("uid=N" / "curve=<key>", limit)
    source: str = "built-in"

    def limit_for(self, identity: str) -> ClientLimit:
        for candidate, limit in self.by_identity:
            if candidate == identity:
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
        if key == "rate_per_s":  # nan and inf are TOML floats: int(nan) raised out of a reload (round 22)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_LIMIT:
                raise ConfigError(f"{where}: `rate_per_s` must be a number from 0 to {MAX_LIMIT}, got {value!r}")
            values[key] = float(value)
        elif type(value) is not int or not 0 <= value <= MAX_LIMIT:  # (a TOML int has no size: 10**23 in a lease did not pack, round 23)
            raise ConfigError(f"{where}: `{key}` must be a whole number from 0 to {MAX_LIMIT}, got {value!r}")
        elif key == "max_priority" and value > 9:
            raise ConfigError(f"{where}: `max_priority` must be a whole number from 0 to 9 (the range of a request's `priority`)")
        else:
            values[key] = value
    return ClientLimit(**values)


def load_client_policy(name_or_path: str) -> ClientPolicy:
    """"" = built-in defaults; a bare name is a file in policies/; anything else is a path.

    Sections: [default]; [uids."N"], [users."name"] (resolved to its uid when the file is read) and
    [curve_keys."<Z85 public key>"] for one identity each."""
    if not name_or_path:
        return ClientPolicy()
    path, raw = read_policy_toml(name_or_path, "client")
    if "clients" in raw:
        raise ConfigError(f"{path}: [clients.\"<name>\"] is gone: limits key on who the kernel says a peer is, not on the name it sends; use [uids.\"N\"], [users.\"name\"] or [curve_keys.\"KEY\"]")
    unknown = set(raw) - {"default", "uids", "users", "curve_keys"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)} (known: default, uids, users, curve_keys)")
    default = _parse_limit(f"{path} [default]", raw.get("default", {}))
    by_identity: list[tuple[str, ClientLimit]] = []
    for section in ("uids", "users", "curve_keys"):
        tables = raw.get(section, {})
        if not isinstance(tables, dict):
            raise ConfigError(f"{path}: [{section}] must be a table of tables")
        for key, table in tables.items():
            limit = _parse_limit(f'{path} [{section}."{key}"]', table)
            by_identity.append((_identity(path, section, key), limit))
    return ClientPolicy(default, tuple(by_identity), str(path))


def _identity(path: object, section: str, key: str) -> str:
    if section == "uids":
        if not key.isdigit():
            raise ConfigError(f'{path}: [uids."{key}"]: a uid is a number')
        return f"uid={int(key)}"
    if section == "users":
        try:
            return f"uid={pwd.getpwnam(key).pw_uid}"
        except KeyError:
            raise ConfigError(f'{path}: [users."{key}"]: no such user on this system') from None
    return f"curve={key}"


class ClientLimiter:
    """Counts each client's requests in flight and its token bucket. Called once per accepted request
    (admit) and once per answered one (release)."""

    def __init__(self, policy: ClientPolicy) -> None:
        self.policy = policy
        self.in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, int]] = {}  # client -> (tokens, last refill ns)
        self.rejected: dict[str, int] = {}

    def admit(self, client: str, now_ns: int, priority: int) -> None:
        """`client` is the identity ("uid=N", "curve=<key>"): see the module docstring."""
        limit = self.policy.limit_for(client)
        current = self.in_flight.get(client, 0)
        if current >= limit.max_in_flight:
            self.count_rejection("max_in_flight")
            raise ResourceExhausted(f"{client} has {current} requests in flight: limit max_in_flight={limit.max_in_flight} ({self.policy.source})")
        tokens = 0.0
        if limit.rate_per_s > 0:
            tokens, last = self._buckets.get(client, (float(limit.burst), now_ns))
            tokens = min(float(limit.burst), tokens + (now_ns - last) / 1e9 * limit.rate_per_s)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now_ns)
                self.count_rejection("rate_per_s")
                raise ResourceExhausted(f"{client} is over its rate limit: rate_per_s={limit.rate_per_s:g}, burst={limit.burst} ({self.policy.source})")
        if priority > limit.max_priority:  # after the limits, as PROTOCOL.md 8.2 orders them (35b, 35c)
            self.count_rejection("max_priority")
            raise over_max_priority(client, priority, limit.max_priority, self.policy.source)
        if limit.rate_per_s > 0:
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


def over_max_priority(identity: str, priority: int, max_priority: int, source: str) -> PermissionDenied:
    """A request above its identity's ceiling: refused, not lowered - its client learns why, and the
    operator's rule holds on both paths (the lease carries the ceiling to the workers)."""
    return PermissionDenied(f"{identity} may ask for priority {max_priority} at most (max_priority, {source}); this request asks for {priority}", {"limit": "max_priority", "max_priority": max_priority})
