"""A batch never hands one client's rows to another. A request's rows are dimension 0 of its inputs; a
model with two inputs may take them with different dimension 0 (two free symbolic dimensions, or one
input broadcast), and such a request is valid alone. Joined into a batch by rows of its first input, its
other input's rows were cut as another member's: the attacker read the victim's input and chose the
victim's answer, on the direct path and through the front door alike. A request is now batched only when
every input has the same dimension 0 (validation.check_infer), and a worker refuses to join a member
whose frame does not hold exactly its rows (compute.member_part): both tests fail without the first.

The same for BYTES inputs, whose elements have no fixed size: a frame holding fewer or more elements
than its shape says was admitted unchecked, and the front door joined a small batch's BYTES frames, so
the worker read the join by the batch's total count and every element after the short frame shifted into
the next request. Such a frame is now refused at admission (INVALID_ARGUMENT), and a batch with a BYTES
input leaves the supervisor member by member."""
from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import onnx_builders
from daemon_harness import world_readable_dir
from openinfer.client import AsyncClient, InvalidArgument
from reference import run_reference
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack


BATCHING = "workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 300000\nquiet_us = 0\n"  # requests sent together leave as one batch


def _repo(name: str, build: Any) -> Path:
    root = world_readable_dir("oi-batch-rows-")
    build(root / name / "1" / "model.onnx")
    (root / name / "config.toml").write_text(BATCHING)
    make_world_readable(root)
    return root


async def _together(address: str, direct: bool, model: str, feeds: list[dict[str, np.ndarray]], errors: bool = False) -> list[Any]:
    """Each feed from its own client (connection), sent at once; every client has taken its lease and
    connected first, so the requests reach the worker within the batching window. `errors`: a request's
    error is its result, not raised."""
    clients = [AsyncClient(address, timeout=30, direct=direct, client_name=f"client{i}") for i in range(len(feeds))]
    try:
        for client, feed in zip(clients, feeds):
            await client.infer(model, {name: value[:1] if len(value) else np.zeros((1, *value.shape[1:]), value.dtype) for name, value in feed.items()})
        return list(await asyncio.gather(*(client.infer(model, feed) for client, feed in zip(clients, feeds)), return_exceptions=errors))
    finally:
        for client in clients:
            await client.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_a_member_never_gets_another_members_rows(daemon_factory: Any, direct: bool) -> None:
    """x and y with unrelated dimension 0: A sends x[2, 4] + y[1, 4], B x[1, 4] + y[2, 4] (B's y is the
    secret). Joined by x's rows, A was cut one of B's y rows. Each must get what running it alone gives."""
    root = _repo("two", onnx_builders.two_free_rows_model)
    try:
        daemon = daemon_factory(root)
        model = root / "two" / "1" / "model.onnx"
        control = asyncio.run(_together(daemon.address, direct, "two", [{"x": np.ones((1, 4), np.float32), "y": np.ones((1, 4), np.float32)}] * 2))
        assert [r.batch_size for r in control] == [2, 2]  # the window batches requests whose inputs agree
        feed_a = {"x": np.ones((2, 4), np.float32), "y": np.full((1, 4), 1.0, np.float32)}
        feed_b = {"x": np.full((1, 4), 5.0, np.float32), "y": np.full((2, 4), 7777.0, np.float32)}
        got_a, got_b = asyncio.run(_together(daemon.address, direct, "two", [feed_a, feed_b]))
        assert not np.any(got_a.outputs["oy"] == -7777.0), f"A got B's rows: {got_a.outputs['oy'].tolist()}"
        for feed, got in ((feed_a, got_a), (feed_b, got_b)):
            want = run_reference(model, feed)
            for name in ("ox", "oy"):
                np.testing.assert_array_equal(got.outputs[name], want[name])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_an_attacker_cannot_read_or_set_a_well_formed_victims_rows(daemon_factory: Any, direct: bool) -> None:
    """out = x + y, both [n, 4] with one symbolic n (onnxruntime does not check that the two agree, and
    broadcasts a 1). The victim sends an ordinary x[1, 4] + y[1, 4]; the attacker brackets it with
    x[2, 4] + y[1, 4] and x[0, 4] + y[1, 4], each valid alone. Joined by x's rows (2 + 1 + 0 = the y rows'
    1 + 1 + 1) the batch ran, the attacker's first reply held the victim's y and the victim got the
    attacker's. Batch order is the order the worker reads them in, so several rounds. (Since round 79 the
    second is refused alone: x holds no elements and y a row - onnxruntime is given no tensor of no
    elements but a request of no rows at all.)"""
    root = _repo("add", onnx_builders.broadcast_add_model)
    try:
        daemon = daemon_factory(root)
        one = {"x": np.zeros((1, 4), np.float32), "y": np.zeros((1, 4), np.float32)}
        control = asyncio.run(_together(daemon.address, direct, "add", [one] * 3))
        assert [r.batch_size for r in control] == [3, 3, 3]  # the window batches requests whose inputs agree
        secret = np.array([[11.0, 22.0, 33.0, 44.0]], np.float32)
        victim = {"x": np.zeros((1, 4), np.float32), "y": secret}
        first = {"x": np.zeros((2, 4), np.float32), "y": np.zeros((1, 4), np.float32)}
        second = {"x": np.zeros((0, 4), np.float32), "y": np.full((1, 4), -1.0, np.float32)}
        for _ in range(5):
            got_first, got_victim, got_second = asyncio.run(_together(daemon.address, direct, "add", [first, victim, second], errors=True))
            assert isinstance(got_second, InvalidArgument) and "holds no elements" in str(got_second), got_second
            assert not np.any(got_first.outputs["out"] == 22.0), f"the attacker read the victim's input: {got_first.outputs['out'].tolist()}"
            np.testing.assert_array_equal(got_victim.outputs["out"], secret)  # x = 0: the victim's own y back
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _tamper(client: AsyncClient, text_frame: bytes) -> None:
    """The client's frames as usual, then its `text` frame (the first data frame) replaced: the header
    still says text[1]."""
    core = client._core
    original: Callable[..., list[Any]] = core.infer_frames

    def infer_frames(*args: Any, **kwargs: Any) -> list[Any]:
        frames = list(original(*args, **kwargs))
        frames[1] = text_frame
        return frames

    core.infer_frames = infer_frames  # type: ignore[method-assign]


async def _together_tampered(address: str, direct: bool, feeds: list[dict[str, np.ndarray]], tampered: list[bytes | None]) -> list[Any]:
    clients = [AsyncClient(address, timeout=30, direct=direct, client_name=f"client{i}") for i in range(len(feeds))]
    try:
        for client, feed in zip(clients, feeds):  # connected and leased first: the requests arrive together
            await client.infer("text", feed)
        for client, frame in zip(clients, tampered):
            if frame is not None:
                _tamper(client, frame)
        return list(await asyncio.gather(*(client.infer("text", feed) for client, feed in zip(clients, feeds)), return_exceptions=True))
    finally:
        for client in clients:
            await client.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_a_bytes_frame_that_does_not_hold_its_elements_cannot_shift_a_victims_rows(daemon_factory: Any, direct: bool) -> None:
    """text BYTES[rows] + n INT64[rows, 2]: the attacker sends text[1] holding no element before the
    victim's and text[1] holding two after it. Joined, 0 + 1 + 2 elements read as 3 rows: the attacker's
    first reply held the victim's string and the victim was answered the attacker's chosen one."""
    root = _repo("text", onnx_builders.string_rows_model)
    try:
        daemon = daemon_factory(root)

        def feed(text: bytes, n: int) -> dict[str, np.ndarray]:
            return {"text": np.array([text], dtype=object), "n": np.full((1, 2), n, np.int64)}

        secret = b"victim-secret-0001"
        feeds = [feed(b"a", 1), feed(secret, 2), feed(b"b", 3)]
        control = asyncio.run(_together_tampered(daemon.address, direct, feeds, [None, None, None]))
        assert [r.batch_size for r in control] == [3, 3, 3]  # the window batches them when nothing is forged
        want = [v if isinstance(v, bytes) else v.encode() for v in run_reference(root / "text" / "1" / "model.onnx", feeds[1])["same"].reshape(-1)]
        for _ in range(3):
            first, victim, last = asyncio.run(_together_tampered(daemon.address, direct, feeds, [_elements(), None, _elements(b"CHOSEN-BY-ATTACKER", b"b")]))
            assert not isinstance(victim, BaseException), f"the victim's well-formed request failed: {victim!r}"
            assert list(victim.outputs["same"].reshape(-1)) == want, f"the victim was answered {victim.outputs['same'].tolist()}"
            for attacker in (first, last):  # malformed: the caller's mistake, refused as such
                assert isinstance(attacker, InvalidArgument), f"a BYTES frame that does not hold its elements got {attacker!r}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
