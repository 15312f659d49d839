"""A network peer with no CURVE key held every connection slot of the tcp:// front door (attacker round 5,
finding 3). Until its handshake names a key, a connection's identity is `tcp=<host:port>`, a new one per
connection, so `server.max_connections_per_identity` never held it: bare TCP connects that sent nothing
took all `server.max_connections` slots for the 10 s handshake deadline each, and the attacker simply
reconnected. A client whose key the policy admits got `UNAVAILABLE` after its 3 s timeout, 5 times of 5,
for as long as the flood went on.

Now connections still in their handshake have their own share of the slots (half), one source host at most
8 of them, and a new connection displaces the oldest handshake of the host holding the most: a flood
displaces only its own handshakes, and an admitted client from another host is served throughout.
"""
from __future__ import annotations

import select
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

import onnx_builders
from curve_setup import key_policy, server_keys
from daemon_harness import wait_for, world_readable_dir
from openinfer.client import Client
from openinfer.daemon.frontdoor.handshakes import Handshakes, handshake_share, source_host
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack

MAX_CONNECTIONS = 16
FLOOD_HOSTS = ("127.0.0.2", "127.0.0.3")  # loopback addresses other than the honest client's 127.0.0.1
FLOOD_PER_HOST = 2 * MAX_CONNECTIONS  # more than the daemon holds, fewer than the kernel's backlog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flood:
    """Bare TCP connections from FLOOD_HOSTS that never send a byte; each one the daemon closes is
    replaced at once, until `stop`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: dict[socket.socket, str] = {}
        self.replaced = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self, host: str) -> None:
        sock = socket.socket()
        sock.bind((host, 0))
        sock.settimeout(0.5)
        try:
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            sock.close()  # the kernel's backlog is full: try again on the next round
            return
        self.socks[sock] = host

    def _refill(self) -> None:
        for host in FLOOD_HOSTS:
            for _ in range(FLOOD_PER_HOST - sum(1 for h in self.socks.values() if h == host)):
                self._connect(host)

    def _run(self) -> None:
        while not self.done.is_set():
            self._refill()
            readable, _, _ = select.select(list(self.socks), [], [], 0.05)
            for sock in readable:
                try:
                    alive = sock.recv(4096) != b""  # the daemon's greeting, or its close
                except OSError:
                    alive = False
                if not alive:
                    del self.socks[sock]
                    sock.close()
                    self.replaced += 1

    def __enter__(self) -> "Flood":
        self._refill()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def curve_daemon(daemon_factory: Any, tmp_path: Path) -> Iterator[tuple[Any, str, bytes, tuple[bytes, bytes]]]:
    """A tcp:// CURVE daemon holding MAX_CONNECTIONS connections; yields (daemon, address, server public
    key, a client key pair the access policy admits)."""
    repo = world_readable_dir("oi-handshake-flood-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    key_file, server_public = server_keys(tmp_path)
    admitted = zmq.curve_keypair()
    policy = key_policy(tmp_path, admitted[0], ["infer", "health", "status"])
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {
        "OPENINFER_SERVER_CURVE_SECRET_KEY_FILE": str(key_file),
        "OPENINFER_SERVER_ACCESS_POLICY": str(policy),
        "OPENINFER_SERVER_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    daemon = daemon_factory(repo, "--socket", address, env=env, wait=False, address=address)
    yield daemon, address, server_public, admitted
    shutil.rmtree(repo, ignore_errors=True)


def test_a_flood_of_keyless_connections_leaves_room_for_admitted_clients(curve_daemon: Any) -> None:
    daemon, address, server_public, admitted = curve_daemon
    port = int(address.rsplit(":", 1)[1])
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=admitted) as watcher:
        wait_for(lambda: watcher.health()["ready"], 60, "the CURVE daemon to be ready", daemon=daemon)
        with Flood(port) as flood:
            # The flood holds at least the handshakes' share of the slots (before the fix: all of them).
            wait_for(lambda: watcher.status()["connections"]["connections"] > MAX_CONNECTIONS // 2, 10, "the flood to hold its share of the slots", daemon=daemon)
            for attempt in range(3):  # each a new connection, made while the flood goes on
                with Client(address, timeout=5, curve_server_key=server_public, curve_keypair=admitted) as honest:
                    assert honest.health()["ready"], f"attempt {attempt}"
            assert flood.thread.is_alive()
            connections = watcher.status()["connections"]
        assert connections["connections"] <= MAX_CONNECTIONS, connections
        displaced = connections["refused"].get("handshakes_per_host", 0) + connections["refused"].get("handshake_share", 0)
        assert displaced > 0 and flood.replaced > 0, connections
        assert daemon.process.poll() is None


@dataclass(frozen=True)
class Pending:
    conn_id: int
    accepted_ns: int


def test_the_handshake_that_gives_way_is_the_oldest_of_the_source_holding_the_most() -> None:
    table: Handshakes[Pending] = Handshakes()
    flood = [Pending(n, n) for n in range(3)]
    for conn in flood:
        table.add(conn, "198.51.100.7")
    honest = Pending(10, 10)
    table.add(honest, "192.0.2.1")
    assert table.largest_source() == "198.51.100.7" and table.oldest_of("198.51.100.7") == flood[0]
    table.discard(flood[0])
    table.discard(flood[1])
    table.discard(flood[0])  # twice: no effect
    assert len(table) == 2 and table.count("198.51.100.7") == 1 and table.largest_source() == "192.0.2.1"  # a tie: the first at 1
    assert table.accepted_before(10) == [flood[2]]
    assert handshake_share(512) == 256 and handshake_share(1) == 1
    # One host is one source: an IPv6 host holds a /64, an IPv4 peer of a dual-stack listener is its IPv4 address.
    assert source_host(("2001:db8::1", 1, 0, 0)) == source_host(("2001:db8::ffff:2", 2, 0, 0)) == "2001:db8::/64"
    assert source_host(("::ffff:192.0.2.1", 3, 0, 0)) == source_host(("192.0.2.1", 4)) == "192.0.2.1"
