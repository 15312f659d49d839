"""Property-based fuzzing of the request decoder and validators: any input yields a typed error or a
valid request, never another exception (which would be a crash path in the supervisor loop)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openinfer.wire.errors import OpenInferError
from openinfer.daemon.modelstore.modelconfig import ModelConfig
from openinfer.daemon.modelstore.models import ServedModel
from openinfer.daemon.frontdoor.validation import check_envelope, check_infer, decode_header, request_id_of

pytestmark = pytest.mark.unit

MODEL = ServedModel(name="tiny", version=1, path=Path("/dev/null"), config=ModelConfig(), worker_count=1, intra_op_threads=1)
MODEL.set_metadata([{"name": "x", "datatype": "FP32", "shape": [-1, 64]}], [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(["v", "id", "op", "model", "version", "inputs", "outputs", "timeout_ms", "client", "priority", "target", "x"])
headers = st.dictionaries(keys, values, max_size=8)
specs = st.lists(st.fixed_dictionaries({"name": st.one_of(st.just("x"), values), "datatype": st.one_of(st.sampled_from(["FP32", "INT8", "BYTES"]), values), "shape": st.one_of(st.lists(st.integers(-2, 70), max_size=3), values)}), max_size=3)


def _validate(raw: bytes, frames: list[bytes]) -> None:
    try:
        header = decode_header(raw)
        request_id_of(header)
        op = check_envelope(header, 1 + len(frames))
        if op == "infer":
            check_infer(header, frames, MODEL, 1 << 20)
    except OpenInferError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.lists(st.binary(max_size=300), max_size=3))
def test_random_bytes_never_escape_as_untyped_errors(raw: bytes, frames: list[bytes]) -> None:
    _validate(raw, frames)


@settings(max_examples=400, deadline=None)
@given(headers, st.lists(st.binary(max_size=512), max_size=3))
def test_random_headers_never_escape_as_untyped_errors(header: dict[str, Any], frames: list[bytes]) -> None:
    _validate(msgpack.packb(header), frames)


@settings(max_examples=400, deadline=None)
@given(specs, st.lists(st.binary(max_size=512), max_size=3), values, values)
def test_mutated_infer_requests_never_escape_as_untyped_errors(inputs: list[Any], frames: list[bytes], outputs: Any, version: Any) -> None:
    header = {"v": 1, "id": 1, "op": "infer", "model": "tiny", "inputs": inputs, "outputs": outputs, "version": version}
    _validate(msgpack.packb(header), frames)
