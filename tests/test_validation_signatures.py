"""check_infer's fast path: a request whose `inputs` list equals one already checked for the model only
has its frames checked. It must decide exactly as the full checks do, for hostile look-alikes too (1.0
and true compare equal to 1 in Python; a frame of the wrong size; options that are checked apart)."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openinfer.wire.errors import InvalidArgument, OpenInferError
from openinfer.daemon.modelstore.modelconfig import ModelConfig
from openinfer.daemon.modelstore.models import ServedModel
from openinfer.daemon.frontdoor.validation import SIGNATURES_KEPT, OverLimit, check_infer

pytestmark = pytest.mark.unit

LIMIT = 1 << 20


def make_model() -> ServedModel:
    model = ServedModel(name="m", version=1, path=Path("/dev/null"), config=ModelConfig(), worker_count=1, intra_op_threads=1)
    model.set_metadata(
        [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}, {"name": "s", "datatype": "BYTES", "shape": [-1]}],
        [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    )
    return model


def elements(*items: bytes) -> bytes:
    """A BYTES frame: each element's u32 length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def request(rows: Any = 2, cols: Any = 4, x_bytes: int | None = None, s_frame: bytes | None = None, **extra: Any) -> tuple[dict[str, Any], list[bytes]]:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, cols]}, {"name": "s", "datatype": "BYTES", "shape": [rows]}], **extra}
    size = x_bytes if x_bytes is not None else (rows * cols * 4 if type(rows) is int and type(cols) is int else 32)
    if s_frame is None:
        s_frame = elements(*[b"anything"] * (rows if type(rows) is int else 2))
    return header, [b"\0" * size, s_frame]


def outcome(model: ServedModel, header: dict[str, Any], frames: list[bytes]) -> tuple[Any, ...]:
    try:
        nbytes, signature = check_infer(header, frames, model, LIMIT)
    except OpenInferError as exc:
        return (type(exc).__name__, exc.message)
    return ("ok", nbytes, signature.frame_bytes, signature.batch_specs, signature.rows)


def warm_model() -> ServedModel:
    model = make_model()
    for rows in (1, 2, 3):
        header, frames = request(rows)
        check_infer(header, frames, model, LIMIT)
    return model


def test_equal_inputs_reuse_the_signature() -> None:
    model = make_model()
    header, frames = request(2)
    nbytes, first = check_infer(header, frames, model, LIMIT)
    assert nbytes == 2 * 4 * 4 + 2 * (4 + len(b"anything"))
    assert first.frame_bytes == (32, None) and first.rows == 2
    assert first.batch_specs == (("x", "FP32", (4,)), ("s", "BYTES", ()))
    header, frames = request(2)
    assert check_infer(header, frames, model, LIMIT)[1] is first
    assert model.input_signatures == [first]


def test_signatures_kept_are_bounded_newest_first() -> None:
    model = make_model()
    for rows in range(1, SIGNATURES_KEPT + 3):
        header, frames = request(rows)
        check_infer(header, frames, model, LIMIT)
    assert [s.rows for s in model.input_signatures] == list(range(SIGNATURES_KEPT + 2, 2, -1))


def test_new_metadata_forgets_the_signatures() -> None:
    model = warm_model()
    model.set_metadata([{"name": "x", "datatype": "FP32", "shape": [-1, 8]}], [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}])
    header, frames = request(2)
    with pytest.raises(InvalidArgument, match="no input 's'|dimension 1 is 4"):
        check_infer(header, frames, model, LIMIT)


@pytest.mark.parametrize(
    ("header_frames", "error", "message"),
    [
        (request(2.0), InvalidArgument, "shape must be an array of non-negative integers"),
        (request(True, 4, x_bytes=16), InvalidArgument, "shape must be an array of non-negative integers"),
        (request(2, 4.0), InvalidArgument, "shape must be an array of non-negative integers"),
        (request(2, x_bytes=31), InvalidArgument, "needs 32 bytes, data frame has 31"),
        (request(2, x_bytes=LIMIT), OverLimit, "the limit for 'm'"),
        (request(2, outputs=["nope"]), InvalidArgument, "has no outputs"),
        (request(2, priority=10), InvalidArgument, "between 0"),
        (request(2, timeout_ms=0), InvalidArgument, "must be positive"),
        (request(2, version=True), InvalidArgument, "non-negative integer"),
        # A BYTES frame must hold exactly the elements its shape says (a batch reads its members' frames joined).
        (request(2, s_frame=elements(b"one")), InvalidArgument, "ends inside the length of element 1"),
        (request(2, s_frame=elements(b"one", b"two", b"three")), InvalidArgument, "trailing bytes after 2 elements"),
        (request(2, s_frame=elements(b"one") + struct.pack("<I", 99) + b"short"), InvalidArgument, "claims 99 bytes past the end"),
    ],
)
def test_look_alikes_of_a_checked_request_are_refused(header_frames: tuple[dict[str, Any], list[bytes]], error: type[Exception], message: str) -> None:
    header, frames = header_frames
    model = warm_model()
    assert model.input_signatures  # the fast path is armed for shape [2, 4]
    with pytest.raises(error, match=message):
        check_infer(header, frames, model, LIMIT)
    with pytest.raises(error, match=message):  # and exactly as a model that never saw a request says
        check_infer(header, frames, make_model(), LIMIT)


def test_a_missing_or_extra_frame_is_refused() -> None:
    model = warm_model()
    header, frames = request(2)
    with pytest.raises(InvalidArgument, match="lists 2 tensors but 1 data frames"):
        check_infer(header, frames[:1], model, LIMIT)
    with pytest.raises(InvalidArgument, match="lists 2 tensors but 3 data frames"):
        check_infer(header, [*frames, b""], model, LIMIT)


dims = st.one_of(st.integers(-1, 5), st.sampled_from([2.0, 4.0, True, False, None, "2"]))
specs = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "s", "z"]), "datatype": st.sampled_from(["FP32", "BYTES", "INT8"]), "shape": st.lists(dims, max_size=3)}
)
options = st.fixed_dictionaries({}, optional={"outputs": st.sampled_from([["y"], ["z"], [], None, "y"]), "priority": st.sampled_from([0, 9, 10, -1, 1.5]), "timeout_ms": st.sampled_from([1, 0, None, True])})


@settings(max_examples=300, deadline=None)
@given(st.lists(specs, max_size=3), st.lists(st.integers(0, 48), max_size=3), options)
def test_a_warm_model_decides_as_a_cold_one(inputs: list[dict[str, Any]], sizes: list[int], extra: dict[str, Any]) -> None:
    header = {"inputs": inputs, **extra}
    frames = [b"\0" * size for size in sizes]
    model = warm_model()
    # Also warm with this very request's list when it passes, so that the fast path is what decides.
    check_infer_passed = outcome(model, header, frames)
    assert outcome(model, header, frames) == check_infer_passed == outcome(make_model(), header, frames)
