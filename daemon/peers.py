"""Who is on the other end: answers libzmq's ZAP requests for new connections, remembers each
connection's peer, and caches the access policy's verdicts so a request pays one dict lookup."""
from __future__ import annotations

import logging
from typing import Any

import zmq

from openinfer.client.errors import PermissionDenied

from .access import AccessPolicy, Peer, peer_from_user_id, peer_from_zap

log = logging.getLogger("openinfer.access")

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_CACHE_LIMIT = 10_000  # routing ids are per connection and verdicts per (peer, op, model): forget old ones


class PeerDirectory:
    def __init__(self, access: AccessPolicy) -> None:
        self.access = access
        self._peers: dict[bytes, tuple[Peer, str]] = {}
        self._allowed: dict[tuple[Any, ...], bool] = {}

    def answer_zap(self, zap: zmq.Socket) -> None:  # type: ignore[type-arg]
        """Judge every pending ZAP request; a REP socket must answer each one, or it wedges."""
        while int(zap.getsockopt(_EVENTS)) & _POLLIN:
            request = zap.recv_multipart()
            version, request_id, _domain, address, _identity, mechanism = (request + [b""] * 6)[:6]
            try:
                peer = peer_from_zap(address.decode(errors="replace"), mechanism.decode(errors="replace"), request[6:])
                allowed = self.access.may_connect(peer)
            except Exception:
                log.exception("ZAP request could not be judged; refusing the connection")
                peer, allowed = Peer(), False
            if not allowed:
                log.warning("connection refused: no grant matches this peer", extra={"uid": peer.uid, "pid": peer.pid, "policy": self.access.source})
            status = [b"200", b"OK"] if allowed else [b"400", b"no grant for this peer"]
            zap.send_multipart([version, request_id, *status, peer.user_id().encode(), b""])

    def peer_of(self, route_id: bytes, frame: zmq.Frame) -> tuple[Peer, str]:
        """The peer behind a routing id, from the User-Id our ZAP reply attached to its connection, and
        its accounting key: `uid=N` when the transport told its credentials, `curve=<public key>` for a
        CURVE client (the same across its reconnections), else the routing id in hex (one connection)."""
        known = self._peers.get(route_id)
        if known is None:
            try:
                peer = peer_from_user_id(str(frame.get("User-Id") or ""))
            except (ValueError, zmq.ZMQError):
                peer = Peer()
            if len(self._peers) > _CACHE_LIMIT:
                self._peers.clear()
            key = f"uid={peer.uid}" if peer.uid is not None else f"curve={peer.curve_key}" if peer.curve_key else route_id.hex()
            known = self._peers[route_id] = (peer, key)
        return known

    def authorize(self, peer: Peer, op: str, model: str | None) -> None:
        """Raise PERMISSION_DENIED (naming the rule) unless the policy lets `peer` do `op` on `model`."""
        key = (peer.uid, peer.gid, peer.curve_key, op, model)
        allowed = self._allowed.get(key)
        if allowed is None:
            try:
                self.access.check(peer, op, model)
                allowed = True
            except PermissionDenied:
                allowed = False
            if len(self._allowed) > _CACHE_LIMIT:
                self._allowed.clear()
            self._allowed[key] = allowed
        if not allowed:
            self.access.check(peer, op, model)  # raises with the reason
