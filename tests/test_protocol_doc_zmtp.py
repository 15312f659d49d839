"""docs/PROTOCOL.md 2.6 ("ZMTP without a ZeroMQ library") taken at its word: a client that has nothing
but a Unix socket, msgpack and the bytes that section prints (its greeting's parts, its READY command,
its frame layout) talks to a real daemon's front door and, with a lease, to a worker, and gets the
answer onnxruntime gives in process. A third-party client in Node.js was written from the document that
way; if the section's bytes drift from what the daemon speaks, this fails first."""
from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import onnxruntime as ort
import pytest

from daemon_harness import REPO_ROOT

pytestmark = pytest.mark.live

DIRECT = {"OPENINFER_POOL_DIRECT": "1"}
SECTION = re.search(r"### 2\.6 ZMTP without a ZeroMQ library\n(.*?)\n---\n", (REPO_ROOT / "docs" / "PROTOCOL.md").read_text(), re.S)


def _hex_spans(text: str) -> list[bytes]:
    """Every backticked run of hex byte pairs in `text`, in order (a line break inside one is a space)."""
    spans = re.findall(r"`((?:[0-9a-f]{2}[ \n]+)*[0-9a-f]{2})`", text)
    return [bytes.fromhex(" ".join(span.split())) for span in spans]


def doc_bytes() -> tuple[bytes, bytes]:
    """(our greeting, our READY command) as section 2.6 spells them."""
    assert SECTION is not None, "docs/PROTOCOL.md has no section 2.6"
    item_greeting, item_ready = re.split(r"\n2\. ", SECTION.group(1).split("\n1. ", 1)[1], maxsplit=1)
    signature, version, null = [span for span in _hex_spans(item_greeting) if len(span) > 1][:3]  # single bytes are the prose's (`ff`, `7f`, `00`)
    greeting = signature + version + null + bytes(16) + b"\x00" + bytes(31)  # as item 1 says: 20-byte mechanism, as-server 0, filler
    ready = _hex_spans(item_ready)[0]
    return greeting, ready


class DocClient:
    """A DEALER made of section 2.6 alone: greeting, READY, then messages of flagged frames."""

    def __init__(self, address: str) -> None:
        greeting, ready = doc_bytes()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address[len("ipc://") :])
        self.sock.sendall(greeting)
        theirs = self._exactly(64)
        assert theirs[0] == 0xFF and theirs[9] == 0x7F and theirs[10] == 3 and theirs[12:32].rstrip(b"\x00") == b"NULL"
        self.sock.sendall(ready)
        flags, body = self._frame()
        assert flags & 0x04 and body[: 1 + body[0]] == b"\x05READY"
        assert b"\x0bSocket-Type\x00\x00\x00\x06ROUTER" in body

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the peer closed the connection"
            data += chunk
        return data

    def _frame(self) -> tuple[int, bytes]:
        flags = self._exactly(1)[0]
        size = struct.unpack(">Q", self._exactly(8))[0] if flags & 0x02 else self._exactly(1)[0]
        return flags, self._exactly(size)

    def send(self, frames: list[bytes]) -> None:
        out = b""
        for i, frame in enumerate(frames):
            more = 0x01 if i < len(frames) - 1 else 0
            out += bytes((more, len(frame))) if len(frame) < 256 else bytes((more | 0x02,)) + struct.pack(">Q", len(frame))
            out += frame
        self.sock.sendall(out)

    def receive(self) -> tuple[dict[str, Any], list[bytes]]:
        frames: list[bytes] = []
        while True:
            flags, body = self._frame()
            if flags & 0x04:  # a command (PING: item 4)
                if body[1:5] == b"PING":
                    pong = b"\x04PONG" + body[7:]
                    self.sock.sendall(bytes((0x04, len(pong))) + pong)
                continue
            frames.append(body)
            if not flags & 0x01:
                header = msgpack.unpackb(frames[0])
                if header.get("goaway"):
                    frames = []
                    continue
                return header, frames[1:]

    def call(self, header: dict[str, Any], data: list[bytes] = []) -> tuple[dict[str, Any], list[bytes]]:
        self.send([msgpack.packb(header), *data])
        return self.receive()

    def close(self) -> None:
        self.sock.close()


def test_the_sections_bytes_are_what_the_daemon_and_its_clients_speak() -> None:
    from openinfer.wire import zmtp

    greeting, ready = doc_bytes()
    assert greeting[:12] == zmtp.greeting()[:12] and len(greeting) == 64
    assert ready == zmtp.command(b"READY", zmtp.encode_properties({b"Socket-Type": b"DEALER"}))
    example = SECTION.group(1) if SECTION else ""
    assert "`01 45 <header> 00 10 <tensor>`" in example  # the frame example matches send() below
    header, tensor = bytes(69), bytes(16)
    assert zmtp.message_buffers([header, tensor]) and b"".join(bytes(b) for b in zmtp.message_buffers([header, tensor])) == b"\x01\x45" + header + b"\x00\x10" + tensor


def test_a_client_made_of_the_section_alone_is_answered_on_both_paths(daemon_factory: Callable[..., Any], tiny_repo: Path) -> None:
    daemon = daemon_factory(tiny_repo, env=DIRECT)
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    want = ort.InferenceSession(str(tiny_repo / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    spec = {"name": "x", "datatype": "FP32", "shape": [3, 64]}

    front = DocClient(daemon.address)
    try:
        health, _ = front.call({"v": 1, "id": 1, "op": "health"})
        assert health["id"] == 1 and "result" in health, health
        reply, outputs = front.call({"v": 1, "id": 2, "op": "infer", "model": "tiny", "inputs": [spec]}, [x.tobytes()])
        assert reply["outputs"][0]["shape"] == [3, 64]
        np.testing.assert_allclose(np.frombuffer(outputs[0], np.float32).reshape(3, 64), want, rtol=1e-6, atol=1e-6)
        attach_here, _ = front.call({"v": 1, "id": 3, "op": "attach", "lease": b"x"})
        assert attach_here["error"]["code"] == "INVALID_ARGUMENT" and "17.3" in attach_here["error"]["message"]  # 4.1, check 8: attach goes to a worker
        lease, _ = front.call({"v": 1, "id": 4, "op": "lease", "model": "tiny"})
        result = lease["result"]
    finally:
        front.close()

    worker = DocClient(result["workers"][0]["address"])
    try:
        attached, _ = worker.call({"v": 1, "id": 5, "op": "attach", "lease": result["lease"]})
        assert attached["result"]["model"] == "tiny", attached
        reply, outputs = worker.call({"v": 1, "id": 6, "op": "infer", "inputs": [spec], "sent_ns": time.monotonic_ns()}, [x.tobytes()])
        assert reply["id"] == 6 and "dispatch_us" not in reply["timing"], reply
        np.testing.assert_allclose(np.frombuffer(outputs[0], np.float32).reshape(3, 64), want, rtol=1e-6, atol=1e-6)
        wrong, _ = worker.call({"v": 1, "id": 7, "op": "infer", "model": "magika", "inputs": [spec]}, [x.tobytes()])
        assert wrong["error"]["code"] == "INVALID_ARGUMENT" and "tiny:1" in wrong["error"]["message"]  # 17.4
    finally:
        worker.close()
