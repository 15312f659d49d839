"""A network peer with no CURVE key held every connection slot of the tcp:// front door (attacker round 5,
finding 3). Until its handshake names a key, a connection's identity is `tcp=<host:port>`, a new one per
connection, so `server.max_connections_per_identity` never held it: bare TCP connects that sent nothing
took all `server.max_connections` slots for the 10 s handshake deadline each, and the attacker simply
reconnected. A client whose key the policy admits got `UNAVAILABLE` after its 3 s timeout, 5 times of 5,
for as long as the flood went on.

Now connections still in their handshake have their own share of the slots (half), one source host at most
8 of them, and a new connection displaces the oldest handshake of the host holding the most: a flood
displaces only its own handshakes, and an admitted client from another host is served throughout.

Attacker round 6, finding 3: a local user may bind any of 127/8's 16M addresses before connecting, so a
flood with each connect from its own 127.x.y.z was 16M hosts of one handshake each; it filled the
handshakes' share, and an admitted client behind a 100 ms link was answered 0 times of 4
(`handshake_share` cuts: 74,561). Every loopback address is now one source host: the many-address flood
holds at most 8 handshakes, cut as one host's (`handshakes_per_host`), and never reaches the share that
another host's handshakes are in. Before the fix the daemon held 32 of them.
"""
from __future__ import annotations

import fcntl
import ipaddress
import itertools
import select
import shutil
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import zmq

import onnx_builders
from curve_setup import curve_env
from daemon_harness import wait_for, world_readable_dir
from openinfer.client import Client
from openinfer.daemon.frontdoor.handshakes import MAX_HANDSHAKES_PER_HOST, Handshakes, handshake_share, source_host
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack

MAX_CONNECTIONS = 16
FLOOD_HOSTS = ("127.0.0.2", "127.0.0.3")  # loopback: one source host, whatever the address
FLOOD_SIZE = 4 * MAX_CONNECTIONS  # more than the daemon holds, fewer than the kernel's backlog
SIOCGIFADDR = 0x8915


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine outside 127/8 (a host of its own to the daemon), or None."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                raw = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
        address = socket.inet_ntoa(raw[20:24])
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


def alternating_hosts() -> Callable[[], str]:
    return itertools.cycle(FLOOD_HOSTS).__next__


def many_loopback_addresses() -> Callable[[], str]:
    """Each connect from its own 127.x.y.z, as the attacker's (any local user may bind any of them)."""
    numbers = (n for n in itertools.count(1 << 16) if n & 0xFF not in (0, 255))
    return lambda: str(ipaddress.IPv4Address((127 << 24) | next(numbers)))


class Flood:
    """`size` bare TCP connections, each bound to the next of `sources` before it connects, that never
    send a byte; each one the daemon closes is replaced at once, until `stop`."""

    def __init__(self, host: str, port: int, sources: Callable[[], str], size: int = FLOOD_SIZE) -> None:
        self.target = (host, port)
        self.sources = sources
        self.size = size
        self.socks: set[socket.socket] = set()
        self.replaced = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> None:
        sock = socket.socket()
        sock.bind((self.sources(), 0))
        sock.settimeout(0.5)
        try:
            sock.connect(self.target)
        except OSError:
            sock.close()  # the kernel's backlog is full: try again on the next round
            return
        self.socks.add(sock)

    def _refill(self) -> None:
        for _ in range(self.size - len(self.socks)):
            self._connect()

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
                    self.socks.discard(sock)
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


CurveDaemon = tuple[Any, str, bytes, tuple[bytes, bytes]]


@pytest.fixture
def curve_daemon(daemon_factory: Any, tmp_path: Path) -> Iterator[Callable[[str, int], CurveDaemon]]:
    """Start a tcp:// CURVE daemon on `host` holding `max_connections` connections; gives (daemon,
    address, server public key, a client key pair the access policy admits)."""
    repo = world_readable_dir("oi-handshake-flood-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)

    def start(host: str, max_connections: int) -> CurveDaemon:
        admitted = zmq.curve_keypair()
        env, server_public = curve_env(tmp_path, admitted[0], ["infer", "health", "status"], OPENINFER_SERVER_MAX_CONNECTIONS=str(max_connections))
        address = f"tcp://{host}:{free_port(host)}"
        daemon = daemon_factory(repo, "--socket", address, env=env, wait=False, address=address)
        return daemon, address, server_public, admitted

    yield start
    shutil.rmtree(repo, ignore_errors=True)


def test_a_flood_of_keyless_connections_leaves_room_for_admitted_clients(curve_daemon: Any) -> None:
    # The honest client must be a host of its own: on loopback it would share the flood's handshakes.
    host = non_loopback_address()
    if host is None:
        pytest.skip("this machine has no IPv4 address outside 127/8 for the honest client to come from")
    daemon, address, server_public, admitted = curve_daemon(host, MAX_CONNECTIONS)
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=admitted) as watcher:
        wait_for(lambda: watcher.health()["ready"], 60, "the CURVE daemon to be ready", daemon=daemon)
        with Flood(host, int(address.rsplit(":", 1)[1]), alternating_hosts()) as flood:
            # The flood holds every handshake its host may have (before the first fix: every slot).
            wait_for(lambda: watcher.status()["connections"]["handshaking"] >= MAX_HANDSHAKES_PER_HOST, 10, "the flood to hold its host's handshakes", daemon=daemon)
            for attempt in range(3):  # each a new connection, made while the flood goes on
                with Client(address, timeout=5, curve_server_key=server_public, curve_keypair=admitted) as honest:
                    assert honest.health()["ready"], f"attempt {attempt}"
            assert flood.thread.is_alive()
            connections = watcher.status()["connections"]
        assert connections["connections"] <= MAX_CONNECTIONS, connections
        displaced = connections["refused"].get("handshakes_per_host", 0) + connections["refused"].get("handshake_share", 0)
        assert displaced > 0 and flood.replaced > 0, connections
        assert daemon.process.poll() is None


def test_a_flood_from_many_loopback_addresses_is_one_hosts_handshakes(curve_daemon: Any) -> None:
    """Each bare connect from its own 127.x.y.z: the daemon holds at most one host's 8 handshakes of
    them (before the fix: the handshakes' whole share, 32 of 64 slots)."""
    max_connections = 64
    daemon, address, server_public, admitted = curve_daemon("127.0.0.1", max_connections)
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=admitted) as watcher:
        wait_for(lambda: watcher.health()["ready"], 60, "the CURVE daemon to be ready", daemon=daemon)
        with Flood("127.0.0.1", int(address.rsplit(":", 1)[1]), many_loopback_addresses(), size=max_connections * 3 // 4) as flood:
            wait_for(lambda: flood.replaced >= max_connections, 10, "the daemon to cut the flood's handshakes", daemon=daemon)
            seen = []
            for _ in range(5):  # while the flood replaces what is cut
                replaced = flood.replaced
                wait_for(lambda: flood.replaced > replaced, 10, "the flood to go on", daemon=daemon)
                seen.append(watcher.status()["connections"])
            assert flood.thread.is_alive()
        assert all(connections["handshaking"] <= MAX_HANDSHAKES_PER_HOST for connections in seen), [connections["handshaking"] for connections in seen]
        refused = seen[-1]["refused"]
        assert refused.get("handshakes_per_host", 0) > 0 and refused.get("handshake_share", 0) == 0, refused
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


def test_every_loopback_address_is_one_source_host() -> None:
    """Any local user may bind any address of 127/8 (16M of them) before connecting: counted one by one,
    a local flood was 16M hosts."""
    loopback = [("127.0.0.2", 1), ("127.5.6.7", 2), ("127.255.255.254", 3), ("::1", 4, 0, 0), ("::ffff:127.0.0.3", 5, 0, 0)]
    sources = {source_host(address) for address in loopback}
    assert len(sources) == 1, sources
    assert source_host(("10.0.0.1", 6)) == "10.0.0.1" and source_host(("::ffff:10.0.0.1", 7, 0, 0)) == "10.0.0.1"
    assert source_host(("::2", 8, 0, 0)) == "::/64"  # not loopback: only ::1 is


def junk_greetings(host: str, port: int, count: int) -> None:
    """`count` connections, each a CURVE greeting and a HELLO that is not one (no key needed), one after
    another until the daemon closes each."""
    greeting = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"CURVE".ljust(20, b"\0") + b"\0" + bytes(31)
    for _ in range(count):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(greeting + b"\x04\x06\x05HELLO")  # a HELLO command of 6 bytes: far too short
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass


def test_junk_handshakes_are_counted_not_each_logged(curve_daemon: Any) -> None:
    """Round 65: every connection closed for a protocol error wrote a log line - junk CURVE greetings from
    one process, no key needed, 72,772 lines (16.7 MB) in 10 s. They are counted in `status` and logged
    the 1st, 2nd, 4th, 8th ... time, as refusals are."""
    daemon, address, server_public, admitted = curve_daemon("127.0.0.1", 64)
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=admitted) as watcher:
        wait_for(lambda: watcher.health()["ready"], 60, "the CURVE daemon to be ready", daemon=daemon)
        junk_greetings("127.0.0.1", int(address.rsplit(":", 1)[1]), 300)
        refused = wait_for(lambda: (r := watcher.status()["connections"]["refused"]).get("protocol_error", 0) >= 300 and r, 30, "300 protocol errors counted", daemon=daemon)
    logged = [line for line in daemon.log_text().splitlines() if "protocol error" in line]
    assert 1 <= len(logged) <= 10, (len(logged), refused)  # before: one a connection


def test_plain_tcp_connections_of_one_host_are_capped_together(daemon_factory: Any) -> None:
    """Round 65: a plain tcp:// peer's identity is its connection (host:port), so the per-identity cap never
    held: 64 connections from one address took every slot of an --insecure-tcp daemon, and others'
    connections waited in the kernel's backlog. Its connections count by host."""
    repo = world_readable_dir("oi-plain-cap-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    address = f"tcp://127.0.0.1:{free_port()}"
    daemon = daemon_factory(repo, "--insecure-tcp", address=address, env={"OPENINFER_SERVER_MAX_CONNECTIONS_PER_IDENTITY": "4"})
    held = []
    try:
        for _ in range(8):
            held.append(socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=10))
        closed = []
        for sock in held:
            readable, _, _ = select.select([sock], [], [], 5)
            data = sock.recv(4096) if readable else b"?"  # the greeting, or b"" once the daemon closed it
            closed.append(data == b"")
    finally:
        for sock in held:
            sock.close()
        shutil.rmtree(repo, ignore_errors=True)
    # At most 4 of the host's kept; before: all 8. (Which ones is not fixed: the harness's own readiness
    # client may still hold a slot, and let one go, while these connect.)
    assert closed.count(False) <= 4 and closed.count(True) >= 4, closed
    assert "max_connections_per_identity" in daemon.log_text() and "tcp=loopback already has 4 connections" in daemon.log_text()
