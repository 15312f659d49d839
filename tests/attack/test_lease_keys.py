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
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from daemon_harness import RunningDaemon, wait_for
from direct_peer import Peer, attach, infer, lease_of
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


def _workers(daemon: RunningDaemon) -> list[dict[str, Any]]:
    with Client(daemon.address, direct=False) as admin:
        return [w for w in admin.status()["workers"] if w["model"] == "tiny"]


def _blocked_in_poll(pid: int) -> bool:
    """The process's main thread waits in poll(2) (x86-64: 7, ppoll 271): a booting worker's only wait
    after its HELLO is for the ACK (daemon/worker/boot.py _await_ack)."""
    return Path(f"/proc/{pid}/syscall").read_text().split()[0] in ("7", "271")


def test_a_key_sent_with_a_booting_workers_ack_is_taken(daemon_factory: Any, tiny_repo: Path) -> None:
    """Attacker round 79: a booting worker read its ACK (carrying the key) and a reload's KEY, sent right
    behind it, in one read and kept only the ACK: it served on with the revoked key - every fresh lease
    refused (a direct client's every request went to its front door and back), a lease issued before the
    reload taken - until the next reload. Made certain here as a loaded host does by chance: the worker is
    held between its HELLO and its read of the ACK while the reload is sent."""
    daemon = daemon_factory(tiny_repo, env={"OPENINFER_POOL_DIRECT": "1", "OPENINFER_POOL_RESPAWN_BACKOFF_MS": "1"})
    supervisor = daemon.process.pid
    old = {w["pid"] for w in _workers(daemon)}
    held: list[int] = []
    try:
        victim = min(old)  # of two; the other serves on
        os.kill(supervisor, signal.SIGSTOP)  # the replacement is spawned, then its HELLO is not answered yet
        held.append(supervisor)
        os.kill(victim, signal.SIGKILL)
        os.kill(supervisor, signal.SIGCONT)
        held.remove(supervisor)
        new, new_id = wait_for(lambda: [(w["pid"], w["id"]) for w in _workers(daemon) if w["pid"] not in old and w["state"] == "spawned"], 30, "the replacement spawned", daemon=daemon)[0]
        os.kill(supervisor, signal.SIGSTOP)
        held.append(supervisor)
        wait_for(lambda: _blocked_in_poll(new), 60, "the replacement waiting for its ACK")
        os.kill(new, signal.SIGSTOP)  # it reads nothing until both the ACK and the KEY wait in its socket
        held.append(new)
        os.kill(supervisor, signal.SIGCONT)
        held.remove(supervisor)
        wait_for(lambda: [w for w in _workers(daemon) if w["pid"] == new and w["state"] == "loaded"], 30, "the ACK sent", daemon=daemon)
        before = lease_of(daemon)["lease"]  # issued before the reload
        with Client(daemon.address, timeout=30, direct=False) as admin:
            admin.reload()  # KEY to every worker, the held one too
            admin.health()  # a pass later: the supervisor's writes are out
        os.kill(new, signal.SIGCONT)
        held.remove(new)
        wait_for(lambda: [w for w in _workers(daemon) if w["pid"] == new and w["state"] == "ready"], 30, "the replacement ready", daemon=daemon)
        fresh = lease_of(daemon)
        (address,) = [w["address"] for w in fresh["workers"] if w["worker"] == new_id]
        peer = Peer(address)
        try:
            taken = peer.ask(attach(fresh["lease"]))
            assert taken is not None and "error" not in taken, f"a lease issued after the reload was refused: {taken}"
            stale = peer.ask(attach(before, request_id=2))
            assert stale is not None and stale.get("error", {}).get("code") == "PERMISSION_DENIED", f"a lease revoked by the reload was taken: {stale}"
        finally:
            peer.close()
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)


def test_an_infer_without_a_lease_is_booked_as_a_refusal_not_as_the_models_failure(daemon: RunningDaemon) -> None:
    """Attacker round 79: an infer sent to a worker's endpoint without attaching a lease was refused and
    booked as a failed request of the worker's model - a uid with no grant on the model filled its error
    figures in `stats` and Prometheus (1,500 PERMISSION_DENIED on a model it may not use). Refused by access,
    it is booked under `rejected`, as the front door books a request the access policy refuses."""
    def books() -> tuple[int, int]:
        with Client(daemon.address, direct=False) as admin:
            stats = admin.stats()
        return stats["models"]["canary"]["requests"], stats["rejected"].get("PERMISSION_DENIED", 0)

    before = books()
    peer = Peer(lease_of(daemon, "canary")["workers"][0]["address"])
    try:
        for request_id in (1, 2):
            header = peer.ask(infer(request_id))
            assert header is not None and header.get("error", {}).get("code") == "PERMISSION_DENIED", header
    finally:
        peer.close()
    assert books() == (before[0], before[1] + 2)
