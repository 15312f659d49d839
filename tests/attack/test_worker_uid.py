"""Another process of the workers' uid, attacking them (attacker round 17, finding 4).

As root the daemon drops its workers to `sandbox.worker_user`, by default `nobody`: uid 65534, which
other services share. Any process of that uid could signal the workers: /proc and ptrace stayed closed,
but SIGSTOP from uid 65534 left an honest client 1 answer in 7 (DEADLINE_EXCEEDED). Workers can now
have ids of their own without an account (`worker_user = "UID:GID"`, as systemd's DynamicUser=), and a
daemon whose workers run as the shared uid says so in its log.
"""
from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, log_records, wait_for
from openinfer.client import Client
from openinfer.daemon.config.worker_user import shared_ids_warning
from repo_builder import ModelRepo

pytestmark = pytest.mark.attack

SIGNAL_AS_NOBODY = """
import errno, os, signal, sys
for pid in map(int, sys.argv[1:]):
    try:
        os.kill(pid, signal.SIGSTOP)
        print(pid, "stopped")
    except OSError as exc:
        print(pid, errno.errorcode[exc.errno])
"""


def unused_ids() -> tuple[int, int]:
    """A uid and gid no account, group or process has (from the range systemd leaves to DynamicUser=)."""
    used = {uid for proc in psutil.process_iter(["uids"]) for uid in (proc.info["uids"] or ())}
    for candidate in range(65519, 61183, -1):
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
            continue
        except KeyError:
            pass
        if candidate not in used:
            return candidate, candidate
    pytest.fail("no unused uid in 61184..65519")


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    models = ModelRepo("oi-worker-uid-")
    models.model("tiny", onnx_builders.matmul_model, config="workers = 2\n")
    yield models.ready()
    models.remove()


@pytest.mark.skipif(os.geteuid() != 0, reason="workers change uid only under a root daemon")
def test_workers_with_ids_of_their_own_cannot_be_signalled_by_nobody(daemon_factory: Any, repo: Path) -> None:
    """Before: `worker_user = "UID:GID"` was an unknown user and the daemon did not start; the only
    choice was an account, and the default one is shared with every process of uid 65534."""
    uid, gid = unused_ids()
    daemon = daemon_factory(repo, env={"OPENINFER_SANDBOX_WORKER_USER": f"{uid}:{gid}"})
    x = np.ones((1, 64), np.float32)
    with Client(daemon.address, timeout=10) as client:

        def both_ready() -> list[dict[str, Any]] | None:  # (a worker drops its uid while it boots)
            workers: list[dict[str, Any]] = client.status()["workers"]
            return workers if len(workers) == 2 and all(w["state"] == "ready" for w in workers) else None

        pids = [w["pid"] for w in wait_for(both_ready, 60, "both workers ready", daemon=daemon)]
        for pid in pids:
            assert psutil.Process(pid).uids().real == uid and psutil.Process(pid).gids().real == gid
        attack = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", SIGNAL_AS_NOBODY, *map(str, pids)], capture_output=True, text=True, timeout=30)
        assert attack.returncode == 0, attack.stderr
        assert attack.stdout.split() == [word for pid in pids for word in (str(pid), "EPERM")], attack.stdout
        for _ in range(4):  # both workers, neither stopped
            assert client.infer("tiny", {"x": x}).outputs["y"].shape == (1, 64)


@pytest.mark.skipif(os.geteuid() != 0, reason="workers change uid only under a root daemon")
def test_a_daemon_whose_workers_share_uid_65534_says_so(daemon: RunningDaemon) -> None:
    """The shared daemon runs the default, `nobody`: its log tells the operator what that allows."""
    warnings = [r for r in log_records(daemon) if r.get("msg") == "workers share their uid"]
    assert warnings and warnings[0]["uid"] == 65534 and "sandbox.worker_user" in warnings[0]["reason"], warnings


def test_ids_given_as_their_own_that_belong_to_an_account_are_warned_about() -> None:
    """`UID:GID` naming an existing account's uid or a group's gid (shadow, disk, sudo ...) was taken
    silently (attacker round 18): that account's processes could signal the workers, the group's members
    enter their directory. Ids no account has get no warning."""
    account = next(entry for entry in pwd.getpwall() if entry.pw_uid != 0 and entry.pw_gid != 0)
    warning = shared_ids_warning(f"{account.pw_uid}:{account.pw_gid}", account.pw_uid, account.pw_gid)
    assert warning is not None and f"is user {account.pw_name}" in warning and f"gid {account.pw_gid} is group {grp.getgrgid(account.pw_gid).gr_name}" in warning, warning
    uid, gid = unused_ids()
    assert shared_ids_warning(f"{uid}:{gid}", uid, gid) is None
    assert shared_ids_warning(account.pw_name, account.pw_uid, account.pw_gid) is None  # a user named: the operator's choice
