"""The client's choices on the direct path (openinfer.client.core), in process: which worker of a lease
gets the next request when some cannot take it."""
from __future__ import annotations

import gc
import socket
import warnings
from pathlib import Path

import pytest

from openinfer.client.core import ClientCore
from openinfer.client.direct import Lease, connect
from openinfer.wire.errors import Unavailable

pytestmark = pytest.mark.unit

WORKERS = ["ipc:///run/openinfer.sock.d/w1.sock", "ipc:///run/openinfer.sock.d/w2.sock"]


def lease() -> Lease:
    return Lease("tiny", 1, b"token", 1 << 62, list(WORKERS), 1 << 20)


def test_a_worker_that_could_not_be_connected_to_is_left_out_of_the_lease_that_named_it() -> None:
    """A lease taken before the daemon noticed a worker die still names it: after one failed connect the
    request goes to the lease's other worker (found when the C client, which did not, fell back to the
    front door under load), and with none left to the front door (None)."""
    core = ClientCore(WORKERS[0].replace("sock.d/w1.sock", "sock"), 5.0, None, 0, True, False)
    taken = lease()
    core.leases[("tiny", None)] = taken
    core.unreachable(WORKERS[0])
    assert ("tiny", None) not in core.leases  # the next request takes a new lease
    assert {core.pick_address(taken) for _ in range(8)} == {WORKERS[1]}
    core.unreachable(WORKERS[1])
    assert core.pick_address(taken) is None
    assert core.pick_address(Lease("tiny", 1, b"token", 1 << 62, ["ipc:///run/openinfer.sock.d/w3.sock"], 1 << 20)) is not None


def test_a_worker_that_does_not_finish_the_handshake_in_time_leaves_no_socket_open(tmp_path: Path) -> None:
    """connect() gives up when the budget ends before the worker's greeting (a timeout of a millisecond
    did, under load): its socket is closed then, not left to the garbage collector (a ResourceWarning
    in test_clients' late-reply test)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "silent.sock"))
    listener.listen(1)  # accepts (in the kernel's backlog) and never speaks ZMTP
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            with pytest.raises(Unavailable, match="no handshake"):
                connect(f"ipc://{tmp_path / 'silent.sock'}", 0.05)
            gc.collect()  # an unclosed socket would warn here, as an error
    finally:
        listener.close()


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e300, 1e12, 0.0, -1.0])
def test_a_timeout_that_is_not_a_usable_number_of_seconds_is_the_callers_mistake(timeout: float) -> None:
    """NaN, infinite, negative, zero or beyond the protocol's 2**31 - 1 ms: INVALID_ARGUMENT, said before
    anything is sent (they raised a raw ValueError or OverflowError, or sent a 1 ms request - session 10's
    third attacker), for the client's default and for one request's alike."""
    import numpy as np

    from openinfer.wire.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="timeout must be a number of seconds"):
        ClientCore(WORKERS[0], timeout, None, 0, True, False)
    core = ClientCore(WORKERS[0], 30.0, None, 0, True, False)
    with pytest.raises(InvalidArgument, match="timeout must be a number of seconds"):
        core.infer_frames(1, "tiny", {"x": np.zeros((1, 64), np.float32)}, None, None, timeout, None)
