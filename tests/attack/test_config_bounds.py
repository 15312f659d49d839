"""A model repository's config.toml is written by whoever publishes a model, and the daemon obeyed every
number in it without limit (attacker round 16, findings 5 and 6): `workers = 100000` spawned that many
worker processes at once, `intra_op_threads = 100000` as many threads before any rlimit,
`max_compute_ms = 2**63-1` made every front-door infer INTERNAL (the stop message packs it in 64 bits of
ns), `memory_limit_mb = 2**63-1` failed the model with a bare OverflowError. Every number now has a
bound (modelconfig.BOUNDS): a value over it fails that model, naming the key, the value and the bound,
and the other models serve. And a batch delay longer than a client's timeout held a lone request, a
worker free, until DEADLINE_EXCEEDED: a batch now leaves by the time its requests can still run."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from openinfer.client import Client, OpenInferError
from openinfer.daemon.modelstore.modelconfig import BOUNDS, MAX_PREFERRED_BATCH_SIZES, ConfigError, parse_model_config
from daemon_harness import wait_for
from repo_builder import ModelRepo

pytestmark = pytest.mark.attack

BIG = 2**63 - 1
CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def _toml(key: str, value: int) -> str:
    """config.toml setting the dotted `key` to `value` (a preferred size needs a max_batch_size as large)."""
    table, _, name = key.rpartition(".")
    if name == "preferred_batch_sizes":
        return f"[batching]\npreferred_batch_sizes = [{value}]\nmax_batch_size = {BOUNDS['batching.max_batch_size'].high}\n"
    return f"[{table}]\n{name} = {value}\n" if table else f"{name} = {value}\n"


def _parse(text: str) -> Any:
    return parse_model_config(Path("models/m/config.toml"), text)


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_every_number_of_a_models_config_has_a_bound_that_is_refused_with_its_name(key: str) -> None:
    bound = BOUNDS[key].high
    _parse(_toml(key, bound))  # the bound itself is a value an operator may use
    for value in (bound + 1, BIG):
        with pytest.raises(ConfigError) as refused:
            _parse(_toml(key, value))
        assert f"`{key}` = {value} is over its bound {bound}" in str(refused.value)


@pytest.mark.parametrize(("text", "said"), [
    ("workers = 100000\n", "`workers` = 100000 is over its bound 64"),
    ("intra_op_threads = 100000\n", "`intra_op_threads` = 100000 is over its bound 64"),
    (f"max_compute_ms = {BIG}\n", f"`max_compute_ms` = {BIG} is over its bound {2**31 - 1}"),
    (f"memory_limit_mb = {BIG}\n", f"`memory_limit_mb` = {BIG} is over its bound 1048576"),
    ("[batching]\npreferred_batch_sizes = [" + ", ".join("1" * (MAX_PREFERRED_BATCH_SIZES + 1)) + "]\n", f"at most {MAX_PREFERRED_BATCH_SIZES}"),
])
def test_the_attackers_values_are_refused(text: str, said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        _parse(text)


# Round 39: values that raised out of the parser - so out of the repository scan: no start, every reload
# INTERNAL, nothing of it applied (a withdrawn chain consent among it).
HOSTILE_CONFIGS = {
    "hex-integer": ("workers = 0x" + "f" * 5000 + "\n", "`workers` is over its bound 64: an integer of 20000 bits"),
    "long-integer": ("workers = " + "9" * 5000 + "\n", "cannot be read: ValueError"),
    "deep-arrays": ("workers = " + "[" * 600 + "]" * 600 + "\n", "cannot be read: RecursionError"),
    "hex-shown-in-a-message": ("version_policy = 0x" + "f" * 5000 + "\n", "too large to read or to show"),
}


@pytest.mark.parametrize("name", list(HOSTILE_CONFIGS))
def test_a_config_the_parser_cannot_hold_is_refused_with_a_reason(name: str) -> None:
    text, said = HOSTILE_CONFIGS[name]
    with pytest.raises(ConfigError, match=re.escape(said)):
        _parse(text)


def test_a_repository_of_hostile_entries_starts_and_reloads_each_failing_alone(daemon_factory: Any) -> None:
    """Every hostile config.toml above, a directory whose name is not UTF-8 (its name then broke every
    health, status and models reply: msgpack cannot send a lone surrogate), and beside them an honest model
    that must serve, a new one a reload must add, and a chain whose member withdraws its consent in the
    same reload, which must stop it (before: the reload failed INTERNAL and the chain served on)."""
    repo = ModelRepo("oi-hostile-configs-")
    try:
        repo.model("good", onnx_builders.matmul_model)
        repo.model("member", onnx_builders.matmul_model, config='chains = ["runner"]\n')
        repo.config("runner", 'workers = 1\n\n[chain]\nmodels = ["member"]\n\n[steps]\nmodule = "steps.py"\n')
        (repo.root / "runner" / "steps.py").write_text(
            'INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]\nOUTPUTS = [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}]\n'
            'def drive(inputs, models):\n    return models["member"](inputs)\n')
        running = daemon_factory(repo.ready())
        x = np.ones((1, 64), np.float32)
        with Client(running.address, timeout=30) as client:
            assert client.infer("runner", {"x": x}).outputs["y"].shape == (1, 64)
            for name, (text, _) in HOSTILE_CONFIGS.items():
                repo.model(name, onnx_builders.matmul_model, config=text)
            os.mkdir(os.fsencode(repo.root) + b"/bad\xff")
            (repo.root / "member" / "config.toml").write_text("workers = 1\n")  # consent withdrawn
            repo.model("fresh", onnx_builders.matmul_model)
            repo.ready()
            changes = client.reload()
            assert "fresh:1" in changes["added"], changes
            rows = {row["name"]: row for row in client.models()}
            for name, (_, said) in HOSTILE_CONFIGS.items():
                assert rows[name]["state"] == "failed" and said in rows[name]["reason"], rows[name]
            assert rows["bad\\xff"]["state"] == "failed" and "not UTF-8" in rows["bad\\xff"]["reason"], rows
            assert rows["runner"]["state"] == "failed" and "does not let it run it" in rows["runner"]["reason"], rows["runner"]
            assert client.health()["failed"] and client.status()["models"]
            assert client.infer("good", {"x": x}).outputs["y"].shape == (1, 64)
        restarted = daemon_factory(repo.root)  # and a daemon starts on it
        with Client(restarted.address, timeout=30) as client:
            assert client.infer("fresh", {"x": x}).outputs["y"].shape == (1, 64)
    finally:
        repo.remove()


def test_a_model_file_gone_since_the_scan_saw_it_is_fingerprinted_not_raised(tmp_path: Path) -> None:
    """Round 39: a model file renamed away between the scan and its fingerprint raised FileNotFoundError out
    of the reload (5 of 100 reloads INTERNAL, half applied) and out of the start (4 of 20)."""
    from openinfer.daemon.control.reload import model_fingerprint
    from openinfer.daemon.modelstore.modelconfig import ModelConfig

    assert model_fingerprint(tmp_path / "gone" / "1" / "model.onnx", ModelConfig())[0] is None


def test_config_md_states_every_bound() -> None:
    """The per-model table in docs/CONFIG.md is written by hand: each key's row names its bound."""
    rows = {line.split("|")[1].strip().strip("`"): line for line in CONFIG_DOC.read_text().splitlines() if line.startswith("| `")}
    for key, bound in BOUNDS.items():
        assert str(bound.high) in rows[key], f"docs/CONFIG.md: the row of `{key}` does not name its bound {bound.high}"


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    models = ModelRepo("oi-cfg-bounds-")
    models.model("canary", onnx_builders.matmul_model, config="workers = 1\n")
    models.model("compute", onnx_builders.matmul_model, config=f"workers = 1\nmax_compute_ms = {BIG}\n")
    models.model("threads", onnx_builders.matmul_model, config="workers = 1\nintra_op_threads = 65\n")
    # A second of waiting for company (the bound is ten), longer than the client's timeout below.
    models.model("patient", onnx_builders.matmul_model, config="workers = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 1000000\nquiet_us = 0\n")
    yield models.ready()
    models.remove()


def test_a_model_over_a_bound_fails_alone_and_a_lone_request_is_not_held_past_its_timeout(daemon_factory: Any, repo: Path) -> None:
    """Before: `compute` and `threads` were served (and `compute` answered INTERNAL through the front
    door); a request with a 0.3 s timeout to `patient` waited out its deadline in the queue beside a free
    worker, on either path: DEADLINE_EXCEEDED ... never ran."""
    daemon = daemon_factory(repo)
    x = np.ones((1, 64), np.float32)
    with Client(daemon.address, timeout=10) as client:
        models = {m["name"]: m for m in client.models()}
        for name, said in (("compute", f"`max_compute_ms` = {BIG} is over its bound"), ("threads", "`intra_op_threads` = 65 is over its bound 64")):
            assert models[name]["state"] == "failed" and said in (models[name]["reason"] or ""), models[name]
        assert client.infer("canary", {"x": x}).outputs["y"].shape == (1, 64)
    for direct in (False, True):
        with Client(daemon.address, timeout=10, direct=direct) as client:
            client.infer("canary", {"x": x})  # the lease and the link first (direct): the timed request goes alone
            result = client.infer("patient", {"x": x}, timeout=0.3)
            assert result.outputs["y"].shape == (1, 64)
            assert ("dispatch_us" in result.timing) is not direct, result.timing  # the path meant
            assert result.timing["batch_wait_us"] < 300_000, result.timing  # at most half its 0.3 s


def test_models_together_run_no_more_workers_than_pool_max_workers(daemon_factory: Any) -> None:
    """Each config.toml is bounded (64 workers), but not how many models a repository holds: before
    pool.max_workers, three models of 2 workers started 6 processes under a cap of 5, and 1,000 models
    would have started 64,000. Now the model that does not fit fails alone, naming the setting, the
    others serve, and a reload once a removed model's workers have exited starts it."""
    models = ModelRepo("oi-max-workers-")
    for name in ("a", "b", "c"):  # loaded in this order: c is the one over the cap
        models.model(name, onnx_builders.matmul_model, config="workers = 2\n")
    daemon = daemon_factory(models.ready(), env={"OPENINFER_POOL_MAX_WORKERS": "5"})
    x = np.ones((1, 64), np.float32)
    try:
        with Client(daemon.address, timeout=10) as client:
            states = {m["name"]: m for m in client.models()}
            assert states["c"]["state"] == "failed", states["c"]
            assert "over the daemon's 5 (pool.max_workers" in (states["c"]["reason"] or ""), states["c"]
            assert len(client.status()["workers"]) == 4
            for name in ("a", "b"):
                assert client.infer(name, {"x": x}).outputs["y"].shape == (1, 64)
            shutil.rmtree(models.root / "a")
            client.reload()
            wait_for(lambda: len(client.status()["workers"]) == 2, 60, "a's workers to exit", daemon=daemon)
            client.reload()
            wait_for(lambda: {m["name"]: m["state"] for m in client.models()} == {"b": "ready", "c": "ready"}, 60, "c to load once a left room", daemon=daemon)
            assert client.infer("c", {"x": x}).outputs["y"].shape == (1, 64)
    finally:
        models.remove()


def test_reloads_that_leave_busy_workers_behind_stay_within_pool_max_workers(daemon_factory: Any) -> None:
    """A retiring version's busy workers run on until their requests end (max_compute_ms, up to ~25 days
    from a hostile config.toml). The cap counted only versions not retiring: four reloads of a model of
    2 busy workers ran 8 processes under pool.max_workers = 4 (attacker round 18). Now every live worker
    counts: a reload with no room fails, and the version serving keeps serving."""
    models = ModelRepo("oi-max-workers-busy-")
    path = models.model("spin", onnx_builders.busy_loop_model, config="workers = 2\nmax_compute_ms = 30000\n")
    # (drain_grace_s: the busy runs are not waited for when the test ends)
    daemon = daemon_factory(models.ready(), env={"OPENINFER_POOL_MAX_WORKERS": "4", "OPENINFER_SERVER_DRAIN_GRACE_S": "1"})
    spin = {"x": np.zeros(1, np.float32), "n": np.array(10**12, np.int64)}  # runs until its timeout stops it

    def keep_busy() -> None:
        with Client(daemon.address, timeout=15, direct=False) as busy:
            try:
                busy.infer("spin", spin)
            except OpenInferError:
                pass  # what the test waits out is the reloads, not this answer

    def busy_workers(count: int) -> None:
        for _ in range(2):
            threading.Thread(target=keep_busy, daemon=True).start()
        wait_for(lambda: sum(w["state"] == "busy" for w in client.status()["workers"]) >= count, 30, f"{count} busy workers", daemon=daemon)

    def touch(seconds: int) -> None:  # a new file, as far as a reload can tell
        os.utime(path, ns=(time.time_ns(), time.time_ns() + seconds * 10**9))

    try:
        with Client(daemon.address, timeout=20) as client:
            busy_workers(2)
            touch(1)
            assert client.reload()["replaced"] == ["spin:1"]
            wait_for(lambda: not client.status()["reloading"], 60, "the replacement to take over", daemon=daemon)
            busy_workers(4)  # the retiring version's two, still running, and the new version's two
            touch(2)
            changes = client.reload()
            assert changes["failed"] == ["spin:1"] and not changes["replaced"], changes
            reason = next(m["reason"] for m in client.models() if m["name"] == "spin")
            assert "pool.max_workers" in reason and "still serving the previous file" in reason, reason
            assert len(client.status()["workers"]) == 4, client.status()["workers"]
    finally:
        models.remove()
