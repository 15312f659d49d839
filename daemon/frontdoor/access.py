"""Peer identity (from the kernel: SO_PEERCRED; or a CURVE key) and the access policy
(policies/access.toml), checked when a peer connects and on every request."""
from __future__ import annotations

import fnmatch
import grp
import logging
from dataclasses import dataclass
from typing import Any

from openinfer.wire.errors import PermissionDenied
from openinfer.wire.protocol import OPERATIONS

from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.observability.log_throttle import LogThrottle
from openinfer.daemon.config.policy_files import read_policy_toml

log = logging.getLogger("openinfer.access")


@dataclass(frozen=True)
class Peer:
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    curve_key: str | None = None
    groups: tuple[int, ...] = ()  # supplementary gids, from the kernel at connect (SO_PEERGROUPS)

    @property
    def gids(self) -> frozenset[int]:
        """Every group the connecting process held: its primary one and its supplementary ones."""
        return frozenset(self.groups) | ({self.gid} if self.gid is not None else set())

    @property
    def local(self) -> bool:
        return self.uid is not None


@dataclass(frozen=True)
class Grant:
    name: str
    operations: frozenset[str]
    models: tuple[str, ...] = ("*",)
    local: bool = False
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    groups: frozenset[str] = frozenset()
    curve_keys: frozenset[str] = frozenset()
    anonymous: bool = False  # peers with no identity at all: plain tcp:// (only with --insecure-tcp)

    def matches_peer(self, peer: Peer, peer_groups: frozenset[str]) -> bool:
        return self.matches_by_identity(peer) or bool(self.gids & peer.gids) or bool(self.groups & peer_groups)

    def matches_by_identity(self, peer: Peer) -> bool:
        """Matched by what every process of the peer's uid (or key) shares, not by a group it holds."""
        if self.local and peer.local:
            return True
        if self.anonymous and peer.uid is None and peer.curve_key is None:
            return True
        if peer.uid is not None and peer.uid in self.uids:
            return True
        return peer.curve_key is not None and peer.curve_key in self.curve_keys

    def covers(self, op: str, model: str | None) -> bool:
        if op not in self.operations:
            return False
        return model is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


_GRANT_KEYS = {"name", "operations", "models", "local", "uids", "gids", "groups", "curve_keys", "anonymous"}


def _parse_grant(where: str, raw: Any) -> Grant:
    """Each value held to its type, never cast: `local = "false"` was bool("false"), True - every local
    uid let in - and `uids = "65534"` the digits 6, 5, 3 and 4 (round 22's attacker)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - _GRANT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(_GRANT_KEYS))})")
    ops = raw.get("operations")
    if not isinstance(ops, list) or not ops or not all(isinstance(op, str) for op in ops) or not set(ops) <= OPERATIONS:
        raise ConfigError(f"{where}: `operations` must list some of {', '.join(sorted(OPERATIONS))}")
    name = raw.get("name", where)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: `name` must be a string, got {name!r}")
    return Grant(
        name=name,
        operations=frozenset(ops),
        models=tuple(_strings(where, raw, "models", ["*"])),
        local=_flag(where, raw, "local"),
        uids=frozenset(_ids(where, raw, "uids")),
        gids=frozenset(_ids(where, raw, "gids")),
        groups=frozenset(_strings(where, raw, "groups", [])),
        curve_keys=frozenset(_strings(where, raw, "curve_keys", [])),
        anonymous=_flag(where, raw, "anonymous"),
    )


def _flag(where: str, raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: `{key}` must be true or false, got {value!r}")
    return value


def _strings(where: str, raw: dict[str, Any], key: str, default: list[str]) -> list[str]:
    value = raw.get(key, default)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}: `{key}` must be a list of strings, got {value!r}")
    return value


def _ids(where: str, raw: dict[str, Any], key: str) -> list[int]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(type(item) is int and 0 <= item < 1 << 32 for item in value):
        raise ConfigError(f"{where}: `{key}` must be a list of numeric ids (0 to 4294967295), got {value!r}")
    return value


_VERDICTS_KEPT = 10_000  # cached (peer, op, model) verdicts; then start over


def identity_of(peer: Peer, address: str) -> str:
    """What limits, turns and accounting key on: `uid=N`, `curve=<key>`, or `tcp=<address>` for a plain
    tcp:// peer (PROTOCOL.md 2.3)."""
    if peer.uid is not None:
        return f"uid={peer.uid}"
    if peer.curve_key:
        return f"curve={peer.curve_key}"
    return f"tcp={address}"


class AccessPolicy:
    def __init__(self, grants: tuple[Grant, ...], source: str) -> None:
        self.grants = grants
        self.source = source
        self._group_names: dict[int, str | None] = {}  # gid -> name (None: it has none), until a reload
        self._verdicts: dict[tuple[Any, ...], bool] = {}  # a request pays one dict lookup
        self._denials = LogThrottle()

    @classmethod
    def load(cls, name_or_path: str) -> "AccessPolicy":
        if not name_or_path:
            return cls((Grant("allow-all", OPERATIONS, local=True, curve_keys=frozenset()),), "built-in (allow every local peer)")
        path, raw = read_policy_toml(name_or_path, "access")
        if set(raw) - {"grant"}:
            raise ConfigError(f"{path}: unknown section(s) {sorted(set(raw) - {'grant'})}; use [[grant]] tables")
        grants = tuple(_parse_grant(f"{path} [[grant]] #{i + 1}", g) for i, g in enumerate(raw.get("grant", [])))
        return cls(grants, str(path))

    def groups_of(self, peer: Peer) -> frozenset[str]:
        """The names of the groups the peer's process held when it connected - its own credentials, as
        the kernel recorded them, not /etc/group's members nor an earlier connection's (round 36: a cache
        by uid kept the first connection's primary group for every later process of that uid)."""
        return frozenset(name for gid in peer.gids if (name := self._group_name(gid)) is not None)

    def _group_name(self, gid: int) -> str | None:
        """The group's name (None: it has none, and matches `gids` only), cached until a reload."""
        if gid not in self._group_names:
            try:
                self._group_names[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._group_names[gid] = None
        return self._group_names[gid]

    def may_connect(self, peer: Peer) -> bool:
        groups = self.groups_of(peer)
        return any(g.matches_peer(peer, groups) for g in self.grants)

    def authorize(self, peer: Peer, op: str, model: str | None) -> None:
        """`check`, with the verdict cached (a reload builds a new policy, so no stale verdict survives)."""
        key = (peer.uid, peer.gid, peer.groups, peer.curve_key, op, model)
        allowed = self._verdicts.get(key)
        if allowed is None:
            try:
                self.check(peer, op, model, logged=False)  # (the refusal below logs it: once, not twice)
                allowed = True
            except PermissionDenied:
                allowed = False
            if len(self._verdicts) > _VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[key] = allowed
        if not allowed:
            self.check(peer, op, model)  # raises with the reason (and logs it)

    def scope(self, peer: Peer, op: str) -> tuple[str, ...] | None:
        """The model patterns whose rows `op` (models, status, stats, health) may show this peer when it
        names no model: None = every model (one of its grants of `op` is on "*"), else those its grants of
        `op` name (control/scoped_views.py; round 36: a grant of stats on one model read every model's
        and client's figures by naming none)."""
        groups = self.groups_of(peer)
        patterns = [pattern for g in self.grants if op in g.operations and g.matches_peer(peer, groups) for pattern in g.models]
        return None if "*" in patterns else tuple(patterns)

    def required_gids(self, peer: Peer, op: str, model: str) -> tuple[int, ...]:
        """The groups a process must hold to use a lease for `op` on `model` issued to this peer: none when
        a grant covers it by uid (or local, or key) - a lease is bound to the uid -, else the peer's groups
        through which its grants do, one of which the worker checks (lease.py; round 38: a lease taken by
        a process of the granted group worked for a process of the same uid without it)."""
        covering = [g for g in self.grants if g.covers(op, model)]
        if any(g.matches_by_identity(peer) for g in covering):
            return ()
        return tuple(sorted(gid for gid in peer.gids if any(gid in g.gids or self._group_name(gid) in g.groups for g in covering)))

    def check(self, peer: Peer, op: str, model: str | None, *, logged: bool = True) -> None:
        groups = self.groups_of(peer)
        matching = [g for g in self.grants if g.matches_peer(peer, groups)]
        if any(g.covers(op, model) for g in matching):
            return
        if not logged:
            raise PermissionDenied("")
        who = f"uid {peer.uid}" if peer.uid is not None else (f"CURVE key {peer.curve_key}" if peer.curve_key else "this peer")
        names = ", ".join(g.name for g in matching) or "none"
        target = f" on model {model!r}" if model else ""
        # The 1st, 2nd, 4th ... per peer and operation (round 67: one per refused request was 18-24 MB of log
        # in 8 s; round 68: counted per peer alone, a flood of refused `infer` hid the same peer's `reload`).
        times = self._denials.due(f"permission denied: {op}", identity_of(peer, "anonymous"))
        if times:
            log.warning("permission denied", extra={"uid": peer.uid, "pid": peer.pid, "op": op, "model": model, "grants": names, "times": times})
        raise PermissionDenied(f"{who} may not `{op}`{target}: no grant in {self.source} allows it (grants matching this peer: {names})")
