"""daemon/scheduling/reply_headers.py packs a batch member's reply header from pieces: the bytes must decode to
exactly the map msgpack.packb would have written for the same reply (what clients in any language read)."""
from __future__ import annotations

from typing import Any

import msgpack
import pytest

from openinfer.daemon.observability.accounting import MEMBER_STAGES
from openinfer.daemon.scheduling.reply_headers import BatchReplyHeaders

pytestmark = pytest.mark.unit

SHARED = {"dispatch_us": 121.5, "prep_us": 20.25, "compute_us": 40.0, "encode_us": 5.5, "return_us": 80.125, "cpu_us": 12.0}


def expected(name: str, version: int, size: int, request_id: int, specs: list[dict[str, Any]], rows: int, own: tuple[float, ...]) -> dict[str, Any]:
    timing = {**dict(zip(MEMBER_STAGES, own)), **SHARED}
    outputs = [{"name": s["name"], "datatype": s["datatype"], "shape": [rows, *s["shape"][1:]]} for s in specs]
    return {"v": 1, "id": request_id, "model": name, "version": version, "outputs": outputs, "timing": timing, "batch_size": size}


@pytest.mark.parametrize(
    "specs",
    [
        [{"name": "y", "datatype": "FP32", "shape": [48, 64]}],
        [{"name": "sum_plus_ids", "datatype": "FP32", "shape": [300]}, {"name": "ids_doubled", "datatype": "INT32", "shape": [300]}],
        [{"name": "x" * 40, "datatype": "UINT8", "shape": [70000, 3, 224, 224, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]}],  # long name, rank 17
        [{"name": f"o{i}", "datatype": "INT64", "shape": [2, i]} for i in range(17)],  # 17 outputs: array16 header
    ],
)
def test_packed_header_decodes_to_the_reply_map(specs: list[dict[str, Any]]) -> None:
    headers = BatchReplyHeaders("tiny-ü", 3, 16, specs, SHARED)
    for request_id, rows in ((0, 0), (1, 1), (2**64 - 1, 127), (70000, 65536)):
        own = (1.5, 400.0, 0.0, 1234.567)
        raw = headers.render(request_id, rows, own)
        assert msgpack.unpackb(raw) == expected("tiny-ü", 3, 16, request_id, specs, rows, own)
        assert list(msgpack.unpackb(raw)["timing"]) == [*MEMBER_STAGES, *SHARED]  # each key once


def test_large_batch_and_version_numbers() -> None:
    specs = [{"name": "y", "datatype": "FP32", "shape": [5, 4]}]
    headers = BatchReplyHeaders("m", 2**40, 1 << 17, specs, SHARED)
    raw = headers.render(7, 5, (0.1, 0.2, 0.3, 0.4))
    assert msgpack.unpackb(raw) == expected("m", 2**40, 1 << 17, 7, specs, 5, (0.1, 0.2, 0.3, 0.4))


def test_cached_pieces_never_carry_one_batch_timing_into_the_next() -> None:
    """The name/spec pieces are cached per (model, version, size, outputs); the timing is each batch's
    own, whether the worker reported floats or integers."""
    specs = [{"name": "y", "datatype": "FP32", "shape": [16, 4]}]
    first = BatchReplyHeaders("m", 1, 16, specs, SHARED)
    other = {**SHARED, "compute_us": 7, "cpu_us": 0.0}  # an int from the worker is packed as an int
    second = BatchReplyHeaders("m", 1, 16, specs, other)
    own = (1.0, 2.0, 0.0, 3.0)
    assert msgpack.unpackb(first.render(1, 1, own))["timing"] == {**dict(zip(MEMBER_STAGES, own)), **SHARED}
    decoded = msgpack.unpackb(second.render(2, 1, own))
    assert decoded["timing"] == {**dict(zip(MEMBER_STAGES, own)), **other}
    assert type(decoded["timing"]["compute_us"]) is int
    renamed = BatchReplyHeaders("m", 2, 16, [{"name": "z", "datatype": "INT8", "shape": [16, 5]}], SHARED)
    assert msgpack.unpackb(renamed.render(3, 1, own))["outputs"] == [{"name": "z", "datatype": "INT8", "shape": [1, 5]}]
    assert msgpack.unpackb(renamed.render(3, 1, own))["version"] == 2
