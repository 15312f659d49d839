"""A worker's lease key opens its own model's workers and no other's.

A worker holds the key that checks leases, and a hostile model's steps run in that worker's interpreter:
they can find the key (through `gc`) and mint leases with it, for any uid, expiry and max_in_flight.
Before the fix every worker of every model held the same key, so a step minted a lease for another model
and a uid the access policy denied that model used it on that model's worker (found by an independent
attacker: the stolen answer equalled the model's real one). Now each model version has its own key,
derived from a master key the supervisor keeps, and a worker gets only its own model version's.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pytest

from daemon_harness import RunningDaemon
from direct_peer import Peer, attach, lease_of
from openinfer.client import Client
from steps_daemon import hostile_steps_daemon

pytestmark = pytest.mark.attack

# The step mints a lease with its worker's key: [uid, model, version] in, the token out.
STEPS = '''
import gc
import time
from openinfer.daemon.direct.lease import issue
from openinfer.daemon.steps.contract import Answer

INPUTS = [{"name": "what", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "got", "datatype": "BYTES", "shape": []}]


def pre(inputs):
    uid, model, version = inputs["what"].item().decode().split(":")
    door = next(o for o in gc.get_objects() if type(o).__name__ == "DirectDoor")
    token, _ = issue(door.key, "uid=" + uid, model, int(version), 3600 * 10**9, 1, 1000, 9)
    return Answer(got=token)
'''


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    with hostile_steps_daemon("oi-leasekey-", 'workers = 1\n\n[steps]\nmodule = "steps.py"\n', lambda root: STEPS) as running:
        yield running


def _minted(daemon: RunningDaemon, model: str) -> bytes:
    """A lease for this process's uid on `model` version 1, minted by the hostile step in its worker."""
    with Client(daemon.address, timeout=30) as client:
        what = np.array(f"{os.getuid()}:{model}:1".encode(), dtype=object)
        return bytes(client.infer("hostile", {"what": what}).outputs["got"].item())


def _attached(daemon: RunningDaemon, model: str, token: bytes) -> dict:
    """The answer of `model`'s worker to attaching `token`."""
    peer = Peer(lease_of(daemon, model)["workers"][0]["address"])
    try:
        header = peer.ask(attach(token))
    finally:
        peer.close()
    assert header is not None, f"{model}'s worker closed the connection instead of answering attach"
    return header


def test_a_lease_a_step_mints_opens_no_other_models_worker(daemon: RunningDaemon) -> None:
    header = _attached(daemon, "canary", _minted(daemon, "canary"))
    assert header.get("error", {}).get("code") == "PERMISSION_DENIED", f"canary's worker took a lease minted in hostile's worker: {header}"


def test_the_key_a_step_finds_is_its_own_models(daemon: RunningDaemon) -> None:
    """The step above did find a real key: the lease it mints for its own model is taken (that model's
    workers run its code already, so nothing is gained). Without this, a step that found no key at all
    would pass the test above."""
    header = _attached(daemon, "hostile", _minted(daemon, "hostile"))
    assert "error" not in header, header


def test_a_reload_gives_the_workers_new_keys(daemon: RunningDaemon) -> None:
    token = _minted(daemon, "hostile")
    with Client(daemon.address, timeout=30) as client:
        client.reload()
    header = _attached(daemon, "hostile", token)
    assert header.get("error", {}).get("code") == "PERMISSION_DENIED", header



def test_a_refused_forged_lease_is_booked_as_a_denial_not_as_a_resend(daemon: RunningDaemon) -> None:
    """Round 15's attacker: an attach refused for a token the worker's key did not sign says "expired"
    (so that a client whose lease a reload revoked renews it), and the books took every such refusal for
    a request to be sent again (`resent`): 40 forged and foreign leases presented to a model the uid may
    not use showed up as no denial at all. An attach refused is a PERMISSION_DENIED in the books."""
    def books() -> tuple[int, int]:
        with Client(daemon.address, direct=False) as admin:
            stats = admin.stats()
        denied = stats.get("operations", {}).get("attach", {}).get("PERMISSION_DENIED", 0)
        return denied, sum(usage.get("resent", 0) for usage in stats["clients"].values())

    before = books()
    header = _attached(daemon, "canary", _minted(daemon, "hostile"))  # a real lease, of another model's key
    assert header.get("error", {}).get("details") == {"lease": "expired"}, header
    assert books() == (before[0] + 1, before[1])
