"""CurveZMQ's server side (rfc.zeromq.org spec 26, carried by ZMTP 3.x as its CURVE mechanism, spec 25/37)
for the daemon's own tcp:// listener: the server's key pair from its files, and one `CurveServer` per
connection, driven by openinfer.wire.zmtp.SealedFrameStream.

The boxes are libsodium's (PyNaCl): crypto_box (Curve25519, XSalsa20, Poly1305) between key pairs and
crypto_secretbox for the cookie. What this module adds is the protocol around them, strictly:

  C: HELLO     version 1.0, 72 zero bytes of padding, the client's transient key C', a short nonce, and
               Box[64 zero bytes](C'->S): proves C' was made for this server's key S.
  S: WELCOME   Box[S' + cookie](S->C'), S' a fresh transient key pair; the cookie is
               secretbox[C' + s'] under a key made for this connection, forgotten after INITIATE.
  C: INITIATE  the cookie back, then Box[C + vouch + metadata](C'->S'), the vouch being Box[C' + S](C->S'):
               the holder of the permanent key C vouches for this connection's C' to this server.
  S: READY     Box[our metadata](S'->C'), sent only once `authorize` (the access policy) admits C;
               otherwise ERROR and the connection closes.
  MESSAGE      one per frame each way: a short nonce, then Box[flags + frame](C'<->S'); flags bit 0 is
               MORE, bit 1 COMMAND (ZMTP 3.1 commands such as PING travel sealed too). libzmq carries
               each MESSAGE in a single, final ZMTP message frame (not a command frame): so do we.

Short nonces (HELLO, INITIATE, then each MESSAGE) must grow strictly within a connection, per direction;
anything malformed, out of order, replayed or failing to open closes the connection (ProtocolError).
"""
from __future__ import annotations

import struct
from hmac import compare_digest
from pathlib import Path
from typing import Callable, NamedTuple

from nacl.bindings import (
    crypto_box_afternm,
    crypto_box_beforenm,
    crypto_box_easy_afternm,
    crypto_box_keypair,
    crypto_box_open,
    crypto_box_open_afternm,
    crypto_box_open_easy_afternm,
    crypto_scalarmult_base,
    crypto_secretbox,
    crypto_secretbox_open,
    randombytes,
)
from nacl.exceptions import CryptoError
from zmq.utils import z85

from openinfer.daemon.files.secret_file import read_secret_file, read_small_file
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.wire.sealed import Refused
from openinfer.wire.zmtp import BIG_FRAME, COMMAND, MORE, Buffer, ProtocolError, frame_header, parse_properties

KEY_BYTES = 32
_NONCE = struct.Struct(">Q")
_LAST_NONCE = (1 << 64) - 1
_MESSAGE = b"\x07MESSAGE"
_MESSAGE_OVERHEAD = len(_MESSAGE) + 8 + 16 + 1  # name, short nonce, MAC, flags
_FROM_CLIENT = b"CurveZMQMESSAGEC"
_FROM_SERVER = b"CurveZMQMESSAGES"
_SEALED_MORE = 0x01  # flags inside a MESSAGE box
_SEALED_COMMAND = 0x02
_ZMTP_FLAGS = (0, MORE, COMMAND)  # by sealed flags; 3 (a command with MORE) and above are refused
_LAST_FLAG, _MORE_FLAG, _COMMAND_FLAG = b"\x00", b"\x01", b"\x02"

# A connection's handshake states.
_HELLO, _INITIATE, _OPEN = "hello", "initiate", "open"


class ServerKeys(NamedTuple):
    """The server's permanent key pair, 32 raw bytes each. Never printed with its secret."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:
        return f"ServerKeys(public={z85.encode(self.public).decode()}, secret=<hidden>)"


def _read_key(path: Path, what: str) -> bytes:
    # (who holds the secret one can pose as this daemon to every tcp:// client; neither may block the start)
    text = read_secret_file(path, "CURVE secret key file") if what == "secret" else read_small_file(path, f"CURVE {what} key file")
    text = text.rstrip(b"\r\n")
    if len(text) != 40:
        raise ConfigError(f"CURVE {what} key file {path} must hold one Z85 key (40 characters, `openinfer keygen`); it holds {len(text)} characters")
    try:
        key = z85.decode(text)
    except (ValueError, KeyError, IndexError, OverflowError, struct.error):
        raise ConfigError(f"CURVE {what} key file {path} does not hold a Z85 key (40 characters from the Z85 alphabet, `openinfer keygen`)") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"CURVE {what} key file {path} does not hold a 32-byte key")
    return key


def load_server_keys(path: str) -> ServerKeys:
    """(public, secret) from PATH (the Z85 secret key, as `openinfer keygen PATH` writes it). The public
    key is derived from the secret one; PATH.pub, when present, must hold that same key (a pair from two
    different runs of keygen would leave every client unable to connect). Raises ConfigError naming the file."""
    secret_path = Path(path)
    secret = _read_key(secret_path, "secret")
    public = crypto_scalarmult_base(secret)
    public_path = Path(f"{path}.pub")
    if public_path.exists():
        listed = _read_key(public_path, "public")
        if not compare_digest(listed, public):
            raise ConfigError(f"CURVE public key file {public_path} does not match the secret key in {secret_path}: clients given it could not connect; regenerate both with `openinfer keygen`")
    return ServerKeys(public, secret)


Authorize = Callable[[str], str | None]  # the client's key (Z85) -> None to admit it, or the reason to refuse


class CurveServer:
    """CurveZMQ's server side of one connection (see the module docstring). `authorize(key)` is asked,
    with the client's permanent public key in Z85, before READY: it returns None to admit the client, or
    the reason to send it in an ERROR command."""

    name = b"CURVE"
    as_server = True
    overhead = _MESSAGE_OVERHEAD

    __slots__ = (
        "_keys", "_authorize", "_state", "_transient_public", "_transient_secret", "_client_transient",
        "_cookie_key", "_key", "_nonce", "_peer_nonce", "client_key",
    )

    def __init__(self, keys: ServerKeys, authorize: Authorize) -> None:
        self._keys = keys
        self._authorize = authorize
        self._state = _HELLO
        self._transient_public = b""
        self._transient_secret = b""
        self._client_transient = b""
        self._cookie_key = b""
        self._key = b""  # crypto_box_beforenm(C', s'): every box after WELCOME
        self._nonce = 0  # our last short nonce
        self._peer_nonce = 0  # the client's last short nonce
        self.client_key = ""  # Z85, once admitted

    # -- handshake --------------------------------------------------------------------------------------
    def handshake(self, body: bytes, metadata: bytes) -> tuple[list[bytes], dict[bytes, bytes] | None]:
        if self._state == _HELLO:
            return [self._welcome(body)], None
        if self._state == _INITIATE:
            ready, properties = self._ready(body, metadata)
            return [ready], properties
        raise ProtocolError(f"handshake command {_name_of(body)!r} after the handshake")

    def _welcome(self, hello: bytes) -> bytes:
        """HELLO -> WELCOME."""
        if not hello.startswith(b"\x05HELLO"):
            raise ProtocolError(f"expected HELLO, got {_name_of(hello)!r}")
        if len(hello) != 200:
            raise ProtocolError(f"HELLO of {len(hello)} bytes; it has 200")
        if hello[6:8] != b"\x01\x00":
            raise ProtocolError(f"CurveZMQ version {hello[6]}.{hello[7]}; only 1.0 is spoken here")
        if hello[8:80] != bytes(72):
            raise ProtocolError("HELLO's anti-amplification padding is not zero")
        client_transient, nonce = hello[80:112], hello[112:120]
        hello_key = _shared(client_transient, self._keys.secret)
        try:
            signature = crypto_box_open_afternm(hello[120:200], b"CurveZMQHELLO---" + nonce, hello_key)
        except CryptoError:
            raise ProtocolError("HELLO's signature box does not open: the client was not given this server's public key") from None
        if not compare_digest(signature, bytes(64)):
            raise ProtocolError("HELLO's signature box does not hold 64 zero bytes")
        self._peer_nonce = _NONCE.unpack(nonce)[0]
        self._client_transient = client_transient
        self._transient_public, self._transient_secret = crypto_box_keypair()
        self._cookie_key = randombytes(32)
        cookie_nonce = randombytes(16)
        cookie = cookie_nonce + crypto_secretbox(client_transient + self._transient_secret, b"COOKIE--" + cookie_nonce, self._cookie_key)
        welcome_nonce = randombytes(16)
        box = crypto_box_afternm(self._transient_public + cookie, b"WELCOME-" + welcome_nonce, hello_key)
        self._state = _INITIATE
        return b"\x07WELCOME" + welcome_nonce + box

    def _ready(self, initiate: bytes, metadata: bytes) -> tuple[bytes, dict[bytes, bytes]]:
        """INITIATE -> READY, once the client's key C is proven and admitted."""
        if not initiate.startswith(b"\x08INITIATE"):
            raise ProtocolError(f"expected INITIATE, got {_name_of(initiate)!r}")
        if len(initiate) < 257:
            raise ProtocolError(f"INITIATE of {len(initiate)} bytes; it has at least 257")
        cookie, nonce, box = initiate[9:105], initiate[105:113], initiate[113:]
        try:
            cookie_text = crypto_secretbox_open(cookie[16:], b"COOKIE--" + cookie[:16], self._cookie_key)
        except CryptoError:
            raise ProtocolError("INITIATE's cookie is not the one this connection was sent") from None
        if not compare_digest(cookie_text, self._client_transient + self._transient_secret):
            raise ProtocolError("INITIATE's cookie is not the one this connection was sent")
        short_nonce = _NONCE.unpack(nonce)[0]
        if short_nonce <= self._peer_nonce:
            raise ProtocolError("INITIATE's short nonce does not follow HELLO's")
        key = _shared(self._client_transient, self._transient_secret)
        try:
            text = crypto_box_open_afternm(box, b"CurveZMQINITIATE" + nonce, key)
        except CryptoError:
            raise ProtocolError("INITIATE's box does not open with this connection's transient keys") from None
        client_key, vouch_nonce, vouch_box = text[:32], text[32:48], text[48:128]
        try:
            vouch = crypto_box_open(vouch_box, b"VOUCH---" + vouch_nonce, client_key, self._transient_secret)
        except CryptoError:
            raise ProtocolError("INITIATE's vouch was not made with the secret key of the client key it names") from None
        if not compare_digest(vouch, self._client_transient + self._keys.public):
            raise ProtocolError("INITIATE's vouch is for another connection or another server")
        properties = parse_properties(text[128:])
        self._peer_nonce = short_nonce
        self._key = key
        self._cookie_key = self._transient_secret = b""  # the cookie has served: forget it and s'
        client = z85.encode(client_key).decode("ascii")
        refusal = self._authorize(client)
        if refusal is not None:
            raise Refused(refusal)
        self.client_key = client
        ready_nonce = self._next_nonce()
        self._state = _OPEN
        return b"\x05READY" + ready_nonce + crypto_box_easy_afternm(metadata, b"CurveZMQREADY---" + ready_nonce, key), properties

    # -- messages ---------------------------------------------------------------------------------------
    def seal(self, frames: list[Buffer]) -> list[Buffer]:
        buffers: list[Buffer] = []
        last = len(frames) - 1
        for index, frame in enumerate(frames):
            buffers += self._sealed(_MORE_FLAG if index < last else _LAST_FLAG, frame)
        return buffers

    def seal_command(self, body: bytes) -> list[Buffer]:
        return list(self._sealed(_COMMAND_FLAG, body))

    def _sealed(self, flag: bytes, frame: Buffer) -> tuple[bytes, bytes]:
        nonce = self._next_nonce()
        box = crypto_box_easy_afternm(b"".join((flag, frame)), _FROM_SERVER + nonce, self._key)
        return frame_header(len(_MESSAGE) + 8 + len(box), 0) + _MESSAGE + nonce, box  # a message frame, as libzmq expects

    def unseal(self, body: Buffer) -> tuple[int, Buffer]:
        nonce, short_nonce = self._message_nonce(body)
        box = body[16:] if type(body) is bytes else bytes(memoryview(body)[16:])
        try:
            text = crypto_box_open_easy_afternm(box, _FROM_CLIENT + nonce, self._key)
        except CryptoError:
            raise ProtocolError("a MESSAGE box does not open with this connection's keys") from None
        self._peer_nonce = short_nonce
        sealed_flags = text[0]
        if sealed_flags > _SEALED_COMMAND:
            raise ProtocolError(f"MESSAGE flags {sealed_flags:#x}: reserved bits or a command with MORE")
        frame: Buffer = memoryview(text)[1:] if len(text) > BIG_FRAME else text[1:]
        return _ZMTP_FLAGS[sealed_flags], frame

    def skip(self, head: Buffer) -> int:
        """MORE or 0: the flag of a MESSAGE skipped unopened (over a limit), from its first bytes. The box
        is not opened, so the flag is not authenticated (see SealedFrameStream); its nonce must still grow.
        The flag's byte is the first after the MAC, encrypted by the XSalsa20 keystream's byte at the same
        place: boxing one zero byte under the same nonce and key gives that keystream byte."""
        nonce, self._peer_nonce = self._message_nonce(head)
        keystream = crypto_box_easy_afternm(b"\x00", _FROM_CLIENT + nonce, self._key)[16]
        sealed_flags = head[32] ^ keystream
        if sealed_flags & ~_SEALED_MORE:
            raise ProtocolError(f"skipped MESSAGE flags {sealed_flags:#x}: reserved bits, or a command over the size limits")
        return MORE if sealed_flags else 0

    def _message_nonce(self, body: Buffer) -> tuple[bytes, int]:
        """A MESSAGE's short nonce, as sent and as a number, once it is checked to grow."""
        if self._state != _OPEN:
            raise ProtocolError("a sealed frame before the handshake completed")
        if len(body) < _MESSAGE_OVERHEAD or body[:8] != _MESSAGE:
            raise ProtocolError(f"expected MESSAGE, got {_name_of(bytes(body[:16]))!r}")
        nonce = bytes(body[8:16])
        short_nonce = int.from_bytes(nonce, "big")
        if short_nonce <= self._peer_nonce:
            raise ProtocolError(f"MESSAGE nonce {short_nonce} after {self._peer_nonce}: replayed or reordered")
        return nonce, short_nonce

    def _next_nonce(self) -> bytes:
        if self._nonce >= _LAST_NONCE:
            raise ProtocolError("2^64 - 1 commands sent on one connection: its nonces are used up")
        self._nonce += 1
        return _NONCE.pack(self._nonce)


def _shared(public: bytes, secret: bytes) -> bytes:
    """crypto_box_beforenm, with a key no box can be made for (a low-order point) as a ProtocolError."""
    try:
        return crypto_box_beforenm(public, secret)
    except CryptoError:
        raise ProtocolError("a transient key no box can be made with") from None


def _name_of(body: bytes) -> bytes:
    return body[1 : 1 + body[0]] if body else b""
