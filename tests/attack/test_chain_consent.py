"""A hostile repository entry that declares itself a chain of another model (round 35).

A chain's worker reads its models' files and prepared weights and runs them as its own steps decide. Before,
the chain alone chose its models: an entry that shipped nothing but a config.toml (`[chain] models =
["victim"]`) and a steps module read the victim's external-data weights at load time and ran the victim on
inputs of its choosing, past the victim's access entry, steps, cache and limits - where the same code in
an ordinary entry was refused every one of those files. Now each model names, in its own config.toml, the
chains that may run it (`chains = [...]`); a chain naming a model that does not list it fails to load,
saying which and how to allow it, and never gets a worker; a model that withdraws its consent stops the
chain at the next reload.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnx_builders
from daemon_harness import wait_for
from openinfer.client import Client, OpenInferError
from repo_builder import ModelRepo, make_world_readable

pytestmark = pytest.mark.attack

# The attacker's chain: drive() runs the victim on zeros, which answers y = 0 + W, the victim's secret
# weights; at load it also tries to read the victim's weights file directly.
GREEDY_STEPS = '''
import numpy as np

INPUTS = [{{"name": "x", "datatype": "FP32", "shape": [16]}}]
OUTPUTS = [{{"name": "y", "datatype": "FP32", "shape": [16]}}]
_read = b""

def setup(files):
    global _read
    try:
        with open({weights!r}, "rb") as f:
            _read = f.read()
    except OSError:
        pass

def drive(inputs, models):
    return {{"y": models["victim"]({{"x": np.zeros(16, np.float32)}})["y"]}}
'''


def _chain_config(member: str) -> str:
    return f'workers = 1\n\n[chain]\nmodels = ["{member}"]\n\n[steps]\nmodule = "steps.py"\n'


def _status(client: Client, name: str) -> dict[str, Any]:
    return next(m for m in client.status()["models"] if m["name"] == name)


def test_an_entry_cannot_make_itself_a_chain_of_a_model_that_does_not_name_it(daemon_factory: Any) -> None:
    repo = ModelRepo("oi-chain-consent-")
    try:
        (repo.root / "victim" / "1").mkdir(parents=True)
        _, secret = onnx_builders.external_weights_model(repo.root / "victim" / "1" / "model.onnx")
        repo.config("victim", "workers = 1\n")  # in no chain
        repo.config("greedy", _chain_config("victim"))
        (repo.root / "greedy" / "steps.py").write_text(GREEDY_STEPS.format(weights=str(repo.root / "victim" / "1" / "weights.bin")))
        running = daemon_factory(repo.ready())
        with Client(running.address, timeout=30) as client:
            wait_for(lambda: _status(client, "greedy")["state"] == "failed", 60, "the chain to fail", daemon=running)
            reason = _status(client, "greedy")["reason"]
            assert "its model 'victim' does not let it run it: add 'greedy' to `chains` in victim/config.toml" in reason, reason
            with pytest.raises(OpenInferError) as caught:
                client.infer("greedy", {"x": np.zeros(16, np.float32)})
            assert caught.value.code == "UNAVAILABLE", str(caught.value)
            assert not any(w["model"] == "greedy" for w in client.status()["workers"])  # no worker ever read anything
            # The victim serves, its weights its own.
            np.testing.assert_array_equal(client.infer("victim", {"x": np.zeros(16, np.float32)}).outputs["y"], secret)
    finally:
        repo.remove()


def test_a_model_that_withdraws_its_consent_stops_the_chain_at_the_next_reload(daemon_factory: Any) -> None:
    repo = ModelRepo("oi-chain-consent-")
    try:
        repo.model("member", onnx_builders.matmul_model, config='workers = 1\nchains = ["runner"]\n')
        repo.config("runner", _chain_config("member"))
        (repo.root / "runner" / "steps.py").write_text(
            'INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]\n'
            'OUTPUTS = [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}]\n'
            'def drive(inputs, models):\n    return models["member"](inputs)\n')
        root = repo.ready()
        running = daemon_factory(root)
        x = np.ones((1, 64), np.float32)
        with Client(running.address, timeout=30) as client:
            assert client.infer("runner", {"x": x}).outputs["y"].shape == (1, 64)  # consented: served
            (root / "member" / "config.toml").write_text("workers = 1\n")
            make_world_readable(root)
            client.reload()
            with pytest.raises(OpenInferError) as caught:
                client.infer("runner", {"x": x})
            assert caught.value.code in ("NOT_FOUND", "UNAVAILABLE"), str(caught.value)
            assert "does not let it run it" in _status(client, "runner")["reason"]
            wait_for(lambda: not any(w["model"] == "runner" and w["state"] != "exited" for w in client.status()["workers"]), 30, "the chain's worker to exit", daemon=running)
            assert client.infer("member", {"x": x}).outputs["y"].shape == (1, 64)
    finally:
        repo.remove()


RUNNER_STEPS = (
    'INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]\n'
    'OUTPUTS = [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}]\n'
    'def drive(inputs, models):\n    return models["member"](inputs)\n'
)


@pytest.mark.parametrize("member_edit", ["model-file-broken", "config-broken"])
def test_a_withdrawn_consent_holds_while_the_members_own_replacement_cannot_load(daemon_factory: Any, member_edit: str) -> None:
    """Round 37: consent was read from the config of the member version serving. A member that withdrew it
    in an edit whose replacement could not load (its model file broken in the same edit, its config.toml
    broken, or over pool.max_workers) kept serving on its old config, which still listed the chain: the
    reload stopped the chain, a later one started it again - the member's weights served to the chain once
    more. Consent is now what the last scan read, and a member whose config cannot be read grants none."""
    repo = ModelRepo("oi-chain-consent-")
    try:
        repo.model("member", onnx_builders.matmul_model, config='workers = 1\nchains = ["runner"]\n')
        repo.config("runner", _chain_config("member"))
        (repo.root / "runner" / "steps.py").write_text(RUNNER_STEPS)
        root = repo.ready()
        running = daemon_factory(root)
        x = np.ones((1, 64), np.float32)
        with Client(running.address, timeout=30) as client:
            assert client.infer("runner", {"x": x}).outputs["y"].shape == (1, 64)
            if member_edit == "model-file-broken":
                (root / "member" / "config.toml").write_text("workers = 1\n")
                (root / "member" / "1" / "model.onnx").write_bytes(b"not a model")
            else:
                (root / "member" / "config.toml").write_text("workers = [\n")
            make_world_readable(root)
            for attempt in range(3):
                client.reload()
                row = _status(client, "runner")
                assert row["state"] == "failed", (attempt, row)
                assert "does not let it run it" in row["reason"] or "cannot be read" in row["reason"], row
                # The member's replacement has failed by now: the version serving is the old one, config and all.
                wait_for(lambda: "reload failed" in (_status(client, "member")["reason"] or ""), 30, "the member's replacement to fail", daemon=running)
                wait_for(lambda: not any(w["model"] == "runner" and w["state"] != "exited" for w in client.status()["workers"]), 30, "no worker of the chain", daemon=running)
            with pytest.raises(OpenInferError) as caught:
                client.infer("runner", {"x": x})
            assert caught.value.code in ("NOT_FOUND", "UNAVAILABLE"), str(caught.value)
            assert client.infer("member", {"x": x}).outputs["y"].shape == (1, 64)  # the member serves on its previous file
    finally:
        repo.remove()
