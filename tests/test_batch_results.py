"""What a worker says about a batch that failed, checked where it reaches the supervisor
(openinfer.daemon.workerpool.worker_inbound.parse_batch): it may name the one member whose own inputs
failed it (that member is answered with the error, the rest batch again), and nothing else."""
from __future__ import annotations

import time
from typing import Any

import pytest

from openinfer.daemon.workerpool.worker_inbound import BadWorkerMessage, parse_batch
from openinfer.wire.protocol import pack

pytestmark = pytest.mark.unit


def _failed(member: Any) -> list[bytes]:
    now = time.monotonic_ns()
    meta = {"tasks": [7, 8, 9], "error": {"code": "INVALID_ARGUMENT", "message": "UnicodeDecodeError: ..."}, "recv_ns": now, "cpu_us": 0.0, "send_ns": now}
    if member is not None:
        meta["member"] = member
    return [b"S", pack(meta)]


def test_a_failed_batch_may_name_the_member_whose_inputs_failed_it() -> None:
    result = parse_batch(_failed(1), [7, 8, 9], [1, 1, 1], ["y"], time.monotonic_ns())
    assert result.failed and result.bad_member == 1 and result.error == {"code": "INVALID_ARGUMENT", "message": "UnicodeDecodeError: ..."}
    assert parse_batch(_failed(None), [7, 8, 9], [1, 1, 1], ["y"], time.monotonic_ns()).bad_member is None


@pytest.mark.parametrize("member", [3, -1, True, "1", 1.0], ids=["past-the-end", "negative", "a-bool", "a-string", "a-float"])
def test_a_member_the_batch_does_not_have_is_a_bad_worker_message(member: Any) -> None:
    """A worker that names a member it was not given is retired, like any other lie in RESULTS."""
    with pytest.raises(BadWorkerMessage, match="names a member it does not have"):
        parse_batch(_failed(member), [7, 8, 9], [1, 1, 1], ["y"], time.monotonic_ns())
