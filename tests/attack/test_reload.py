"""Finding 12: SIGHUP did not reload who may do what. access.toml and clients.toml were read once at
start; an operator who tightened them and reloaded got no change and no warning. Now every setting is
declared live, new-workers-only or restart-only, the policy files are read again on every reload, and
the reply says what was applied and what waits for a restart."""
from __future__ import annotations

import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, wait_for, world_readable_dir
from openinfer.client import Client, InvalidArgument, OpenInferError, ResourceExhausted
from other_uid import NOBODY, run_as
from repo_builder import ModelRepo

pytestmark = pytest.mark.attack

X = np.ones((1, 64), np.float32)
SLOW = {"x": np.zeros(1, np.float32), "n": np.array(400_000, np.int64)}
ALL_OPS = '["infer", "cancel", "models", "metadata", "health", "status", "stats", "reload"]'


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-reload-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    onnx_builders.busy_loop_model(root / "busy" / "1" / "model.onnx")
    (root / "busy" / "config.toml").write_text("workers = 1\n")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def reload_and_wait(daemon: RunningDaemon) -> None:
    """SIGHUP, then wait for the reload to finish: its last step logs "repository synced" (never a
    fixed sleep)."""
    before = daemon.log_text().count('"repository synced"')
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while daemon.log_text().count('"repository synced"') <= before:
        assert time.monotonic() < deadline, "the reload never finished"
        time.sleep(0.02)


NOBODY_INFERS = """
try:
    with Client(sys.argv[1], timeout=10) as client:
        client.infer("tiny", {"x": np.ones((1, 64), np.float32)})
    print("OK")
except OpenInferError as exc:
    print(exc.code)
"""


def test_a_tightened_access_policy_applies_at_the_next_request_after_sighup(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "access.toml"
    policy.write_text(f'[[grant]]\nname = "root"\nuids = [0]\noperations = {ALL_OPS}\n\n[[grant]]\nname = "nobody"\nuids = [{NOBODY}]\noperations = ["infer", "health"]\n')
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    assert run_as(NOBODY, NOBODY_INFERS, daemon.address).stdout.strip() == "OK"
    policy.write_text(f'[[grant]]\nname = "root"\nuids = [0]\noperations = {ALL_OPS}\n\n[[grant]]\nname = "nobody"\nuids = [{NOBODY}]\noperations = ["health"]\n')
    reload_and_wait(daemon)
    assert run_as(NOBODY, NOBODY_INFERS, daemon.address).stdout.strip() == "PERMISSION_DENIED"


def test_a_tightened_client_policy_applies_after_sighup(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "clients.toml"
    policy.write_text("[default]\nmax_in_flight = 64\n")
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_CLIENT_POLICY": str(policy)})
    policy.write_text('[default]\nmax_in_flight = 64\n\n[uids."0"]\nmax_in_flight = 1\n')
    reload_and_wait(daemon)
    outcomes: list[str] = []

    def call() -> None:
        with Client(daemon.address, timeout=60, direct=False) as client:  # the front door's limit (a worker's: test_worker_endpoint)
            try:
                client.infer("busy", SLOW)
                outcomes.append("OK")
            except ResourceExhausted:
                outcomes.append("RESOURCE_EXHAUSTED")

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], outcomes


def test_the_reload_reply_says_what_applied_and_what_needs_a_restart(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "openinfer.toml"
    config.write_text("[server]\npeer_strike_limit = 16\nsocket_mode = 0o660\n\n[pool]\nworkers = 1\n")
    daemon = daemon_factory(repo, "--config", str(config))
    config.write_text("[server]\npeer_strike_limit = 4\nsocket_mode = 0o600\n\n[pool]\nworkers = 2\nintra_op_threads = 2\n")
    with Client(daemon.address, timeout=30) as client:
        result = client.reload()
        assert result["settings"] == {"applied": ["server.peer_strike_limit", "pool.workers"], "new_workers_only": ["pool.intra_op_threads"], "needs_restart": ["server.socket_mode"]}
        assert "tiny:1: 2 workers" in result.get("resized", [])
        deadline = time.monotonic() + 60
        while sum(1 for w in client.status()["workers"] if w["model"] == "tiny" and w["state"] in ("ready", "busy")) < 2:
            assert time.monotonic() < deadline, "pool.workers = 2 never took effect"
            time.sleep(0.05)
    assert oct(Path(daemon.address[len("ipc://") :]).stat().st_mode & 0o777) == "0o660"  # restart-only: unchanged
    assert "need a restart" in daemon.log_text()


def test_a_reload_never_turns_the_sandbox_off(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    """Round 43: sandbox.enabled applied to new workers at a reload, with no warning from the supervisor:
    a worker replaced after `enabled = false` and SIGHUP ran unconfined (as root, on a root daemon) and
    rewrote another model's shared weights in place - that model's answers changed for every client. It
    needs a restart now, where the start warns; the running value stays."""
    import os
    import signal

    config = tmp_path / "openinfer.toml"
    config.write_text("[sandbox]\nenabled = true\n")
    daemon = daemon_factory(repo, "--config", str(config))
    config.write_text("[sandbox]\nenabled = false\n")
    with Client(daemon.address, timeout=30) as client:
        assert "sandbox.enabled" in client.reload()["settings"]["needs_restart"]
        (old,) = [w["pid"] for w in client.status()["workers"] if w["model"] == "tiny" and w["state"] != "exited"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: any(w["model"] == "tiny" and w["state"] == "ready" and w["pid"] != old for w in client.status()["workers"]), 60, "a new worker", daemon=daemon)
        (new,) = [w for w in client.status()["workers"] if w["model"] == "tiny" and w["state"] == "ready"]
        assert new["sandbox"]["seccomp_mode"] == 2 and new["sandbox"]["uid"][0] != 0, new["sandbox"]


NOBODY_AND_ROOT = f'[[grant]]\nname = "root"\nuids = [0]\noperations = {ALL_OPS}\n\n[[grant]]\nname = "nobody"\nuids = [{NOBODY}]\noperations = ["health"]\n'


@pytest.mark.parametrize("typo, what, uid", [
    ('[[grant]]\nname = "local"\nlocal = "false"\noperations = ["infer", "health"]\n', "`local` must be true or false", NOBODY),
    (f'[[grant]]\nname = "nobody"\nuids = "{NOBODY}"\noperations = ["infer", "health"]\n', "`uids` must be a list of numeric ids", 5),
], ids=["local-as-a-string", "uids-as-a-string"])
def test_a_policy_value_of_the_wrong_type_is_refused_not_cast(daemon_factory: Any, repo: Path, tmp_path: Path, typo: str, what: str, uid: int) -> None:
    """Round 22's attacker: access.toml values were cast, not checked. `local = "false"` is bool("false"),
    True: after the reload every local uid could infer; `uids = "65534"` let uids 6, 5, 3 and 4 in (its
    digits) and kept 65534 out. A value of the wrong type now fails the reload, INVALID_ARGUMENT naming
    it, and the policy in force stays."""
    policy = tmp_path / "access.toml"
    policy.write_text(NOBODY_AND_ROOT)
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    policy.write_text(NOBODY_AND_ROOT + "\n" + typo)
    with Client(daemon.address, timeout=30) as client:
        with pytest.raises(InvalidArgument, match=re.escape(what)):
            client.reload()
    # the uid the cast let in: 65534 (any local uid), or 5 (a digit of "65534"; with no grant at all it is
    # not even connected, and its client gives up after 2 s)
    assert run_as(uid, NOBODY_INFERS.replace("timeout=10", "timeout=2"), daemon.address).stdout.strip() in ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED")


@pytest.mark.parametrize("file, text", [
    ("clients.toml", "[default]\nmax_in_flight = nan\n"),
    ("clients.toml", "[default]\nrate_per_s = inf\n"),
    ("openinfer.toml", "[pool]\nworkers = 1\nping_interval_s = nan\n"),
    ("openinfer.toml", "[pool]\nworkers = 1\n\n[server]\nlease_ttl_s = inf\n"),
    ("clients.toml", "[default]\nmax_in_flight = 99999999999999999999999\n"),
    ("clients.toml", "[default]\nrate_per_s = 5\nburst = 1" + "0" * 400 + "\n"),
    ("openinfer.toml", "[pool]\nworkers = 1\n\n[server]\nlease_ttl_s = 1e11\n"),
], ids=["max_in_flight-nan", "rate_per_s-inf", "ping_interval_s-nan", "lease_ttl_s-inf", "max_in_flight-1e23", "burst-1e400", "lease_ttl_s-1e11"])
def test_a_non_finite_or_huge_number_in_a_setting_or_policy_is_refused_by_a_reload(daemon_factory: Any, repo: Path, tmp_path: Path, file: str, text: str) -> None:
    """Round 22's attacker: nan and inf are TOML floats. `ping_interval_s = nan` was applied by a reload and
    the supervisor died at its next ping tick (int(nan)) - every client with it; `lease_ttl_s = inf` made
    every direct request INTERNAL; `max_in_flight = nan` answered the reload INTERNAL. Round 23's: finite
    but huge - a TOML int has no size - did as much (`max_in_flight = 10**23` did not pack into a lease,
    `burst = 10**400` made every request INTERNAL, `lease_ttl_s = 1e11` overflowed 64 bits of ns). Each
    is now refused as any bad value is: INVALID_ARGUMENT naming it, nothing applied, the daemon serves on."""
    config, clients = tmp_path / "openinfer.toml", tmp_path / "clients.toml"
    config.write_text("[pool]\nworkers = 1\n")
    clients.write_text("[default]\nmax_in_flight = 64\n")
    daemon = daemon_factory(repo, "--config", str(config), env={"OPENINFER_SERVER_CLIENT_POLICY": str(clients)})
    (tmp_path / file).write_text(text)
    with Client(daemon.address, timeout=30) as client:
        with pytest.raises(InvalidArgument, match="finite|whole number|from 0 to|at most"):
            client.reload()
        for direct in (True, False):
            with Client(daemon.address, timeout=30, direct=direct) as user:
                assert user.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)


def test_requests_queued_on_a_replaced_version_whose_last_worker_dies_go_to_the_version_serving_now(daemon_factory: Any) -> None:
    """Round 22's attacker: a one-worker model replaced while its worker ran a request it could not stop,
    with six requests queued behind it. The old version waits for its queue; its worker was killed at
    max_compute_ms, and the version was released with the six still queued - they waited out their
    timeouts (DEADLINE_EXCEEDED "the task never ran"), counted nowhere, while the replacement served
    everyone else. Now they go to the version serving now, and are answered."""
    models = ModelRepo("oi-reload-stranded-")
    models.spinning_model("spin", "workers = 1\nmax_compute_ms = 4000\n")  # its step spins for `seconds`; onnxruntime cannot stop it
    daemon = daemon_factory(models.ready(), env={"OPENINFER_POOL_DIRECT": "0"})
    outcomes: dict[str, list[str]] = {"runaway": [], "queued": []}

    def ask(kind: str, seconds: float) -> None:
        with Client(daemon.address, timeout=20) as client:
            try:
                client.infer("spin", {"seconds": np.array(seconds, np.float32)})
                outcomes[kind].append("OK")
            except OpenInferError as exc:
                outcomes[kind].append(exc.code)

    def status() -> dict[str, Any]:
        with Client(daemon.address, timeout=10) as admin:
            return admin.status()

    runaway = threading.Thread(target=ask, args=("runaway", 60.0))
    runaway.start()
    wait_for(lambda: any(w["state"] == "busy" for w in status()["workers"]), 30, "the runaway request running")
    queued = [threading.Thread(target=ask, args=("queued", 0.0)) for _ in range(6)]
    for thread in queued:
        thread.start()
    wait_for(lambda: status()["queued"] == 6, 30, "six requests queued behind it")
    models.config("spin", "workers = 1\nmax_compute_ms = 4001\n\n[steps]\nmodule = \"steps.py\"\n")
    models.ready()
    with Client(daemon.address, timeout=30) as admin:
        assert "spin:1" in admin.reload()["replaced"]
    wait_for(lambda: status()["retiring"] == ["spin:1"], 30, "the replacement serving, the old version retiring")
    assert runaway.is_alive(), "the runaway request ended before the old version retired: nothing was left to strand"
    for thread in [runaway, *queued]:
        thread.join(60)
    models.remove()
    assert outcomes == {"runaway": ["DEADLINE_EXCEEDED"], "queued": ["OK"] * 6}, outcomes
