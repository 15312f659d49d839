"""Who the books name, and how much a lie costs the supervisor: `stats` and the Prometheus metrics keep one
row per client key (an identity, under the label a request gives), at most 1,024 in all. Found by an
independent attacker (round 4), each fixed and tested here from the attacker's side:
- a local client named 1,100 labels (refused requests for a model that does not exist): every row was
  its own, and every identity after it was booked under "(other)" for the rest of the daemon's life;
- a hostile step (its model's code, in its worker) wrote ledger records naming a uid that never called
  the model (billed 28 PB and 180 M CPU-seconds) and 1,022 invented identities;
- a hostile step recorded a million requests admitted and never answered: the supervisor kept them all
  (+214 MiB) and booked them in one pass when the worker died (its loop held ~1 s).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon, wait_for
from openinfer.client import Client, OpenInferError
from openinfer.daemon.direct.ledger import MAX_ADMITTED
from openinfer.daemon.observability.accounting import LABELS_PER_IDENTITY, OTHER_CLIENTS, OTHER_LABELS
from other_uid import NOBODY, run_as
from repo_builder import ModelRepo
from steps_daemon import hostile_steps_daemon

pytestmark = pytest.mark.attack

X = {"x": np.ones((1, 64), np.float32)}
# The step writes into its worker's ledger what the request asks for: requests answered for identities
# that never leased its model ("victims"), or `n` requests admitted and never answered ("admit:n"); or
# it dies ("die": a fork, which seccomp answers with SIGSYS).
STEPS = '''
import gc
import os
import time
from openinfer.daemon.steps.contract import Answer

INPUTS = [{"name": "what", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "got", "datatype": "BYTES", "shape": []}]


def pre(inputs):
    what = inputs["what"].item().decode()
    ledger = next(o for o in gc.get_objects() if type(o).__name__ == "LedgerWriter")
    if what == "die":
        os.fork()
    elif what == "victims":
        for i in range(50):
            ledger.answered(10**9 + i, 1, "uid=4242", None, {"total_us": 9e11, "cpu_us": 9e11}, 2**26, 2**31)  # (the most a request may book; 2 GiB out, within the worker's 4 GiB)
            ledger.answered(2 * 10**9 + i, 1, f"invented{i}@uid={100000 + i}", None, {"total_us": 1.0}, 0, 0)
    elif what.startswith("admit:"):
        now = time.monotonic_ns()
        written = 0
        while written < int(what[6:]):
            if ledger.has_room(1):
                written += 1
                ledger.admitted(10**12 + written, 1, "uid=0", 0, now + 3600 * 10**9, now)
    return Answer(got=b"done")
'''


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    config = 'workers = 1\nmax_compute_ms = 60000\n\n[steps]\nmodule = "steps.py"\n'
    with hostile_steps_daemon("oi-rows-", config, lambda root: STEPS) as running:
        yield running


def _ask(client: Client, what: str) -> None:
    client.infer("hostile", {"what": np.array(what.encode(), dtype=object)})


def test_one_uid_naming_labels_without_end_takes_only_its_own_rows() -> None:
    repo = ModelRepo("oi-labels-")
    repo.model("tiny", onnx_builders.matmul_model, config="workers = 1\n")
    running = start_daemon(repo.ready(), env={"OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    try:
        flood = run_as(NOBODY, """
            import zmq
            sock = zmq.Context().socket(zmq.DEALER)
            sock.connect(sys.argv[1])
            for i in range(1100):  # refused (no such model), each under another label
                sock.send(msgpack.packb({"v": 1, "id": i, "op": "infer", "model": "nothing-here", "inputs": [], "client": f"label-{i}"}))
            print(sum(msgpack.unpackb(sock.recv())["error"]["code"] == "NOT_FOUND" for _ in range(1100)))
        """, running.address)
        assert flood.returncode == 0 and flood.stdout.strip() == "1100", flood.stderr
        with Client(running.address, client_name="billing-app", timeout=30) as client:
            client.infer("tiny", X)
            rows = client.stats()["clients"]
        assert rows.get("billing-app@uid=0", {}).get("requests") == 1, f"the honest client got no row of its own: {sorted(rows)[:5]} ... {len(rows)} rows"
        theirs = [key for key in rows if key.endswith(f"@uid={NOBODY}")]
        assert len(theirs) == LABELS_PER_IDENTITY + 1 and f"{OTHER_LABELS}@uid={NOBODY}" in theirs, len(theirs)
        assert rows[f"{OTHER_LABELS}@uid={NOBODY}"]["requests"] == 1100 - LABELS_PER_IDENTITY
    finally:
        running.stop()
        cleanup_workdir(running)
        repo.remove()


def test_a_step_books_requests_only_to_identities_that_leased_its_model(daemon: RunningDaemon) -> None:
    with Client(daemon.address, timeout=30) as client:
        _ask(client, "victims")
        wait_for(lambda: client.stats()["clients"].get(OTHER_CLIENTS, {}).get("requests", 0) >= 100, 30, "the forged records to be read", daemon=daemon)
        rows = client.stats()["clients"]
    assert "uid=4242" not in rows and not any("invented" in key for key in rows), [key for key in rows if "4242" in key or "invented" in key][:5]
    assert rows[OTHER_CLIENTS]["requests"] == 100


def test_requests_a_step_admits_without_end_cost_the_supervisor_a_bounded_count(daemon: RunningDaemon) -> None:
    with Client(daemon.address, timeout=60) as client:
        _ask(client, f"admit:{MAX_ADMITTED * 3}")
        with pytest.raises(OpenInferError):
            _ask(client, "die")
        wait_for(lambda: client.stats()["models"]["hostile"]["failures"].get("WORKER_CRASHED", 0) > 0, 30, "the dead worker's requests to be counted", daemon=daemon)
        crashed = client.stats()["models"]["hostile"]["failures"]["WORKER_CRASHED"]
    # What it kept of them (at most MAX_ADMITTED), plus the request that died with it.
    assert crashed <= MAX_ADMITTED + 1, f"{crashed} requests booked as lost for a worker that holds at most {MAX_ADMITTED}"
