"""The Python clients read what a worker (direct path) or whatever answers at the daemon's address (front
door) sends, and must turn anything malformed into a typed error at bounded cost (attacker round 7).

Before the fixes:
- 20 reply shapes made `Client.infer` and `AsyncClient.infer` raise raw Python exceptions (`outputs` a
  string: TypeError; a spec without `datatype`: KeyError; `shape: [-1, -2]`: ValueError; `version: "x"`;
  `stages.m.runs: inf`: OverflowError; `error.details` a list: TypeError from OpenInferError itself, which
  also ended `openinfer status` in a traceback; a PERMISSION_DENIED with list details: AttributeError; a
  `timing.queue_us` string: TypeError; a reply with `id: [1]`: unhashable TypeError in the sync client);
- a ~40-byte reply declaring a BYTES output of 2*10**8 elements made the client allocate 1.5 GB
  (`np.empty(count)` before the payload was checked);
- a reply header of 15 MiB of empty maps took the client to 1.1 GiB (decoded, a header costs ~73 times
  its size), on either path;
- a fake daemon's lease token given as the integer 2**31 made `bytes(2**31)`: 2 GiB of zeros.
"""
from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon_harness import RunningDaemon
from openinfer.client import AsyncClient, Client, Internal, OpenInferError
from openinfer.client.core import MAX_REPLY_HEADER_BYTES, ClientCore
from openinfer.client.direct import MAX_INFER_REPLY_HEADER_BYTES, NoDirectPath, lease_expired, parse_lease
from openinfer.client.result import result_from_reply
from openinfer.wire.errors import error_from_wire
from openinfer.wire.tensors import decode_bytes_elements
from peak_memory import attacked_client
from steps_daemon import hostile_steps_daemon
from test_cli_replies import fake_daemon, run_cli  # noqa: F401  (fake_daemon: a fixture)

pytestmark = pytest.mark.attack

F8 = np.zeros(2, np.float32).tobytes()
GOOD_SPEC = {"name": "y", "datatype": "FP32", "shape": [2]}


def header(request_id: int, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": request_id, "model": "m", "version": 1, "outputs": [GOOD_SPEC], "timing": {"total_us": 5.0}, **fields}


def spec(**fields: Any) -> dict[str, Any]:
    return {"outputs": [{**GOOD_SPEC, **fields}]}


# What the attacker sent (each raised a raw exception from both clients before the fix): header fields,
# then the data frames.
MALFORMED: dict[str, tuple[dict[str, Any], list[bytes]]] = {
    "outputs-a-string": ({"outputs": "ab"}, [F8, F8]),
    "outputs-a-map": ({"outputs": {"name": "y"}}, [F8]),
    "spec-without-datatype": ({"outputs": [{"name": "y", "shape": [2]}]}, [F8]),
    "spec-a-list": ({"outputs": [[1, 2]]}, [F8]),
    "shape-of-floats": (spec(shape=[2.0]), [F8]),
    "shape-negative": (spec(shape=[-1, -2]), [F8]),
    "shape-a-map": (spec(shape={"a": 1}), [F8]),
    "shape-nil": (spec(shape=None), [F8]),
    "name-a-list": (spec(name=[1]), [F8]),
    "version-a-string": ({"version": "x"}, [F8]),
    "version-nil": ({"version": None}, [F8]),
    "stages-runs-inf": ({"stages": {"m": {"runs": float("inf")}}}, [F8]),
    "stages-runs-nan": ({"stages": {"m": {"runs": float("nan")}}}, [F8]),
    "bytes-shape-2^40": (spec(datatype="BYTES", shape=[1 << 40]), [b"\0\0\0\0"]),
    "fp32-shape-huge": (spec(shape=[1 << 62, 1 << 62]), [F8]),
    "datatype-unknown": (spec(datatype="FP8"), [F8]),
    "timing-a-list": ({"timing": [1, 2]}, [F8]),
}
ERRORS: dict[str, dict[str, Any]] = {
    "details-a-list": {"code": "NOT_FOUND", "message": "m", "details": [1]},
    "details-a-string": {"code": "NOT_FOUND", "message": "m", "details": "ab"},
    "details-an-int": {"code": "NOT_FOUND", "message": "m", "details": 5},
    "permission-denied-details-a-list": {"code": "PERMISSION_DENIED", "message": "m", "details": [1]},
}


# -- the shared decoding, alone -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_reply_is_internal(name: str) -> None:
    fields, data = MALFORMED[name]
    with pytest.raises(Internal):
        result_from_reply(header(1, **fields), [b"h", *data], 1.0)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_an_error_with_malformed_details_keeps_its_code(name: str) -> None:
    error = error_from_wire(ERRORS[name])
    assert error.code == ERRORS[name]["code"] and error.details == {}
    assert not lease_expired({"v": 1, "id": 1, "error": ERRORS[name]})


ANY_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
                         lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
SPEC_VALUE = st.fixed_dictionaries({}, optional={"name": ANY_VALUE | st.just("y"), "datatype": ANY_VALUE | st.sampled_from(["FP32", "BYTES", "INT64"]),
                                                 "shape": ANY_VALUE | st.lists(st.integers(-(1 << 62), 1 << 62), max_size=3)})
HEADER = st.fixed_dictionaries({"v": st.just(1), "id": st.just(1)}, optional={
    "outputs": ANY_VALUE | st.lists(SPEC_VALUE | ANY_VALUE, max_size=3), "timing": ANY_VALUE, "stages": ANY_VALUE, "version": ANY_VALUE,
    "model": ANY_VALUE, "batch_size": ANY_VALUE, "cache": ANY_VALUE, "error": ANY_VALUE})


@settings(max_examples=400, deadline=None)
@given(HEADER, st.lists(st.binary(max_size=64), max_size=4))
def test_any_reply_is_a_result_or_an_openinfer_error(fields: dict[str, Any], data: list[bytes]) -> None:
    try:
        result_from_reply(fields, [b"h", *data], 1.0)
    except OpenInferError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "version", "lease", "expires_in_ms", "workers", "limits"]), ANY_VALUE))
def test_any_lease_result_is_a_lease_or_no_direct_path(result: dict[str, Any]) -> None:
    try:
        parse_lease(result, 0)
    except NoDirectPath:
        pass


def test_a_lease_token_must_be_bytes_not_a_count_of_them() -> None:
    """`bytes(2**31)` made 2 GiB of zeros out of a fake daemon's integer token."""
    result = {"model": "m", "version": 1, "lease": 1 << 31, "expires_in_ms": 1000, "workers": [{"address": "ipc:///x"}], "limits": {"max_request_bytes": 1}}
    with pytest.raises(NoDirectPath, match="lease token is not bytes"):
        parse_lease(result, 0)
    assert parse_lease({**result, "lease": b"t" * 100}, 0).token == b"t" * 100


def test_a_bytes_shape_its_payload_cannot_hold_is_refused_before_any_allocation() -> None:
    """2*10**8 elements declared over a 4-byte payload: refused having allocated nothing near 8 bytes
    each (1.5 GB before)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="cannot hold 200000000 elements"):
            decode_bytes_elements(b"\0\0\0\0", 2 * 10**8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated"


def test_the_client_ignores_a_timing_it_cannot_read_when_choosing_a_worker() -> None:
    core = ClientCore("ipc:///nowhere", 1.0, None, 0, True, False)
    for timing in ({"queue_us": "x"}, {"queue_us": [1]}, [1, 2], None):
        core.answered("ipc:///w", {"timing": timing})


# -- through a fake daemon (the front door), both clients ------------------------------------------------
def _sync(address: str) -> str:
    with Client(address, timeout=5.0, direct=False) as client:
        try:
            client.infer("m", {"x": np.zeros(2, np.float32)})
            return "OK"
        except OpenInferError as exc:
            return exc.code
        except Exception as exc:
            return f"raw {type(exc).__name__}: {exc}"


def _async(address: str) -> str:
    async def ask() -> str:
        async with AsyncClient(address, timeout=5.0, direct=False) as client:
            try:
                await client.infer("m", {"x": np.zeros(2, np.float32)})
                return "OK"
            except OpenInferError as exc:
                return exc.code
            except Exception as exc:
                return f"raw {type(exc).__name__}: {exc}"

    return asyncio.run(ask())


def answering(make: Callable[[int], list[bytes]]) -> Callable[[dict[str, Any]], list[bytes]]:
    return lambda request: make(request["id"])


@pytest.mark.parametrize("name", sorted(MALFORMED) + sorted(ERRORS))
def test_both_clients_answer_a_fake_daemons_malformed_reply_typed(fake_daemon: Any, name: str) -> None:
    if name in MALFORMED:
        fields, data = MALFORMED[name]
        address = fake_daemon(answering(lambda rid: [msgpack.packb(header(rid, **fields)), *data]))
        expected = "INTERNAL"
    else:
        address = fake_daemon(answering(lambda rid: [msgpack.packb({"v": 1, "id": rid, "error": ERRORS[name]})]))
        expected = ERRORS[name]["code"]
    assert (_sync(address), _async(address)) == (expected, expected)


def test_the_cli_prints_a_fake_daemons_error_with_malformed_details_without_a_traceback(fake_daemon: Any) -> None:
    address = fake_daemon(answering(lambda rid: [msgpack.packb({"v": 1, "id": rid, "error": ERRORS["details-a-list"]})]))
    done = run_cli("status", "--socket", address)
    assert done.returncode == 1 and b"Traceback" not in done.stderr and done.stderr.startswith(b"error: "), done.stderr.decode()


def padded_header(request_id: int, count: int) -> bytes:
    """A reply header that is valid msgpack: header(request_id)'s fields and a `pad` of `count` empty
    maps (1 byte each, ~70 once decoded)."""
    fields = header(request_id)
    body = b"".join(msgpack.packb(key) + msgpack.packb(value) for key, value in fields.items())
    return bytes((0x80 | (len(fields) + 1),)) + body + msgpack.packb("pad") + b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count


def test_a_fake_daemons_huge_reply_header_is_refused_undecoded(fake_daemon: Any) -> None:
    count = MAX_REPLY_HEADER_BYTES + (1 << 20)  # 9 MiB of empty maps: ~650 MB decoded
    address = fake_daemon(answering(lambda rid: [padded_header(rid, count), F8]))
    outcome = attacked_client(address, "x", model="m", path="door")
    assert outcome["code"] == "RESOURCE_EXHAUSTED" and f"over this client's limit of {MAX_REPLY_HEADER_BYTES}" in outcome["message"], outcome
    assert outcome["grown"] < 96 << 20, f"the client's peak memory grew by {outcome['grown'] >> 20} MiB"


# -- from a worker taken over by its steps module (the direct path) ---------------------------------------
STEPS = '''
import gc
import msgpack
import numpy as np
from openinfer.daemon.steps.contract import Answer

INPUTS = [{"name": "what", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "got", "datatype": "BYTES", "shape": []}]
GOT = {"name": "got", "datatype": "BYTES", "shape": []}


def frame(data, more):
    flags = (1 if more else 0) | (2 if len(data) > 255 else 0)
    return bytes((flags,)) + (len(data).to_bytes(8, "big") if len(data) > 255 else bytes((len(data),))) + data


def pre(inputs):
    what = inputs["what"].item().decode()
    if what == "fine":
        return {"x": np.ones((1, 64), np.float32)}
    for conn in [o for o in gc.get_objects() if type(o).__name__ == "DirectConnection" and not o.closed]:
        for request_id in conn.open_ids:
            if what.startswith("pad:"):  # a header padded with N empty maps
                count = int(what[4:])
                fields = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in {"v": 1, "id": request_id, "outputs": [GOT]}.items())
                head = b"\\x84" + fields + msgpack.packb("pad") + b"\\xdd" + count.to_bytes(4, "big") + b"\\x80" * count
            elif what == "undecodable":  # an int map key (msgpack's strict_map_key refuses it)
                head = msgpack.packb({1: 2})
            elif what == "id-a-list":  # a reply naming no request, before the real one (which this request still gets)
                head = msgpack.packb({"v": 1, "id": [request_id], "outputs": [GOT]})
            else:  # a header with one output spec of the attacker's
                head = msgpack.packb({"v": 1, "id": request_id, "outputs": [msgpack.unpackb(bytes.fromhex(what))]})
            sock = conn.stream.sock
            sock.setblocking(True)  # (the client reads as it comes: all of it is written, whatever its size)
            try:
                sock.sendall(frame(head, True) + frame(b"\\x00\\x00\\x00\\x00", False))
            finally:
                sock.setblocking(False)
    return Answer(got=b"sent")


def post(outputs):
    return {"got": b"ran"}
'''


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    with hostile_steps_daemon("oi-hostile-shapes-repo-", 'workers = 1\n\n[steps]\nmodule = "steps.py"\n', lambda root: STEPS) as running:
        yield running


def test_a_workers_huge_reply_header_is_skipped_undecoded(daemon: RunningDaemon) -> None:
    """1.25 MiB of empty maps in a reply header (under the 16 MiB bound this was, 15 MiB took the client
    to 1.1 GiB; this one ~90 MB): over 1 MiB, skipped as it arrives, never decoded. It names no request
    the client can read, so the request takes the reply that follows (here the worker's real one; from a
    worker that sends none, it ends at its timeout)."""
    count = MAX_INFER_REPLY_HEADER_BYTES + (256 << 10)
    outcome = attacked_client(daemon.address, f"pad:{count}")
    assert outcome["code"] == "OK", outcome
    assert outcome["grown"] < 32 << 20, f"the client's peak memory grew by {outcome['grown'] >> 20} MiB"


@pytest.mark.parametrize("output", [{"name": "got", "datatype": "BYTES", "shape": [2 * 10**8]}, {"name": [1], "datatype": "BYTES", "shape": []},
                                    {"name": "got", "datatype": "BYTES", "shape": "ab"}], ids=["bytes-2e8", "name-a-list", "shape-a-string"])
def test_a_workers_malformed_reply_is_internal_at_bounded_cost(daemon: RunningDaemon, output: dict[str, Any]) -> None:
    outcome = attacked_client(daemon.address, msgpack.packb(output).hex())
    assert outcome["code"] == "INTERNAL", outcome
    assert outcome["grown"] < 48 << 20, f"the client's peak memory grew by {outcome['grown'] >> 20} MiB"


def test_a_reply_naming_no_request_is_dropped_and_the_real_one_answers(daemon: RunningDaemon) -> None:
    """`id: [1]` (unhashable) made the sync client's lookup raise TypeError out of `infer`."""
    outcome = attacked_client(daemon.address, "id-a-list")
    assert outcome["code"] == "OK", outcome


def test_a_reply_header_that_does_not_decode_fails_its_request_at_once(daemon: RunningDaemon) -> None:
    """It names no request, and was dropped: the request waited its whole timeout (10 s here) and ended
    DEADLINE_EXCEEDED. Now the connection is cut and what waits on it fails INTERNAL, saying why."""
    outcome = attacked_client(daemon.address, "undecodable")
    assert outcome["code"] == "INTERNAL" and "sent a reply header that is not a protocol map" in outcome["message"], outcome
