"""Bad input gets a clear, typed error; the daemon keeps serving correct answers afterwards."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from openinfer.client import Client, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from daemon_harness import EXAMPLE_MODELS, RunningDaemon
from reference import run_reference

pytestmark = pytest.mark.live

X = np.ones((1, 64), dtype=np.float32)


def assert_still_serving(client: Client) -> None:
    y = client.infer("tiny", {"x": X}).outputs["y"]
    assert y.shape == (1, 64) and np.isfinite(y).all()


def raw_round_trip(address: str, frames: list[bytes], timeout_ms: int = 5000, socket_type: int = zmq.DEALER) -> list[bytes]:
    context = zmq.Context()
    sock = context.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        return sock.recv_multipart()
    finally:
        sock.close()
        context.term()


def header(**fields: Any) -> bytes:
    base: dict[str, Any] = {"v": 1, "id": 7, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None})


def error_of(reply: list[bytes]) -> dict[str, Any]:
    decoded = msgpack.unpackb(reply[0])
    assert "error" in decoded, decoded
    return decoded


@pytest.mark.parametrize(
    ("model", "version", "exc", "fragment"),
    [
        ("no_such_model", None, NotFound, "unknown model 'no_such_model'"),
        ("tiny", 9, NotFound, "has no version 9"),
        ("broken", None, Unavailable, "is failed"),
    ],
)
def test_unknown_models_and_versions(daemon: RunningDaemon, model: str, version: int | None, exc: type, fragment: str) -> None:
    client = daemon.client()
    with pytest.raises(exc) as info:
        client.infer(model, {"x": X}, version=version)
    assert fragment in info.value.message
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"x": X.astype(np.float64)}, "input 'x': datatype FP64, model expects FP32"),
        ({"x": X.astype(np.int32)}, "datatype INT32, model expects FP32"),
        ({"x": np.ones((64,), np.float32)}, "input 'x': rank 1 [64], model expects rank 2"),
        ({"x": np.ones((1, 63), np.float32)}, "input 'x': dimension 1 is 63, model expects 64"),
        ({}, "missing inputs ['x']"),
        ({"x": X, "extra": X}, "has no input 'extra'"),
    ],
)
def test_wrong_tensors_name_the_input_and_what_was_expected(daemon: RunningDaemon, inputs: dict[str, np.ndarray], fragment: str) -> None:
    client = daemon.client()
    with pytest.raises(InvalidArgument) as info:
        client.infer("tiny", inputs)
    assert info.value.code == "INVALID_ARGUMENT"
    assert fragment in info.value.message
    assert_still_serving(client)


SILERO_STATE = np.zeros((2, 1, 128), np.float32)  # batch 1
SILERO_RATE = np.array(16000, np.int64)


@pytest.mark.parametrize(
    ("model", "inputs", "named", "complaint"),
    [
        # H and W must be multiples of 32: the decoder's Add cannot broadcast 3 by 4.
        ("ocr_det", {"x": np.zeros((1, 3, 48, 64), np.float32)}, "input 'x' [1, 3, 48, 64]: the model's graph cannot take this shape",
         "Attempting to broadcast an axis by a dimension other than 1"),
        # Every check passes (both batch dimensions are dynamic), but 2 rows of audio need a state for 2.
        ("silero_vad", {"input": np.zeros((2, 512), np.float32), "state": SILERO_STATE, "sr": SILERO_RATE},
         "inputs 'input' [2, 512] and 'state' [2, 1, 128]: the model's graph cannot take these shapes together", "must have shape"),
    ],
)
def test_a_shape_the_graph_cannot_take_is_invalid_argument_naming_the_input(daemon: RunningDaemon, model: str, inputs: dict[str, np.ndarray], named: str, complaint: str) -> None:
    """onnxruntime reports these as its generic FAIL; they are the caller's mistake, not a daemon fault,
    and the message names the inputs and carries what onnxruntime said, word for word."""
    with pytest.raises(Exception) as in_process:
        run_reference(EXAMPLE_MODELS / model / "1" / "model.onnx", inputs)
    assert type(in_process.value).__name__ == "Fail" and complaint in str(in_process.value)
    client = daemon.client(timeout=60)
    with pytest.raises(InvalidArgument) as info:
        client.infer(model, inputs)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.message.startswith(named), info.value.message
    assert info.value.message.endswith(f"onnxruntime said: Fail: {str(in_process.value).strip()}"), info.value.message
    assert_still_serving(client)


def test_unknown_output_name(daemon: RunningDaemon) -> None:
    with pytest.raises(InvalidArgument, match="has no outputs"):
        daemon.client().infer("tiny", {"x": X}, outputs=["nope"])


def test_over_the_model_size_limit_is_resource_exhausted(daemon: RunningDaemon) -> None:
    client = daemon.client()
    with pytest.raises(ResourceExhausted, match="limit for 'small_limit' is 1024"):
        client.infer("small_limit", {"x": np.ones((8, 64), np.float32)})
    assert client.infer("small_limit", {"x": X}).outputs["y"].shape == (1, 64)


def test_byte_length_not_matching_shape(daemon: RunningDaemon) -> None:
    reply = raw_round_trip(daemon.address, [header(), X.tobytes()[:-4]])
    err = error_of(reply)
    assert err["id"] == 7 and err["error"]["code"] == "INVALID_ARGUMENT"
    assert "needs 256 bytes, data frame has 252" in err["error"]["message"]


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ([b"\xc1\xc1garbage"], "not valid msgpack"),
        ([msgpack.packb([1, 2, 3])], "must be a msgpack map"),
        ([msgpack.packb({"v": 2, "id": 1, "op": "models"})], "unsupported protocol version 2"),
        ([msgpack.packb({"v": 1, "id": -5, "op": "models"})], "`id` must be an unsigned 64-bit integer"),
        ([msgpack.packb({"v": 1, "id": 3, "op": "explode"})], "unknown operation 'explode'"),
        ([msgpack.packb({"v": 1, "id": 3, "op": "models"}), b"extra"], "takes no data frames"),
        ([header()], "lists 1 tensors but 0 data frames follow"),
        ([header(), X.tobytes(), X.tobytes()], "lists 1 tensors but 2 data frames follow"),
        ([header(inputs="x")], "`inputs` must be an array"),
        ([header(inputs=[{"name": "x", "datatype": "FP32", "shape": [1, -64]}]), X.tobytes()], "shape must be an array of non-negative integers"),
        ([header(inputs=[{"name": "x", "datatype": "FLOAT", "shape": [1, 64]}]), X.tobytes()], "unknown datatype 'FLOAT'"),
        ([header(inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 64]}] * 2), X.tobytes(), X.tobytes()], "given twice"),
        ([header(timeout_ms=0), X.tobytes()], "`timeout_ms` must be positive"),
        ([header(client="c" * 65), X.tobytes()], "`client` must be a string of at most 64"),
        ([header(version="one"), X.tobytes()], "`version` must be an integer"),
    ],
)
def test_malformed_messages_get_invalid_argument(daemon: RunningDaemon, frames: list[bytes], fragment: str) -> None:
    err = error_of(raw_round_trip(daemon.address, frames))
    assert err["error"]["code"] == "INVALID_ARGUMENT", err
    assert fragment in err["error"]["message"]


def test_unreadable_id_is_answered_with_nil_id(daemon: RunningDaemon) -> None:
    err = error_of(raw_round_trip(daemon.address, [b"\x00\x01\x02"]))
    assert err["id"] is None and err["error"]["code"] == "INVALID_ARGUMENT"


def test_too_many_frames_and_oversized_header(daemon: RunningDaemon) -> None:
    err = error_of(raw_round_trip(daemon.address, [header()] + [b"x"] * 300))
    assert err["error"]["code"] == "RESOURCE_EXHAUSTED"
    err = error_of(raw_round_trip(daemon.address, [msgpack.packb({"v": 1, "id": 1, "op": "models", "pad": "p" * 70_000})]))
    assert err["error"]["code"] == "RESOURCE_EXHAUSTED" and "header is" in err["error"]["message"]


def test_req_socket_clients_are_answered_with_a_delimiter(daemon: RunningDaemon) -> None:
    reply = raw_round_trip(daemon.address, [header(), X.tobytes()], socket_type=zmq.REQ)
    decoded = msgpack.unpackb(reply[0])
    assert decoded["id"] == 7 and decoded["outputs"][0]["name"] == "y"
    assert len(reply[1]) == 256


def test_random_garbage_never_takes_the_daemon_down(daemon: RunningDaemon) -> None:
    rng = np.random.default_rng(11)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.address)
    sent = 0
    try:
        for _ in range(300):
            count = int(rng.integers(1, 5))
            # A leading empty frame is a REQ delimiter by protocol, so garbage starts non-empty.
            frames = [os.urandom(int(rng.integers(1, 200)))] + [os.urandom(int(rng.integers(0, 200))) for _ in range(count - 1)]
            sock.send_multipart(frames)
            sent += 1
        replies = 0
        while sock.poll(2000):
            reply = sock.recv_multipart()
            assert "error" in msgpack.unpackb(reply[0])
            replies += 1
            if replies == sent:
                break
        # Each garbage message is answered with an error until the connection has used up
        # server.peer_strike_limit (16); then the daemon drops the connection. libzmq reconnects and
        # sends what it still held, which starts a new connection with its own budget
        # (tests/attack/test_front_door.py checks one connection exactly, with a raw ZMTP peer).
        assert 16 <= replies < sent
    finally:
        sock.close()
        context.term()
    assert_still_serving(daemon.client())


def test_a_message_over_the_limit_is_answered_and_the_peer_still_served(daemon_factory: Any, tiny_repo: Path) -> None:
    running = daemon_factory(tiny_repo, env={"OPENINFER_SERVER_MAX_REQUEST_BYTES": "65536"})
    big = np.ones((1024, 64), np.float32)  # 256 KiB: over the message limit (limit + 64 KiB header allowance)
    with pytest.raises(ResourceExhausted, match="max_request_bytes"):
        running.client(timeout=1.5, direct=False).infer("tiny", {"x": big})
    assert_still_serving(running.client())
    medium = np.ones((300, 64), np.float32)  # 76.8 KiB: under MAXMSGSIZE but over the request limit
    with pytest.raises(ResourceExhausted):
        running.client().infer("tiny", {"x": medium})
