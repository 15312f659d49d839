"""A batch's outputs cut into its members' rows (daemon/worker/compute.py RowCutter): whatever path a
value takes (byte ranges of one buffer, or encode_array member by member), each member's datatype,
shape and bytes are exactly what encode_array gives for its rows alone - also when a model's output
does not keep the batch dimension, so a reply's shape always matches its bytes."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from openinfer.daemon.worker.compute import RowCutter, join_parts, member_outputs, member_part
from openinfer.wire.tensors import BF16Array, encode_array

pytestmark = pytest.mark.unit

ROWS = [1, 3, 2]  # three members of a batch of 6

rng = np.random.default_rng(5)
VALUES: dict[str, Any] = {
    "fp32": rng.standard_normal((6, 4)).astype(np.float32),
    "int64_3d": rng.integers(-9, 9, (6, 2, 3)).astype(np.int64),
    "bool": rng.integers(0, 2, (6, 5)).astype(bool),
    "vector": rng.standard_normal(6).astype(np.float64),  # one value per row
    "big_endian": rng.standard_normal((6, 3)).astype(">f4"),  # converted, as encode_array does
    "not_contiguous": rng.standard_normal((4, 6)).astype(np.float32).T,
    "bytes": np.array([f"row {i}".encode() * i for i in range(6)], dtype=object),
    "bf16": BF16Array(rng.integers(0, 1 << 16, (6, 2)).astype(np.uint16)),
    "zero_width": np.zeros((6, 0), np.float32),
    "not_batch_major": rng.standard_normal((2, 3)).astype(np.float32),  # a model that drops the batch dimension
}
TOTAL = sum(ROWS)


def _alone(value: Any, start: int, rows: int) -> tuple[str, list[int], bytes]:
    part = value[start : start + rows]
    datatype, shape, payload = encode_array(part if isinstance(part, BF16Array) else np.ascontiguousarray(part))
    return datatype, shape, bytes(payload)


@pytest.mark.parametrize("name", sorted(VALUES))
def test_each_member_gets_what_encoding_its_rows_alone_gives(name: str) -> None:
    value = VALUES[name]
    cutters = [RowCutter.of(value, TOTAL)]
    start = 0
    for rows in ROWS:
        specs, payloads = member_outputs(["out"], cutters, start, rows)
        datatype, shape, payload = _alone(value, start, rows)
        assert specs == [{"name": "out", "datatype": datatype, "shape": shape}]
        assert bytes(payloads[0]) == payload
        start += rows


def test_the_fast_path_is_taken_for_what_onnxruntime_returns_and_only_for_it() -> None:
    """Little-endian C-contiguous numeric arrays are cut by byte range; the rest takes encode_array."""
    assert RowCutter.of(VALUES["fp32"], TOTAL).flat is not None
    assert RowCutter.of(VALUES["int64_3d"], TOTAL).row_bytes == 2 * 3 * 8
    for name in ("big_endian", "not_contiguous", "bytes", "bf16", "zero_width", "not_batch_major"):
        assert RowCutter.of(VALUES[name], TOTAL).flat is None, name


def test_an_output_with_no_batch_dimension_is_refused_so_the_members_run_alone() -> None:
    """A model declared [-1] that returns a scalar: nothing to cut rows from (ValueError, which the
    batch path answers by running each member alone), never an IndexError outside the batch's guard."""
    with pytest.raises(ValueError):
        RowCutter.of(np.float32(3.0), TOTAL)
    with pytest.raises(ValueError):
        RowCutter.of(np.array(3.0, np.float32), TOTAL)


def test_a_member_whose_frame_does_not_hold_its_rows_is_refused_before_the_join() -> None:
    """Joined, a frame with more or fewer bytes than its rows would shift every later member's rows."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    joined = join_parts("FP32", [4], [(rows, member_part("FP32", [4], rows, frame)) for rows, frame in [(1, x[:1].tobytes()), (2, x[1:].tobytes())]])
    np.testing.assert_array_equal(joined, x)
    with pytest.raises(ValueError):
        [member_part("FP32", [4], rows, frame) for rows, frame in [(2, x[:1].tobytes()), (1, x[1:].tobytes())]]  # same total, wrong split
