"""A worker taken over attacks its clients: on the direct path a client reads the worker's bytes itself,
so what a worker declares must be bounded where it arrives, in the client library.

The worker is the real one, sandboxed; it is taken over by its model's steps module (Python in the
worker's interpreter, like the `fake-page` step of test_hostile_steps.py). On request, the step writes a
reply of its own on the client's connection: a header naming the request, then the head of a frame that
says `declared` bytes follow, and 16 of them. The client runs in a process of its own, so that its peak
memory is its own. Before the fix, 18 bytes of framing made the client commit the whole declared size
(700 MB here), and a declared 512 GiB escaped `infer` as a raw MemoryError.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from daemon_harness import RunningDaemon
from openinfer.client import Client
from peak_memory import run_with_peak
from reference import run_reference
from steps_daemon import hostile_steps_daemon
from test_c_client import c_example  # noqa: F401  (a fixture: builds client/c)

pytestmark = pytest.mark.attack

STEPS = '''
import gc
import msgpack
import numpy as np
from openinfer.daemon.steps.contract import Answer

INPUTS = [{"name": "what", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "got", "datatype": "BYTES", "shape": []}]


def pre(inputs):
    what = inputs["what"].item().decode()
    if what == "fine":
        return {"x": np.ones((1, 64), np.float32)}
    for conn in [o for o in gc.get_objects() if type(o).__name__ == "DirectConnection"]:
        for request_id in conn.open_ids:
            header = msgpack.packb({"v": 1, "id": request_id, "outputs": [{"name": "got", "datatype": "BYTES", "shape": []}]})
            if what.startswith("chain:"):  # then empty frames, each flagged MORE: a message without end
                conn.stream.sock.sendall(bytes((1, len(header))) + header + b"\\x01\\x00" * int(what[6:]))
            else:  # then the head of a frame of `what` bytes, and 16 of them
                conn.stream.sock.sendmsg([bytes((1, len(header))), header, bytes((2,)), int(what).to_bytes(8, "big"), bytes(16)])
    return Answer(got=b"sent")


def post(outputs):
    return {"got": b"ran"}
'''

# The client, alone in its process: a first request opens the link, then the attack's request. What it
# raised, and how much its peak memory grew meanwhile.
CLIENT = '''
import json, resource, sys
from openinfer.client import Client, OpenInferError

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

with Client(sys.argv[1], timeout=float(sys.argv[3])) as client:
    assert client.infer("hostile", {"what": "fine"}).outputs["got"].item() == b"ran"
    before = peak()
    try:
        client.infer("hostile", {"what": sys.argv[2]})
        outcome = {"code": None, "message": "a result"}
    except OpenInferError as exc:
        outcome = {"code": exc.code, "message": exc.message}
    except BaseException as exc:
        outcome = {"code": "raw " + type(exc).__name__, "message": str(exc)}
    outcome["grown"] = peak() - before
    try:  # and the client's next request (on a new link)
        outcome["next"] = client.infer("hostile", {"what": "fine"}, timeout=5).outputs["got"].item().decode()
    except OpenInferError as exc:
        outcome["next"] = exc.code
print(json.dumps(outcome))
'''


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    with hostile_steps_daemon("oi-hostile-replies-repo-", 'workers = 1\n\n[steps]\nmodule = "steps.py"\n', lambda root: STEPS) as running:
        yield running


def _attacked_client(daemon: RunningDaemon, what: str, timeout: float) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CLIENT, daemon.address, what, str(timeout)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _serves_on(daemon: RunningDaemon) -> None:
    repo: Path = daemon.repo  # type: ignore[attr-defined]
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    with Client(daemon.address) as client:
        np.testing.assert_allclose(client.infer("canary", {"x": x}).outputs["y"], run_reference(repo / "canary" / "1" / "model.onnx", {"x": x})["y"], rtol=1e-5)
        assert client.infer("hostile", {"what": "fine"}).outputs["got"].item() == b"ran"


def test_a_reply_declared_over_the_leases_limit_is_refused_at_once_and_typed(daemon: RunningDaemon) -> None:
    """512 GiB declared, past the lease's max_reply_bytes (1 GiB by default): the request fails at once
    with RESOURCE_EXHAUSTED naming the limit, and the rest of that frame is skipped as it arrives."""
    outcome = _attacked_client(daemon, str(512 << 30), 10.0)
    assert outcome["code"] == "RESOURCE_EXHAUSTED", outcome
    assert "max_reply_bytes" in outcome["message"] and "over this client's limit" in outcome["message"], outcome
    assert outcome["grown"] < 64 << 20, outcome
    assert outcome["next"] == "ran", "the next request went to the link whose frame was still being skipped"
    _serves_on(daemon)


def test_a_reply_of_endless_empty_frames_is_refused_at_once(daemon: RunningDaemon) -> None:
    """A header, then 100,000 empty frames each flagged MORE: over the 65,536 frames a reply may have, the
    request fails at once and the next one goes to a new link. (The Python clients bounded the frames
    before this change too; the C client's counterpart below did not.)"""
    outcome = _attacked_client(daemon, "chain:100000", 10.0)
    assert outcome["code"] == "RESOURCE_EXHAUSTED" and "frames" in outcome["message"], outcome
    assert outcome["next"] == "ran", outcome
    _serves_on(daemon)


def test_a_reply_declared_and_never_sent_costs_the_client_no_memory(daemon: RunningDaemon) -> None:
    """700 MB declared, under the limit, and never sent: the client commits memory as bytes arrive, not
    as they are announced, and the request ends at its timeout, typed."""
    outcome = _attacked_client(daemon, str(700 << 20), 0.5)
    assert outcome["code"] == "DEADLINE_EXCEEDED", outcome
    assert outcome["grown"] < 64 << 20, f"the client's peak memory grew by {outcome['grown'] >> 20} MiB"
    _serves_on(daemon)


@pytest.mark.parametrize("attack, answer", [(str(512 << 30), "RESOURCE_EXHAUSTED"), (str(700 << 20), "DEADLINE_EXCEEDED"), ("chain:100000", "RESOURCE_EXHAUSTED")],
                         ids=["over-the-limit", "never-sent", "endless-frames"])
def test_the_c_client_bounds_what_a_worker_declares(daemon: RunningDaemon, c_example: Path, tmp_path: Path, attack: str, answer: str) -> None:
    """The same attacks on client/c: over the lease's max_reply_bytes, or over 65,536 frames, the request
    fails RESOURCE_EXHAUSTED (over the size it failed WORKER_CRASHED, "the worker ... exited", when the
    allocation failed; over the frames it grew without bound and waited past its timeout while the frames
    kept coming), and a declared frame costs the C client nothing until its bytes arrive."""
    what = tmp_path / "what"
    what.write_text(attack)
    outcome = run_with_peak([str(c_example), "--timeout", "500", "verdict", daemon.address, "hostile", str(what), "what"])
    assert outcome["stdout"].startswith(f"error {answer}"), outcome
    if attack.isdigit() and answer == "RESOURCE_EXHAUSTED":
        assert "over this client's limit of 1073741824 bytes" in outcome["stdout"], outcome
    assert outcome["peak"] < 64 << 20, f"the C client's peak memory was {outcome['peak'] >> 20} MiB"
    _serves_on(daemon)


def test_the_c_clients_own_max_reply_bytes_bounds_the_direct_path(daemon: RunningDaemon, c_example: Path, tmp_path: Path) -> None:
    """oi_set_max_reply_bytes below the lease's bound: a worker's reply declared at 2 MiB is refused at
    once against the client's 1 MiB (before, the C client had no bound of its own: only the lease's)."""
    what = tmp_path / "what"
    what.write_text(str(2 << 20))
    outcome = run_with_peak([str(c_example), "--timeout", "5000", "--max-reply-bytes", str(1 << 20), "verdict", daemon.address, "hostile", str(what), "what"])
    assert outcome["stdout"].startswith("error RESOURCE_EXHAUSTED"), outcome
    assert "over this client's limit of 1048576 bytes" in outcome["stdout"], outcome
    _serves_on(daemon)
