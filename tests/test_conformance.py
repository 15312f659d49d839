"""Wire protocol v1 conformance: every vector in tests/conformance/vectors.json, sent as raw frames on a
plain pyzmq DEALER (not the Python client) to a real daemon serving examples/models, gets exactly the
one reply the vector expects. Also checks the worked example of docs/PROTOCOL.md byte for byte, the REQ
envelope, many requests in flight on one socket, and cancellation of a queued request.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

from daemon_harness import EXAMPLE_MODELS, RunningDaemon, cleanup_workdir, start_daemon
from reference import run_reference
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

VECTORS: list[dict[str, Any]] = json.loads((Path(__file__).resolve().parent / "conformance" / "vectors.json").read_text())
DAEMON_ARGS: tuple[str, ...] = ()  # the daemon runs sandboxed, as in production
REPLY_TIMEOUT_MS = 20_000
EXTRA_REPLY_WAIT_MS = 30  # after the reply: long enough to catch a second reply sent right behind it

# docs/PROTOCOL.md, "Tensor encoding": bytes per element (BYTES is variable).
ELEMENT_SIZE = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2,
}
STAGES = ("decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us")
SUCCESS_TIMING = frozenset({*STAGES, "cpu_us", "total_us"})


def _serve(repo: ModelRepo) -> Iterator[RunningDaemon]:
    try:
        running = start_daemon(repo.ready(), *DAEMON_ARGS)
    except BaseException:
        repo.remove()
        raise
    yield running
    running.stop()
    cleanup_workdir(running)
    repo.remove()


@pytest.fixture(scope="module")
def example_daemon() -> Iterator[RunningDaemon]:
    """A daemon serving only the shipped example models, as the vectors assume."""
    repo = ModelRepo("oi-conformance-")
    repo.examples()
    yield from _serve(repo)


@pytest.fixture(scope="module")
def zmq_context() -> Iterator[zmq.Context]:  # type: ignore[type-arg]
    context = zmq.Context()
    yield context
    context.term()


def _socket(context: zmq.Context, address: str, kind: int = zmq.DEALER) -> zmq.Socket:  # type: ignore[type-arg]
    """The options docs/PROTOCOL.md recommends for a client."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.connect(address)
    return sock


def _recv(sock: zmq.Socket, timeout_ms: int = REPLY_TIMEOUT_MS) -> list[bytes]:  # type: ignore[type-arg]
    assert sock.poll(timeout_ms, zmq.POLLIN), f"no reply within {timeout_ms} ms"
    return sock.recv_multipart()


def _exchange(context: zmq.Context, address: str, frames: list[bytes]) -> list[bytes]:  # type: ignore[type-arg]
    """Send one request on a fresh DEALER; return its one reply, and check no second reply follows."""
    sock = _socket(context, address)
    try:
        sock.send_multipart(frames)
        reply = _recv(sock)
        assert not sock.poll(EXTRA_REPLY_WAIT_MS, zmq.POLLIN), "a second reply arrived for one request"
        return reply
    finally:
        sock.close()


def _decode(frame: bytes) -> dict[str, Any]:
    header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    assert isinstance(header, dict), f"reply header is a {type(header).__name__}, not a map"
    _assert_text_is_str(header)
    return header


def _assert_text_is_str(value: Any, where: str = "header") -> None:
    """The daemon sends map keys and every text as msgpack str, never bin."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where}: map key {key!r} is not a str"
            _assert_text_is_str(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _assert_text_is_str(item, f"{where}[{index}]")
    else:
        assert not isinstance(value, bytes), f"{where} is bin, not str"


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _assert_timing(timing: Any, *, success: bool) -> None:
    assert isinstance(timing, dict)
    assert all(isinstance(v, float) for v in timing.values()), timing
    assert "total_us" in timing and timing["total_us"] >= 0, timing
    if success:
        assert set(timing) == SUCCESS_TIMING, sorted(timing)
    else:
        assert set(timing) <= SUCCESS_TIMING, sorted(timing)
    stages = sum(timing.get(stage, 0.0) for stage in STAGES)
    assert stages <= timing["total_us"] + 0.01, f"stages sum to {stages} us, beyond total_us {timing['total_us']}"


def _assert_outputs(header: dict[str, Any], frames: list[bytes], expected: list[dict[str, Any]]) -> None:
    assert isinstance(header.get("model"), str) and _is_uint(header.get("version")), header
    assert header["outputs"] == expected, header["outputs"]
    assert len(frames) == 1 + len(expected), f"{len(expected)} outputs, {len(frames) - 1} data frames"
    for spec, frame in zip(expected, frames[1:]):
        count = int(np.prod(spec["shape"])) if spec["shape"] else 1
        if spec["datatype"] == "BYTES":  # each element: a 4-byte little-endian length, then its bytes
            offset = 0
            for _ in range(count):
                offset += 4 + int.from_bytes(frame[offset : offset + 4], "little")
            assert offset == len(frame), (spec, len(frame))
        else:
            assert len(frame) == ELEMENT_SIZE[spec["datatype"]] * count, (spec, len(frame))
    _assert_timing(header["timing"], success=True)


def check_reply(expect: dict[str, Any], frames: list[bytes]) -> dict[str, Any]:
    """Assert a reply matches a vector's expectation; returns the decoded header."""
    header = _decode(frames[0])
    assert header.get("v") == 1, header
    assert "id" in header, header
    if expect["id"] is None:
        assert header["id"] is None, header
    else:
        assert _is_uint(header["id"]) and header["id"] == expect["id"], header
    if "error" in expect:
        error = header.get("error")
        assert isinstance(error, dict), f"expected {expect['error']}, got {header}"
        assert error.get("code") == expect["error"], error
        assert isinstance(error.get("message"), str) and error["message"], error
        assert isinstance(error.get("details", {}), dict), error
        assert "result" not in header and "outputs" not in header, header
        assert len(frames) == 1, "an error reply carries no data frames"
        if "timing" in header:
            _assert_timing(header["timing"], success=False)
        return header
    assert "error" not in header, header["error"]
    if "outputs" in expect:
        _assert_outputs(header, frames, expect["outputs"])
    else:
        result = header.get("result")
        assert isinstance(result, dict), header
        missing = set(expect["result_keys"]) - set(result)
        assert not missing, f"result lacks {sorted(missing)}: {sorted(result)}"
        for key, value in expect.get("result_values", {}).items():
            assert result[key] == value, (key, result[key])
        assert len(frames) == 1, "a non-infer reply carries no data frames"
    return header


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(example_daemon: RunningDaemon, zmq_context: zmq.Context, vector: dict[str, Any]) -> None:  # type: ignore[type-arg]
    frames = [bytes.fromhex(h) for h in vector["request"]["frames_hex"]]
    reply = _exchange(zmq_context, example_daemon.address, frames)
    check_reply(vector["expect"], reply)


def test_daemon_still_serves_correct_answers_after_all_vectors(example_daemon: RunningDaemon, zmq_context: zmq.Context) -> None:  # type: ignore[type-arg]
    x = np.random.default_rng(5).standard_normal((2, 64)).astype("<f4")
    header = {"v": 1, "id": 77, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 64]}]}
    reply = _exchange(zmq_context, example_daemon.address, [msgpack.packb(header), x.tobytes()])
    check_reply({"id": 77, "ok": True, "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 64]}]}, reply)
    got = np.frombuffer(reply[1], dtype="<f4").reshape(2, 64)
    want = run_reference(EXAMPLE_MODELS / "tiny" / "1" / "model.onnx", {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _tiny_request(request_id: int) -> list[bytes]:
    header = {"v": 1, "id": request_id, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}
    return [msgpack.packb(header), np.ones((1, 64), "<f4").tobytes()]


def test_req_socket_gets_its_reply(example_daemon: RunningDaemon, zmq_context: zmq.Context) -> None:  # type: ignore[type-arg]
    sock = _socket(zmq_context, example_daemon.address, zmq.REQ)
    try:
        sock.send_multipart(_tiny_request(501))
        check_reply({"id": 501, "ok": True, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64]}]}, _recv(sock))
    finally:
        sock.close()


def test_dealer_with_an_empty_delimiter_gets_it_back(example_daemon: RunningDaemon, zmq_context: zmq.Context) -> None:  # type: ignore[type-arg]
    reply = _exchange(zmq_context, example_daemon.address, [b"", *_tiny_request(502)])
    assert reply[0] == b"", "a request that starts with an empty frame is answered with one"
    check_reply({"id": 502, "ok": True, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64]}]}, reply[1:])


def test_many_requests_in_flight_on_one_dealer(example_daemon: RunningDaemon, zmq_context: zmq.Context) -> None:  # type: ignore[type-arg]
    sock = _socket(zmq_context, example_daemon.address)
    ids = list(range(600, 640))
    try:
        for request_id in ids:
            sock.send_multipart(_tiny_request(request_id))
        sock.send_multipart([msgpack.packb({"v": 1, "id": 640, "op": "health"})])
        seen = []
        for _ in range(len(ids) + 1):
            header = _decode(_recv(sock)[0])
            assert "error" not in header, header
            seen.append(header["id"])
        assert sorted(seen) == [*ids, 640]
        assert not sock.poll(EXTRA_REPLY_WAIT_MS, zmq.POLLIN)
    finally:
        sock.close()


def test_cancel_drops_a_queued_request_of_the_same_connection(example_daemon: RunningDaemon, zmq_context: zmq.Context) -> None:  # type: ignore[type-arg]
    """ocr_det has one worker: A runs (~0.5 s), B and C wait. Cancelling B answers B with DEADLINE_EXCEEDED
    before the cancel's own reply; C's 5 ms deadline passes in the queue; A completes normally. (A ran
    ~0.1 s once: under a parallel run's load the two cancels' round trips took longer, B had started.)"""
    shape = [1, 3, 320, 640]
    payload = np.zeros(shape, "<f4").tobytes()

    def slow(request_id: int, size: list[int] = shape, **extra: Any) -> list[bytes]:
        header = {"v": 1, "id": request_id, "op": "infer", "model": "ocr_det", "inputs": [{"name": "x", "datatype": "FP32", "shape": size}], **extra}
        return [msgpack.packb(header), payload if size is shape else np.zeros(size, "<f4").tobytes()]

    sock = _socket(zmq_context, example_daemon.address)
    other = _socket(zmq_context, example_daemon.address)
    try:
        sock.send_multipart(slow(701, [1, 3, 960, 1280]))
        sock.send_multipart(slow(702))
        sock.send_multipart(slow(703, timeout_ms=5))
        other.send_multipart([msgpack.packb({"v": 1, "id": 800, "op": "cancel", "target": 702})])
        check_reply({"id": 800, "ok": True, "result_keys": ["cancelled"], "result_values": {"cancelled": False}}, _recv(other))
        sock.send_multipart([msgpack.packb({"v": 1, "id": 704, "op": "cancel", "target": 702})])
        order: list[int] = []
        replies: dict[int, list[bytes]] = {}
        for _ in range(4):
            frames = _recv(sock)
            request_id = _decode(frames[0])["id"]
            assert request_id not in replies, f"two replies for {request_id}"
            order.append(request_id)
            replies[request_id] = frames
        assert not sock.poll(EXTRA_REPLY_WAIT_MS, zmq.POLLIN)
    finally:
        sock.close()
        other.close()
    check_reply({"id": 702, "error": "DEADLINE_EXCEEDED"}, replies[702])
    check_reply({"id": 704, "ok": True, "result_keys": ["cancelled"], "result_values": {"cancelled": True}}, replies[704])
    assert order.index(702) < order.index(704), order
    check_reply({"id": 703, "error": "DEADLINE_EXCEEDED"}, replies[703])
    check_reply({"id": 701, "ok": True, "outputs": [{"name": "sigmoid_0.tmp_0", "datatype": "FP32", "shape": [1, 1, 960, 1280]}]}, replies[701])


def test_an_id_already_in_flight_on_the_connection_is_refused(example_daemon: RunningDaemon, zmq_context: zmq.Context) -> None:  # type: ignore[type-arg]
    """Two requests with one id on one connection: the second is refused while the first runs; the same
    id on another connection, or again after the first was answered, is fine."""
    shape = [1, 3, 320, 640]
    header = {"v": 1, "id": 901, "op": "infer", "model": "ocr_det", "inputs": [{"name": "x", "datatype": "FP32", "shape": shape}]}
    frames = [msgpack.packb(header), np.zeros(shape, "<f4").tobytes()]
    sock = _socket(zmq_context, example_daemon.address)
    other = _socket(zmq_context, example_daemon.address)
    try:
        sock.send_multipart(frames)
        sock.send_multipart(frames)
        other.send_multipart(frames)
        first, second = _decode(_recv(sock)[0]), _decode(_recv(sock)[0])
        assert second.get("error", {}).get("code") == "INVALID_ARGUMENT" or first.get("error", {}).get("code") == "INVALID_ARGUMENT"
        refused = first if "error" in first else second
        assert refused["id"] == 901 and "already in flight" in refused["error"]["message"]
        assert "outputs" in (second if refused is first else first)
        assert "outputs" in _decode(_recv(other)[0])
        sock.send_multipart(frames)  # answered, so the id is free again
        assert "outputs" in _decode(_recv(sock)[0])
    finally:
        sock.close()
        other.close()


# -- the worked example of docs/PROTOCOL.md ("Worked example"), byte for byte -------------------------
WORKED_REQUEST_HEADER = (
    "85a17601a269642aa26f70a5696e666572a56d6f64656ca6646f75626c65a6696e707574739183a46e616d65a178"
    "a86461746174797065a446503332a57368617065920104"
)
WORKED_REQUEST_DATA = "0000803f000000400000404000008040"
WORKED_REPLY_PREFIX = (  # everything before the timing values, which differ on every run
    "86a17601a269642aa56d6f64656ca6646f75626c65a776657273696f6e01a76f7574707574739183a46e616d65a179"
    "a86461746174797065a446503332a57368617065920104a674696d696e6789"
)
WORKED_REPLY_DATA = "00000040000080400000c04000000041"
WORKED_ERROR_REQUEST_HEADER = (
    "85a17601a269642ba26f70a5696e666572a56d6f64656ca6646f75626c65a6696e707574739183a46e616d65a178"
    "a86461746174797065a446503332a57368617065920103"
)
WORKED_ERROR_PREFIX = (  # everything before the total_us value
    "84a17601a269642ba56572726f7282a4636f6465b0494e56414c49445f415247554d454e54a76d657373616765d93c"
    "696e707574202778273a2064696d656e73696f6e203120697320332c206d6f64656c2065787065637473203420"
    "287368617065205b2d312c20345d29a674696d696e6781a8746f74616c5f7573cb"
)


@pytest.fixture(scope="module")
def double_daemon() -> Iterator[RunningDaemon]:
    """The model of the worked example: `double`, x FP32[batch,4] -> y = 2x FP32[batch,4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    repo = ModelRepo("oi-conformance-double-")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    repo.model("double", lambda path: onnx.save(model, str(path)))
    yield from _serve(repo)


def test_worked_example_from_protocol_doc(double_daemon: RunningDaemon, zmq_context: zmq.Context) -> None:  # type: ignore[type-arg]
    header = {"v": 1, "id": 42, "op": "infer", "model": "double", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}
    assert msgpack.packb(header).hex() == WORKED_REQUEST_HEADER
    assert np.array([[1, 2, 3, 4]], "<f4").tobytes().hex() == WORKED_REQUEST_DATA
    reply = _exchange(zmq_context, double_daemon.address, [bytes.fromhex(WORKED_REQUEST_HEADER), bytes.fromhex(WORKED_REQUEST_DATA)])
    check_reply({"id": 42, "ok": True, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4]}]}, reply)
    assert reply[0].hex().startswith(WORKED_REPLY_PREFIX)
    assert reply[1].hex() == WORKED_REPLY_DATA

    error_data = np.array([[1, 2, 3]], "<f4").tobytes()
    reply = _exchange(zmq_context, double_daemon.address, [bytes.fromhex(WORKED_ERROR_REQUEST_HEADER), error_data])
    check_reply({"id": 43, "error": "INVALID_ARGUMENT"}, reply)
    assert reply[0].hex().startswith(WORKED_ERROR_PREFIX) and len(reply[0]) == len(WORKED_ERROR_PREFIX) // 2 + 8


# -- known daemon bugs (see docs/PROTOCOL.md, "Known deviations") --------------------------------------
# A msgpack array or map where the daemon looks a value up in a set or dict once raised TypeError out of
# the supervisor loop (fixed: types are checked first, and any unexpected error is answered INTERNAL).
# The correct answer is INVALID_ARGUMENT, and the daemon keeps serving. Each case gets its own daemon.
HOSTILE_HEADERS = {
    "op_is_an_array": {"v": 1, "id": 901, "op": ["infer"]},
    "datatype_is_an_array": {"v": 1, "id": 902, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": ["FP32"], "shape": [1, 64]}]},
    "metadata_version_is_an_array": {"v": 1, "id": 903, "op": "metadata", "model": "tiny", "version": [1]},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
def test_unhashable_header_values_get_invalid_argument(daemon_factory: Any, zmq_context: zmq.Context, name: str) -> None:  # type: ignore[type-arg]
    repo = ModelRepo("oi-conformance-hostile-")
    try:
        repo.examples(["tiny"])
        running = daemon_factory(repo.ready(), *DAEMON_ARGS)
        header = HOSTILE_HEADERS[name]
        frames = [msgpack.packb(header)] + ([np.zeros((1, 64), "<f4").tobytes()] if header["op"] == "infer" else [])
        sock = _socket(zmq_context, running.address)
        try:
            sock.send_multipart(frames)
            reply = _recv(sock, timeout_ms=2000)
        finally:
            sock.close()
        check_reply({"id": header["id"], "error": "INVALID_ARGUMENT"}, reply)
        reply = _exchange(zmq_context, running.address, _tiny_request(904))
        check_reply({"id": 904, "ok": True, "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64]}]}, reply)
    finally:
        repo.remove()
