"""Who may connect and call what: peer uid from the kernel (ZAP over ipc://), grants from a policy file."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import world_readable_dir
from other_uid import call_as
from repo_builder import make_world_readable

pytestmark = pytest.mark.live

NOBODY = 65534
X = np.ones((1, 64), np.float32)


@pytest.fixture
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-access-")
    onnx_builders.matmul_model(root / "public" / "1" / "model.onnx")
    onnx_builders.matmul_model(root / "secret" / "1" / "model.onnx", seed=3)
    make_world_readable(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_user(uid: int, address: str, calls: list[tuple[str, str]], gid: int | None = None, groups: tuple[int, ...] = ()) -> list[str]:
    """As `uid` (primary group `gid`, default the uid's number; supplementary `groups`), make each call
    with one client; return the outcome codes."""

    def calling() -> list[str]:
        from openinfer.client import Client, OpenInferError

        outcomes = []
        with Client(address, timeout=3) as client:
            for op, model in calls:
                try:
                    if op == "infer":
                        client.infer(model, {"x": X})
                    elif op == "reload":
                        client.reload()
                    elif op == "stats":
                        client.stats()
                    else:
                        client.health()
                    outcomes.append("OK")
                except OpenInferError as exc:
                    outcomes.append(f"{exc.code}: {exc.message}")
        return outcomes

    outcomes: list[str] = call_as(uid, calling, gid, groups)
    return outcomes


def test_policy_decides_per_uid_operation_and_model(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "access.toml"
    policy.write_text(
        '[[grant]]\nname = "nobody-public"\nuids = [65534]\noperations = ["infer", "health"]\nmodels = ["public"]\n\n'
        '[[grant]]\nname = "root-all"\nuids = [0]\noperations = ["infer", "health", "stats", "status", "models", "metadata", "reload"]\n'
    )
    policy.chmod(0o644)
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    outcomes = as_user(NOBODY, daemon.address, [("infer", "public"), ("infer", "secret"), ("reload", ""), ("health", "")])
    assert outcomes[0] == "OK", outcomes
    assert outcomes[1].startswith("PERMISSION_DENIED") and "model 'secret'" in outcomes[1] and str(policy) in outcomes[1]
    assert outcomes[2].startswith("PERMISSION_DENIED") and "`reload`" in outcomes[2]
    assert outcomes[3] == "OK"
    root = daemon.client()
    assert root.infer("secret", {"x": X}).version == 1
    assert "added" in root.reload()
    clients = root.stats()["clients"]
    # Both infers and the refused reload are accounted under the peer's uid (health is not a request).
    assert clients["uid=65534"]["requests"] == 3 and clients["uid=65534"]["failures"] == {"PERMISSION_DENIED": 2}
    assert "permission denied" in daemon.log_text()


def test_peer_without_any_grant_cannot_even_connect(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "access.toml"
    policy.write_text('[[grant]]\nname = "root-only"\nuids = [0]\noperations = ["infer", "health"]\n')
    policy.chmod(0o644)
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    outcomes = as_user(NOBODY, daemon.address, [("health", "")])
    assert outcomes[0].split(":")[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), outcomes
    assert "connection refused: no grant matches this peer" in daemon.log_text()
    assert daemon.client().health()["ready"] is True


def test_default_policy_lets_local_clients_infer_but_not_reload(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    outcomes = as_user(NOBODY, daemon.address, [("infer", "secret"), ("reload", "")])
    assert outcomes[0] == "OK"
    assert outcomes[1].startswith("PERMISSION_DENIED") and "root-admin" not in outcomes[1]
    assert daemon.client().reload()["unchanged"]  # root holds the admin grant of the shipped policy
