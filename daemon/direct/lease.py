"""Leases: what lets a client send `infer` straight to a model's workers (docs/PROTOCOL.md section 17).

The supervisor, after its access check, issues a lease for one identity, one model version and a short
time; each of that model's workers checks it before it reads any request on a direct connection. A lease
is msgpack [LEASE_FORMAT, identity, model, version, expires_ns, serial, max_in_flight, max_priority, gids] followed by an
HMAC-SHA256 of those bytes under that model version's key: derived (model_key) from a master key only the
supervisor holds, and handed over their channels to that model version's workers alone. A worker is
where a hostile model's steps run: with its key it could mint leases, so the key it holds opens no
other model's workers (one key for every worker once let a step mint leases for any model). Times
are CLOCK_MONOTONIC, which every process on the host shares. A worker also checks that the identity is
the one the kernel reports for the connection (SO_PEERCRED), so a lease is useless to anyone else; and a
lease whose grant matched the peer by a group only (access.py `required_gids`) names those groups, one of
which the connecting process must hold (SO_PEERGROUPS): a process of the same uid without them cannot
use it (round 38).

Revocation: every reload (SIGHUP) makes a new key, which invalidates every lease at once: a client that
lost its grant fails to renew at the front door; one that kept it renews transparently. Otherwise a lease
lives `server.lease_ttl_s` (default 5 s), the bound on how long a revoked grant can still be used.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

LEASE_FORMAT = 3
KEY_BYTES = 32
_MAC_BYTES = 32
MAX_LEASE_BYTES = 1024  # identities and model names are bounded; anything longer is not ours


class LeaseRefused(Exception):
    """Why a lease was not accepted; `expired` tells a client that renewing would help."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Lease:
    identity: str  # "uid=N"
    model: str
    version: int
    expires_ns: int
    serial: int
    max_in_flight: int  # the identity's limit (policies/clients.toml), enforced per worker on the direct path
    max_priority: int  # the highest priority its requests may ask for (policies/clients.toml)
    gids: tuple[int, ...] = ()  # the connecting process must hold one of these (empty: its uid suffices)


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def model_key(master: bytes, model: str, version: int, generation: int = 0) -> bytes:
    """The key that issues and checks leases for one model version: what its workers get, never `master`.
    `generation`: how many times that version's leases alone were revoked (a client refused it)."""
    return hmac.digest(master, b"openinfer lease key " + msgpack.packb([model, version, generation] if generation else [model, version]), hashlib.sha256)


def issue(key: bytes, identity: str, model: str, version: int, ttl_ns: int, serial: int, max_in_flight: int, max_priority: int, gids: tuple[int, ...] = ()) -> tuple[bytes, int]:
    """(token, expires_ns)."""
    expires_ns = time.monotonic_ns() + ttl_ns
    body = msgpack.packb([LEASE_FORMAT, identity, model, version, expires_ns, serial, max_in_flight, max_priority, list(gids)])
    return body + hmac.digest(key, body, hashlib.sha256), expires_ns


def verify(key: bytes, token: Any, identity: str, model: str, version: int, now_ns: int, peer_gids: Callable[[], frozenset[int]] = frozenset) -> Lease:
    """The lease `token` proves, for a connection of `identity` to a worker of `model` `version`;
    LeaseRefused otherwise (the token is checked before anything in it is read). `peer_gids`: the groups
    the connecting process held, read only for a lease that names some."""
    if not isinstance(token, bytes) or not _MAC_BYTES < len(token) <= MAX_LEASE_BYTES:
        raise LeaseRefused("`lease` must be the bytes the front door's `lease` operation returned")
    body, mac = token[:-_MAC_BYTES], token[-_MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.digest(key, body, hashlib.sha256)):
        # Names neither this worker's model nor its version: any local user may connect and ask (round 40).
        raise LeaseRefused("the lease was not issued by this daemon for the model version this worker serves, or a reload has revoked it: take a new one", expired=True)
    fields = msgpack.unpackb(body)  # ours: it passed the MAC
    _, holder, leased_model, leased_version, expires_ns, serial, max_in_flight, max_priority, gids = fields
    if holder != identity:
        raise LeaseRefused(f"the lease was issued to {holder}, not to this connection's {identity}")
    if gids and not set(gids) & peer_gids():
        raise LeaseRefused(f"the lease was issued to a process of {holder} in group {' or '.join(str(g) for g in gids)} (its grant is by group); this connection's process is in none of them")
    if (leased_model, leased_version) != (model, version):
        raise LeaseRefused(f"the lease is for {leased_model}:{leased_version}, which this worker does not serve")
    if expires_ns <= now_ns:
        raise LeaseRefused("the lease has expired: take a new one from the front door", expired=True)
    return Lease(holder, leased_model, leased_version, expires_ns, serial, max_in_flight, max_priority, tuple(gids))
