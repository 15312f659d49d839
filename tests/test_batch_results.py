"""What a worker says about a batch that failed, checked where it reaches the supervisor
(openinfer.daemon.workerpool.worker_inbound.parse_batch): it may name the members whose own inputs
failed it, each with its error (they are answered with it, the rest batch again), and nothing else."""
from __future__ import annotations

import time
from typing import Any

import pytest

from openinfer.daemon.workerpool.worker_inbound import BadWorkerMessage, parse_batch
from openinfer.wire.protocol import pack

pytestmark = pytest.mark.unit

NOT_UTF8 = {"code": "INVALID_ARGUMENT", "message": "UnicodeDecodeError: ..."}


def _failed(bad: Any) -> list[bytes]:
    now = time.monotonic_ns()
    meta = {"tasks": [7, 8, 9], "error": NOT_UTF8, "recv_ns": now, "cpu_us": 0.0, "send_ns": now}
    if bad is not None:
        meta["bad"] = bad
    return [b"S", pack(meta)]


def test_a_failed_batch_may_name_the_members_whose_inputs_failed_it() -> None:
    result = parse_batch(_failed([[0, NOT_UTF8], [2, {"code": "INVALID_ARGUMENT", "message": "x"}]]), [7, 8, 9], [1, 1, 1], ["y"], time.monotonic_ns())
    assert result.failed and result.bad_members == {0: NOT_UTF8, 2: {"code": "INVALID_ARGUMENT", "message": "x"}}
    assert parse_batch(_failed(None), [7, 8, 9], [1, 1, 1], ["y"], time.monotonic_ns()).bad_members is None


@pytest.mark.parametrize("bad", [[[3, NOT_UTF8]], [[-1, NOT_UTF8]], [[True, NOT_UTF8]], [["1", NOT_UTF8]], [[1, NOT_UTF8], [1, NOT_UTF8]], [], [[0, NOT_UTF8]] * 4, {"0": NOT_UTF8}, [[0]]],
                         ids=["past-the-end", "negative", "a-bool", "a-string", "twice", "none", "more-than-the-batch", "a-map", "no-error"])
def test_members_the_batch_does_not_have_are_a_bad_worker_message(bad: Any) -> None:
    """A worker that names a member it was not given, or one twice, is retired, like any other lie in RESULTS."""
    with pytest.raises(BadWorkerMessage, match="bad members|names a member"):
        parse_batch(_failed(bad), [7, 8, 9], [1, 1, 1], ["y"], time.monotonic_ns())
