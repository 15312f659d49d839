"""A grant of a read operation on some models shows those models only (round 36).

`models`, `status`, `stats` and `health` name no model, so the per-model access check let them through,
and the reply was the whole daemon's: a peer granted `stats` on `public` alone read `secret`'s counts and
every other client's usage, labels and identities - which the same grant refused when it asked for
`secret` by name. Now such a peer sees the rows of the models its grants of that operation name, and of
the figures by client only its own; a grant on every model ("*") still sees everything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from other_uid import call_as
from test_access import NOBODY, X, repo  # noqa: F401  (repo: the fixture)

pytestmark = pytest.mark.attack

READS = ["models", "status", "stats", "health"]


def reads_as(uid: int, address: str) -> dict[str, Any]:
    """As `uid`, infer `public` once, then ask each of READS; their results by name."""

    def reading() -> dict[str, Any]:
        from openinfer.client import Client

        with Client(address, timeout=10, client_name="nobody-app") as client:
            client.infer("public", {"x": X})
            return {op: getattr(client, op)() for op in READS}

    results: dict[str, Any] = call_as(uid, reading)
    return results


def test_a_grant_of_reads_on_one_model_shows_that_model_and_its_own_figures_only(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:  # noqa: F811
    policy = tmp_path / "access.toml"
    policy.write_text(
        f'[[grant]]\nname = "nobody-public"\nuids = [{NOBODY}]\noperations = ["infer", "metadata", {", ".join(json.dumps(op) for op in READS)}]\nmodels = ["public", "vad"]\n\n'
        '[[grant]]\nname = "root-all"\nuids = [0]\noperations = ["infer", "models", "status", "stats", "health"]\n'
    )
    policy.chmod(0o644)
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    from openinfer.client import Client, NotFound

    def unknown_models() -> list[Any]:
        """What NOT_FOUND lists to a peer asking for a model its grant names and nobody serves (round 40:
        every model served, `secret` among them)."""
        seen = []
        with Client(daemon.address, timeout=10, direct=False) as client:
            for call in (lambda: client.metadata("vad"), lambda: client.infer("vad", {"x": X})):
                try:
                    call()
                except NotFound as exc:
                    seen.append(exc.details.get("models"))
        return seen

    assert call_as(NOBODY, unknown_models) == [["public"], ["public"]]
    with Client(daemon.address, timeout=10, client_name="secret-project-x") as root:
        root.infer("secret", {"x": np.ones((1, 64), np.float32)})
        seen = reads_as(NOBODY, daemon.address)
        text = json.dumps(seen)
        # Nothing of the other model nor of the other client, in any of the four.
        assert "secret" not in text and "uid=0" not in text, text
        assert [row["name"] for row in seen["models"]] == ["public"]
        assert {row["model"] for row in seen["status"]["workers"]} == {"public"}
        assert list(seen["stats"]["models"]) == ["public"] and seen["stats"]["models"]["public"]["requests"] >= 1
        assert set(seen["stats"]["clients"]) == {f"nobody-app@uid={NOBODY}", f"uid={NOBODY}"}  # its own rows only
        # A grant on every model sees everything, as before.
        everything = root.stats()
        assert {"public", "secret"} <= set(everything["models"]) and "secret-project-x@uid=0" in everything["clients"]
        assert {row["name"] for row in root.models()} == {"public", "secret"}


# The model under test never finishes loading: its setup waits on an event nothing sets (the daemon's
# teardown ends the worker), so it stays "loading", not ready, for as long as the test looks.
SLOW_STEPS = '''
import threading

def setup(files):
    threading.Event().wait()
'''


def test_a_scoped_peers_health_is_the_readiness_of_its_own_models(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:  # noqa: F811
    """Round 38: `ready` was the daemon's, over every model: a peer granted `health` on `public` alone saw
    it turn false when a model it cannot see went down - 62 polls of `{"ready": false, "not_ready": []}`."""
    import onnx_builders
    from daemon_harness import wait_for
    from repo_builder import make_world_readable

    onnx_builders.matmul_model(repo / "slow" / "1" / "model.onnx")
    (repo / "slow" / "config.toml").write_text('[steps]\nmodule = "steps.py"\n')
    (repo / "slow" / "steps.py").write_text(SLOW_STEPS)
    make_world_readable(repo)
    policy = tmp_path / "access.toml"
    policy.write_text(
        f'[[grant]]\nname = "nobody-public"\nuids = [{NOBODY}]\noperations = ["infer", {", ".join(json.dumps(op) for op in READS)}]\nmodels = ["public"]\n\n'
        '[[grant]]\nname = "root-all"\nuids = [0]\noperations = ["infer", "models", "status", "stats", "health"]\n'
    )
    policy.chmod(0o644)
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"}, wait=False)
    from openinfer.client import Client

    with Client(daemon.address, timeout=10) as root:
        wait_for(lambda: _ready_rows(root) >= {"public", "secret"}, 60, "public and secret to serve", daemon=daemon)
        health = root.health()
        assert health["ready"] is False and [row["model"] for row in health["not_ready"]] == ["slow:1"], health  # the daemon's view
        seen = reads_as(NOBODY, daemon.address)
        assert seen["health"]["ready"] is True and seen["health"]["not_ready"] == [] and "slow" not in json.dumps(seen), seen


def _ready_rows(client: Any) -> set[str]:
    try:
        return {row["name"] for row in client.models() if row["state"] == "ready"}
    except Exception:  # noqa: BLE001  (not listening yet)
        return set()
