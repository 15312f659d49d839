"""CurveZMQ's server side (daemon/frontdoor/curve.py) in the daemon's own ZMTP engine, without a daemon:
a localhost listener whose connection gets a SealedFrameStream + CurveServer, as the front door builds it.

Driven from the other end by libzmq's own CURVE client (the reference implementation, and what every
client of the daemon runs) and by a CurveZMQ client written out here by hand, which says what libzmq
never would: garbage HELLOs, boxes for another key, stolen cookies, vouches for someone else, replayed
nonces, frames over the limits. Each hostile case must end in a closed connection (ProtocolError) and
nothing from the server beyond what the protocol allows at that point."""
from __future__ import annotations

import re
import select
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import zmq
from nacl.bindings import (
    crypto_box,
    crypto_box_afternm,
    crypto_box_beforenm,
    crypto_box_keypair,
    crypto_box_open_afternm,
    randombytes,
)
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from openinfer.daemon.frontdoor.curve import CurveServer, ServerKeys, load_server_keys
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.wire.sealed import Refused, SealedFrameStream
from openinfer.wire.zmtp import (
    COMMAND,
    LONG,
    MORE,
    Event,
    FrameStream,
    Limits,
    Oversized,
    PeerClosed,
    ProtocolError,
    encode_properties,
    frame_header,
    greeting,
    parse_properties,
)

SERVER_PUBLIC_Z85, SERVER_SECRET_Z85 = zmq.curve_keypair()
KEYS = ServerKeys(z85.decode(SERVER_PUBLIC_Z85), z85.decode(SERVER_SECRET_Z85))
DEALER_METADATA = encode_properties({b"Socket-Type": b"DEALER"})


class Door:
    """One connection of the front door: accept on localhost, speak CURVE with `authorize`, keep every
    event; a ProtocolError or PeerClosed is kept in `error` and closes the connection, as the
    ConnectionTable does."""

    def __init__(self, authorize: Callable[[str], str | None] = lambda key: None, limits: Limits = Limits()) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.authorize = authorize
        self.limits = limits
        self.keys_seen: list[str] = []
        self.stream: FrameStream | None = None
        self.events: list[Event] = []
        self.error: Exception | None = None

    def _authorize(self, key: str) -> str | None:
        self.keys_seen.append(key)
        return self.authorize(key)

    def accept(self) -> FrameStream:
        self.listener.settimeout(5)
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        self.stream = SealedFrameStream(sock, self.limits, CurveServer(KEYS, self._authorize))
        return self.stream

    def pump(self, until: Callable[[], bool] | None = None, timeout: float = 5.0) -> None:
        """Read and answer until `until()` holds (or, without one, until 0.2 s pass with nothing to read)."""
        stream = self.stream or self.accept()
        deadline = time.monotonic() + timeout
        while self.error is None and time.monotonic() < deadline:
            if until is not None and until():
                return
            readable, _, _ = select.select([stream.sock], [stream.sock] if stream.out_bytes else [], [], 0.2)
            if not readable and until is None:
                return
            try:
                if readable:
                    self.events.extend(stream.read())
                stream.flush()
            except (ProtocolError, PeerClosed) as exc:
                self.error = exc
                stream.close()
        if until is not None and self.error is None:
            assert until(), "timed out"

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.listener.close()


@pytest.fixture
def door() -> Iterator[Door]:
    opened = Door()
    yield opened
    opened.close()


class Libzmq:
    """libzmq client sockets, all closed at the end of the test."""

    def __init__(self) -> None:
        self.context: zmq.Context = zmq.Context()  # type: ignore[type-arg]
        self.sockets: list[zmq.Socket] = []  # type: ignore[type-arg]

    def socket(self, door: Door, kind: int = zmq.DEALER, keypair: tuple[bytes, bytes] | None = None, server_key: bytes | None = SERVER_PUBLIC_Z85) -> zmq.Socket:  # type: ignore[type-arg]
        """A client of `door`, with CURVE unless `server_key` is None."""
        sock = self.context.socket(kind)
        self.sockets.append(sock)
        sock.linger = 0
        if server_key is not None:
            sock.curve_serverkey = server_key
            sock.curve_publickey, sock.curve_secretkey = keypair or zmq.curve_keypair()
        sock.connect(door.address)
        return sock

    def monitor(self, sock: zmq.Socket, events: int) -> zmq.Socket:  # type: ignore[type-arg]
        monitor = sock.get_monitor_socket(events)
        self.sockets.append(monitor)
        return monitor

    def close(self) -> None:
        for sock in reversed(self.sockets):
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def libzmq() -> Iterator[Libzmq]:
    clients = Libzmq()
    yield clients
    clients.close()


def messages(door: Door) -> list[list[bytes]]:
    return [[bytes(frame) for frame in event] for event in door.events if isinstance(event, list)]


# -- libzmq's own client -------------------------------------------------------------------------------
@pytest.mark.unit
def test_libzmq_dealer_talks_through_the_handshake_both_ways(door: Door, libzmq: Libzmq) -> None:
    public, secret = zmq.curve_keypair()
    dealer = libzmq.socket(door, keypair=(public, secret))
    big = bytes(range(256)) * 1200  # 300 KiB: received straight into its own buffer, opened when complete
    dealer.send_multipart([b"header", big, b""])
    door.pump(until=lambda: bool(door.events))
    assert door.error is None and door.stream is not None and door.stream.open
    assert door.keys_seen == [public.decode()]  # asked once, with the key the client proved it holds
    assert door.stream.peer_socket_type == b"DEALER"
    assert messages(door) == [[b"header", big, b""]]
    reply = bytes(reversed(big))
    door.stream.send([b"reply", reply, b""])
    door.pump(until=lambda: not door.stream.out_bytes)  # type: ignore[union-attr]
    assert dealer.poll(5000)
    assert dealer.recv_multipart() == [b"reply", reply, b""]
    for index in range(20):  # nonces keep growing on both sides
        dealer.send(str(index).encode())
        door.pump(until=lambda: len(door.events) == index + 2)
        door.stream.send([b"ok %d" % index])
        assert dealer.poll(5000) and dealer.recv() == b"ok %d" % index


@pytest.mark.unit
def test_libzmq_req_gets_its_delimiter_back(door: Door, libzmq: Libzmq) -> None:
    req = libzmq.socket(door, kind=zmq.REQ)
    req.send(b"question")
    door.pump(until=lambda: bool(door.events))
    assert door.stream is not None and door.stream.peer_socket_type == b"REQ"
    assert messages(door) == [[b"", b"question"]]
    door.stream.send([b"", b"answer"])
    door.pump(until=lambda: not door.stream.out_bytes)  # type: ignore[union-attr]
    assert req.poll(5000) and req.recv() == b"answer"


@pytest.mark.unit
def test_libzmq_client_with_an_unknown_key_gets_error_400_and_nothing_else(libzmq: Libzmq) -> None:
    door = Door(authorize=lambda key: "400")
    try:
        dealer = libzmq.socket(door)
        monitor = libzmq.monitor(dealer, zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        dealer.send(b"let me in")
        door.pump(until=lambda: False, timeout=2)  # the door closes it; then nothing more happens
        assert isinstance(door.error, Refused) and door.error.reason == "400"
        assert monitor.poll(5000)
        event = recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400  # libzmq read our ERROR
        assert door.events == []
    finally:
        door.close()


@pytest.mark.unit
def test_libzmq_client_that_has_the_wrong_server_key_is_cut_at_hello(door: Door, libzmq: Libzmq) -> None:
    libzmq.socket(door, server_key=zmq.curve_keypair()[0]).send(b"x")
    door.pump(until=lambda: False, timeout=2)
    assert isinstance(door.error, ProtocolError) and "signature box does not open" in str(door.error)
    assert door.keys_seen == []


@pytest.mark.unit
def test_libzmq_null_client_on_a_curve_endpoint_is_refused(door: Door, libzmq: Libzmq) -> None:
    plain = libzmq.socket(door, server_key=None)
    plain.send(b"hello?")
    door.pump(until=lambda: False, timeout=2)
    # Whoever sees the other's greeting first hangs up: libzmq on ours (CURVE), or we on its (NULL).
    assert isinstance(door.error, PeerClosed) or (isinstance(door.error, ProtocolError) and "requires b'CURVE'" in str(door.error)), door.error
    assert door.events == [] and not plain.poll(100)


@pytest.mark.unit
def test_libzmq_frames_over_the_limits_are_reported_and_skipped_to_the_message_end(libzmq: Libzmq) -> None:
    door = Door(limits=Limits(frames=3, first_frame=1024, message_bytes=64 * 1024))
    try:
        dealer = libzmq.socket(door)
        dealer.send_multipart([b"fine", b"x" * 10])
        dealer.send_multipart([b"head", b"y" * (1024 * 1024), b"z" * 100, b"never read"])  # skipped from the big frame on
        dealer.send_multipart([b"h" * 2000, b"never read either"])  # over first_frame, the last frame small
        dealer.send_multipart([b"after"])
        door.pump(until=lambda: len(door.events) == 4)
        first, report, header_report, after = door.events
        assert first == [b"fine", b"x" * 10] and after == [b"after"]
        assert isinstance(report, Oversized) and report.limit == "message_bytes" and report.frames == [b"head"]
        assert isinstance(header_report, Oversized) and header_report.limit == "first_frame" and header_report.frames == []
        assert door.error is None and door.stream is not None and door.stream.in_bytes == 0
        door.stream.send([b"still here"])
        door.pump(until=lambda: not door.stream.out_bytes)  # type: ignore[union-attr]
        assert dealer.poll(5000) and dealer.recv() == b"still here"
    finally:
        door.close()


@pytest.mark.unit
def test_libzmq_frame_count_limit_holds_for_sealed_frames(libzmq: Libzmq) -> None:
    door = Door(limits=Limits(frames=3, first_frame=1024, message_bytes=64 * 1024))
    try:
        dealer = libzmq.socket(door)
        dealer.send_multipart([b"a", b"b", b"c", b"d", b"e"])
        dealer.send_multipart([b"next"])
        door.pump(until=lambda: len(door.events) == 2)
        report, after = door.events
        assert isinstance(report, Oversized) and report.limit == "frames" and report.frames == [b"a", b"b", b"c"]
        assert after == [b"next"]
    finally:
        door.close()


# -- a client written out by hand ----------------------------------------------------------------------
class Handmade:
    """A CurveZMQ client over a raw socket, one command at a time, every field in the test's hands."""

    def __init__(self, door: Door, key: tuple[bytes, bytes] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", door.port), timeout=5)
        self.door = door
        self.public, self.secret = key or crypto_box_keypair()
        self.transient_public, self.transient_secret = crypto_box_keypair()
        self.nonce = 0
        self.shared = b""
        self.server_nonce = 0

    @property
    def z85(self) -> str:
        return z85.encode(self.public).decode()

    def greet(self, mechanism: bytes = b"CURVE", as_server: bool = False) -> bytes:
        self.sock.sendall(greeting(mechanism, as_server))
        self.door.pump()
        return self.recv_exactly(64)

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def read_frame(self) -> tuple[int, bytes]:
        flags = self.recv_exactly(1)[0]
        size = struct.unpack(">Q", self.recv_exactly(8))[0] if flags & LONG else self.recv_exactly(1)[0]
        return flags, self.recv_exactly(size)

    def command(self, body: bytes) -> None:
        self.sock.sendall(frame_header(len(body), COMMAND) + body)
        self.door.pump()

    def closed_by_server(self) -> bool:
        self.sock.settimeout(2)
        try:
            while self.sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
        return True

    def next_nonce(self) -> bytes:
        self.nonce += 1
        return struct.pack(">Q", self.nonce)

    def hello(self, server_public: bytes = KEYS.public, signature: bytes = bytes(64), version: bytes = b"\x01\x00", padding: bytes = bytes(72)) -> bytes:
        nonce = self.next_nonce()
        box = crypto_box(signature, b"CurveZMQHELLO---" + nonce, server_public, self.transient_secret)
        return b"\x05HELLO" + version + padding + self.transient_public + nonce + box

    def welcome(self) -> tuple[bytes, bytes]:
        """Read WELCOME -> (S', cookie)."""
        flags, body = self.read_frame()
        assert flags == COMMAND and body.startswith(b"\x07WELCOME") and len(body) == 168, body[:16]
        shared = crypto_box_beforenm(KEYS.public, self.transient_secret)
        text = crypto_box_open_afternm(body[24:], b"WELCOME-" + body[8:24], shared)
        return text[:32], text[32:]

    def initiate(self, server_transient: bytes, cookie: bytes, metadata: bytes = DEALER_METADATA, vouch_secret: bytes | None = None, vouch_text: bytes | None = None, nonce: bytes | None = None, named_key: bytes | None = None) -> bytes:
        vouch_nonce = randombytes(16)
        vouch = vouch_nonce + crypto_box(vouch_text or self.transient_public + KEYS.public, b"VOUCH---" + vouch_nonce, server_transient, vouch_secret or self.secret)
        self.shared = crypto_box_beforenm(server_transient, self.transient_secret)
        nonce = nonce or self.next_nonce()
        box = crypto_box_afternm((named_key or self.public) + vouch + metadata, b"CurveZMQINITIATE" + nonce, self.shared)
        return b"\x08INITIATE" + cookie + nonce + box

    def handshake(self) -> dict[bytes, bytes]:
        """A proper handshake; returns the server's READY metadata."""
        self.greet()
        self.command(self.hello())
        self.command(self.initiate(*self.welcome()))
        flags, body = self.read_frame()
        assert body.startswith(b"\x05READY"), body[:16]
        self.server_nonce = struct.unpack(">Q", body[6:14])[0]
        return parse_properties(crypto_box_open_afternm(body[14:], b"CurveZMQREADY---" + body[6:14], self.shared))

    def message(self, payload: bytes, flags: int = 0, nonce: bytes | None = None) -> bytes:
        """A MESSAGE carried the way libzmq carries it: one final message frame."""
        nonce = nonce or self.next_nonce()
        box = crypto_box_afternm(bytes((flags,)) + payload, b"CurveZMQMESSAGEC" + nonce, self.shared)
        body = b"\x07MESSAGE" + nonce + box
        return frame_header(len(body), 0) + body

    def send(self, wire: bytes) -> None:
        self.sock.sendall(wire)
        self.door.pump()

    def receive(self) -> tuple[int, bytes]:
        """The server's next MESSAGE -> (sealed flags, payload); its nonce must grow."""
        flags, body = self.read_frame()
        assert flags & ~LONG == 0 and body.startswith(b"\x07MESSAGE")
        nonce = struct.unpack(">Q", body[8:16])[0]
        assert nonce > self.server_nonce
        self.server_nonce = nonce
        text = crypto_box_open_afternm(body[16:], b"CurveZMQMESSAGES" + body[8:16], self.shared)
        return text[0], text[1:]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(door: Door) -> Iterator[Handmade]:
    made = Handmade(door)
    yield made
    made.close()


def nothing_more(sock: socket.socket) -> bool:
    """The server closed the connection without sending anything after what was read."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def assert_cut(door: Door, client: Handmade, says: str) -> None:
    """The server closed the connection for `says`, having sent nothing after the last thing read."""
    assert isinstance(door.error, ProtocolError) and not isinstance(door.error, Refused), door.error
    assert says in str(door.error), door.error
    assert nothing_more(client.sock), "the server sent something before closing"


@pytest.mark.unit
def test_handmade_client_completes_the_handshake_and_is_answered(door: Door, client: Handmade) -> None:
    ready = client.handshake()
    assert ready == {b"socket-type": b"ROUTER"}
    assert door.keys_seen == [client.z85] and door.stream is not None and door.stream.open
    client.send(client.message(b"one", MORE) + client.message(b"two"))
    assert messages(door) == [[b"one", b"two"]]
    door.stream.send([b"three", b"four"])
    door.pump()
    assert client.receive() == (MORE, b"three") and client.receive() == (0, b"four")


@pytest.mark.attack
@pytest.mark.parametrize(
    "mangle, says",
    [
        (lambda hello: hello[:199], "HELLO of 199 bytes"),
        (lambda hello: hello + b"\x00", "HELLO of 201 bytes"),
        (lambda hello: hello[:6] + b"\x02\x00" + hello[8:], "version 2.0"),
        (lambda hello: hello[:6] + b"\x01\x01" + hello[8:], "version 1.1"),
        (lambda hello: hello[:40] + b"\x01" + hello[41:], "padding is not zero"),
        (lambda hello: b"\x05HELLA" + hello[6:], "expected HELLO"),
        (lambda hello: b"\x08INITIATE" + bytes(300), "expected HELLO"),
        (lambda hello: b"\x00", "expected HELLO"),
        (lambda hello: hello[:150] + bytes([hello[150] ^ 1]) + hello[151:], "signature box does not open"),
        (lambda hello: hello[:85] + bytes([hello[85] ^ 1]) + hello[86:], "signature box does not open"),  # C' changed
    ],
)
def test_garbage_hello_closes_the_connection_without_a_welcome(door: Door, client: Handmade, mangle: Callable[[bytes], bytes], says: str) -> None:
    client.greet()
    client.command(mangle(client.hello()))
    assert_cut(door, client, says)


@pytest.mark.attack
@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"server_public": crypto_box_keypair()[0]}, "signature box does not open"),  # made for another server
        ({"signature": b"\x01" + bytes(63)}, "does not hold 64 zero bytes"),
    ],
)
def test_hello_signature_must_be_zeros_boxed_for_this_server(door: Door, client: Handmade, kwargs: dict[str, bytes], says: str) -> None:
    client.greet()
    client.command(client.hello(**kwargs))
    assert_cut(door, client, says)


@pytest.mark.attack
def test_a_tampered_cookie_is_refused(door: Door, client: Handmade) -> None:
    client.greet()
    client.command(client.hello())
    server_transient, cookie = client.welcome()
    client.command(client.initiate(server_transient, cookie[:40] + bytes([cookie[40] ^ 1]) + cookie[41:]))
    assert_cut(door, client, "cookie is not the one this connection was sent")


@pytest.mark.attack
def test_a_cookie_from_another_connection_is_refused(client: Handmade) -> None:
    other_door = Door()
    thief = Handmade(other_door)
    try:
        thief.greet()
        thief.command(thief.hello())
        stolen_transient, stolen_cookie = thief.welcome()
        client.greet()
        client.command(client.hello())
        client.welcome()
        client.command(client.initiate(stolen_transient, stolen_cookie))
        assert_cut(client.door, client, "cookie is not the one this connection was sent")
    finally:
        thief.close()
        other_door.close()


@pytest.mark.attack
def test_a_vouch_for_another_key_is_refused(door: Door, client: Handmade) -> None:
    """INITIATE names the key the policy lists, but whoever sends it does not hold its secret."""
    victim_public, _ = crypto_box_keypair()
    client.greet()
    client.command(client.hello())
    client.command(client.initiate(*client.welcome(), named_key=victim_public))
    assert_cut(door, client, "vouch was not made with the secret key of the client key it names")
    assert door.keys_seen == []  # never asked about the victim's key


@pytest.mark.attack
@pytest.mark.parametrize("which", ["transient", "server"])
def test_a_vouch_for_another_connection_or_server_is_refused(door: Door, client: Handmade, which: str) -> None:
    """A vouch is C's signature on (C', S): one replayed from another connection or made for another server fails."""
    other_transient, _ = crypto_box_keypair()
    text = other_transient + KEYS.public if which == "transient" else client.transient_public + crypto_box_keypair()[0]
    client.greet()
    client.command(client.hello())
    client.command(client.initiate(*client.welcome(), vouch_text=text))
    assert_cut(door, client, "vouch is for another connection or another server")
    assert door.keys_seen == []


@pytest.mark.attack
def test_initiate_must_carry_a_nonce_after_hellos(door: Door, client: Handmade) -> None:
    client.greet()
    client.command(client.hello())
    client.command(client.initiate(*client.welcome(), nonce=struct.pack(">Q", 1)))  # HELLO's own nonce again
    assert_cut(door, client, "does not follow HELLO's")


@pytest.mark.attack
def test_commands_out_of_order_close_the_connection(door: Door, client: Handmade) -> None:
    client.greet()
    hello = client.hello()
    client.command(hello)
    client.welcome()
    client.command(hello)  # HELLO again instead of INITIATE
    assert_cut(door, client, "expected INITIATE")


@pytest.mark.attack
def test_a_message_frame_during_the_handshake_closes_the_connection(door: Door, client: Handmade) -> None:
    client.greet()
    client.send(frame_header(5, 0) + b"hello")
    assert_cut(door, client, "expected a handshake command")


@pytest.mark.attack
def test_unknown_key_gets_an_error_and_no_ready(client: Handmade) -> None:
    client.door.authorize = lambda key: "400"
    client.greet()
    client.command(client.hello())
    client.command(client.initiate(*client.welcome()))
    assert isinstance(client.door.error, Refused)
    assert client.door.keys_seen == [client.z85]
    assert client.read_frame() == (COMMAND, b"\x05ERROR\x03400")
    assert nothing_more(client.sock)


@pytest.mark.attack
def test_a_socket_type_that_cannot_talk_to_a_router_gets_an_error(door: Door, client: Handmade) -> None:
    client.greet()
    client.command(client.hello())
    client.command(client.initiate(*client.welcome(), metadata=encode_properties({b"Socket-Type": b"PUB", b"Identity": b"\x00\x6b\x8b\x45\x67"})))
    assert isinstance(door.error, ProtocolError) and "socket type" in str(door.error)
    flags, body = client.read_frame()
    assert flags == COMMAND and body.startswith(b"\x05ERROR")


@pytest.mark.attack
def test_a_null_greeting_on_a_curve_endpoint_gets_an_error(door: Door, client: Handmade) -> None:
    theirs = client.greet(mechanism=b"NULL")
    assert theirs[12:17] == b"CURVE" and theirs[32] == 1  # we said CURVE, as the server
    flags, body = client.read_frame()
    assert flags == COMMAND and body.startswith(b"\x05ERROR")
    assert isinstance(door.error, ProtocolError)
    assert nothing_more(client.sock)


@pytest.mark.attack
def test_a_peer_claiming_to_be_the_curve_server_is_refused(door: Door, client: Handmade) -> None:
    client.greet(as_server=True)
    assert_cut(door, client, "claims our role")


@pytest.mark.attack
def test_a_replayed_message_closes_the_connection(door: Door, client: Handmade) -> None:
    client.handshake()
    wire = client.message(b"transfer 100")
    client.send(wire)
    assert messages(door) == [[b"transfer 100"]]
    client.send(wire)  # recorded and sent again
    assert_cut(door, client, "replayed or reordered")
    assert messages(door) == [[b"transfer 100"]]


@pytest.mark.attack
def test_a_message_nonce_going_back_closes_the_connection(door: Door, client: Handmade) -> None:
    client.handshake()
    client.send(client.message(b"a", nonce=struct.pack(">Q", 10)))
    client.send(client.message(b"b", nonce=struct.pack(">Q", 9)))
    assert_cut(door, client, "replayed or reordered")
    assert messages(door) == [[b"a"]]


@pytest.mark.attack
@pytest.mark.parametrize(
    "wire, says",
    [
        (lambda c: (lambda w: w[:-1] + bytes([w[-1] ^ 1]))(c.message(b"x" * 40)), "does not open"),  # a bit flipped in transit
        (lambda c: (lambda w: w[:2] + b"\x07MESSAGX" + w[10:])(c.message(b"x")), "expected MESSAGE"),
        (lambda c: c.message(b"x", flags=0x04), "reserved bits"),
        (lambda c: c.message(b"x", flags=MORE | 0x02), "command with MORE"),
        (lambda c: frame_header(5, 0) + b"plain", "cannot hold a sealed one"),  # a frame in clear
        (lambda c: (lambda w: bytes([COMMAND]) + w[1:])(c.message(b"x")), "only sealed frames"),  # in a command frame
        (lambda c: (lambda w: bytes([MORE]) + w[1:])(c.message(b"x")), "only sealed frames"),
    ],
)
def test_malformed_messages_close_the_connection(door: Door, client: Handmade, wire: Callable[[Handmade], bytes], says: str) -> None:
    client.handshake()
    client.send(wire(client))
    assert_cut(door, client, says)
    assert door.events == []


@pytest.mark.attack
def test_an_oversized_message_is_reported_before_any_of_it_is_held() -> None:
    """Only the head of an 8 MiB MESSAGE is sent: the report must come from its size alone, and nothing
    of it is kept; the rest of its message is skipped as it arrives and the next message is delivered."""
    door = Door(limits=Limits(frames=4, first_frame=1024, message_bytes=1024 * 1024))
    client = Handmade(door)
    try:
        client.handshake()
        client.send(client.message(b"header", MORE))
        huge = client.message(b"\x00" * (8 * 1024 * 1024), MORE)
        client.send(huge[: 64 * 1024])
        (report,) = door.events
        assert isinstance(report, Oversized) and report.limit == "message_bytes" and report.frames == [b"header"]
        assert door.stream is not None and door.stream.in_bytes == 0
        read_before = door.stream.bytes_in
        for offset in range(64 * 1024, len(huge), 256 * 1024):
            client.sock.sendall(huge[offset : offset + 256 * 1024])
            door.pump(until=lambda: door.stream.bytes_in - read_before >= min(len(huge), offset + 256 * 1024) - 64 * 1024)  # type: ignore[union-attr]
            assert door.stream.in_bytes == 0
        client.send(client.message(b"tail of the skipped message") + client.message(b"next"))
        assert door.error is None and door.events[1:] == [[b"next"]] and door.stream.in_bytes == 0
    finally:
        client.close()
        door.close()


@pytest.mark.attack
def test_a_skipped_frame_still_needs_a_growing_nonce() -> None:
    door = Door(limits=Limits(frames=4, first_frame=1024, message_bytes=4096))
    client = Handmade(door)
    try:
        client.handshake()
        client.send(client.message(b"x" * 5000, nonce=struct.pack(">Q", 50)))  # over the limit: skipped
        assert isinstance(door.events[0], Oversized)
        client.send(client.message(b"y" * 5000, nonce=struct.pack(">Q", 50)))  # skipped again, but replayed
        assert_cut(door, client, "replayed or reordered")
    finally:
        client.close()
        door.close()


@pytest.mark.unit
def test_a_sealed_ping_is_answered_with_a_sealed_pong(door: Door, client: Handmade) -> None:
    client.handshake()
    client.send(client.message(b"\x04PING\x00\x0acontext", flags=0x02))
    assert client.receive() == (0x02, b"\x04PONGcontext")
    assert door.events == []


@pytest.mark.unit
def test_a_hello_in_the_greetings_segment_is_answered_at_once(door: Door, client: Handmade) -> None:
    """A greeting and the first handshake command in one segment: the command is answered at once, not
    left in the buffer until more bytes come (CURVE's WELCOME depends on it)."""
    hello = client.hello()
    client.sock.sendall(greeting(b"CURVE") + frame_header(len(hello), COMMAND) + hello)
    door.pump()
    client.recv_exactly(64)
    client.welcome()
    assert door.error is None


# -- the server's key files ----------------------------------------------------------------------------
@pytest.mark.unit
def test_server_keys_load_from_keygen_files(tmp_path: Path) -> None:
    secret = tmp_path / "server.key"
    secret.write_text(SERVER_SECRET_Z85.decode() + "\n")
    secret.chmod(0o600)  # as `openinfer keygen` writes it (tests/attack/test_secret_files.py: not otherwise)
    Path(f"{secret}.pub").write_text(SERVER_PUBLIC_Z85.decode() + "\n")
    assert load_server_keys(str(secret)) == KEYS
    assert SERVER_SECRET_Z85.decode() not in repr(KEYS)
    Path(f"{secret}.pub").unlink()  # e.g. a systemd credential: the public key is derived
    assert load_server_keys(str(secret)) == KEYS


@pytest.mark.parametrize(
    "secret_text, public_text, names",
    [
        (None, None, "server.key"),  # missing
        ("short\n", None, "server.key"),
        ("~" * 40 + "\n", None, "server.key"),  # not Z85
        (SERVER_SECRET_Z85.decode(), zmq.curve_keypair()[0].decode(), "server.key.pub"),  # another pair's public key
    ],
    ids=["missing", "short", "not-z85", "another-pairs-public-key"],  # stable ids: the last case's key is random
)
@pytest.mark.unit
def test_unusable_key_files_are_config_errors_naming_the_file(tmp_path: Path, secret_text: str | None, public_text: str | None, names: str) -> None:
    secret = tmp_path / "server.key"
    if secret_text is not None:
        secret.write_text(secret_text)
        secret.chmod(0o600)
    if public_text is not None:
        Path(f"{secret}.pub").write_text(public_text)
    with pytest.raises(ConfigError) as info:
        load_server_keys(str(secret))
    assert re.search(re.escape(f"{tmp_path}/{names}") + r"(?![.\w])", str(info.value)), info.value
