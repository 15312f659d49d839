"""Chains (`[chain]` in a model's config.toml): several models of the repository run as one request, in one
sandboxed worker, by the chain's drive step, each member on its own shared weights; the reply says how
long each member ran. Checked against the members run one after the other in process."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon, wait_for, world_readable_dir
from exposition import free_port, parse, scrape, value
from openinfer.client import Client, OpenInferError
from reference import run_reference
from repo_builder import ModelRepo, make_world_readable

pytestmark = pytest.mark.live

CHAIN_STEPS = '''
import numpy as np

INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
OUTPUTS = [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}, {"name": "kept", "datatype": "INT64", "shape": []}]

def drive(inputs, models):
    first = models["first"]({"x": inputs["x"]})["y"]
    keep = first.max(axis=1) > 0  # the rows the first model passes on, as a detector hands boxes on
    second = models["second"]({"x": first[keep]})["y"] if keep.any() else np.zeros((0, 64), np.float32)
    return {"y": second, "kept": int(keep.sum())}
'''

SNOOP_STEPS = '''
import numpy as np

INPUTS = [{{"name": "which", "datatype": "INT64", "shape": []}}]
OUTPUTS = [{{"name": "size", "datatype": "INT64", "shape": []}}]
_seen = 0

def setup(files):  # runs after Landlock, under the boot policy: files in the worker's view can be read
    global _seen
    with open({path!r}, "rb") as f:
        _seen = len(f.read())

def drive(inputs, models):  # runs under the serve policy: no file can be opened at all
    if int(inputs["which"]) == 1:
        open({path!r}, "rb").read()
    return {{"size": _seen}}
'''

PARALLEL_STEPS = '''
import threading

INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
OUTPUTS = [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}]

def drive(inputs, models):  # both models at once: onnxruntime lets the other thread run meanwhile
    out = {}
    def run(name):
        out[name] = models[name]({"x": inputs["x"]})["y"]
    threads = [threading.Thread(target=run, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"y": out["first"] + out["second"]}
'''

CHAIN_CONFIG = 'workers = 1\n\n[chain]\nmodels = ["first", "second"]\n\n[steps]\nmodule = "steps.py"\n'
# Each model names the chains that may run it (round 35).
MEMBER_CONFIG = 'workers = 1\nchains = ["both", "parallel", "snoop_member", "snoop_bystander"]\n'


def chained(repo: Path, x: np.ndarray) -> tuple[np.ndarray, int]:
    first = run_reference(repo / "first" / "1" / "model.onnx", {"x": x})["y"]
    keep = first.max(axis=1) > 0
    return run_reference(repo / "second" / "1" / "model.onnx", {"x": first[keep]})["y"], int(keep.sum())


def chain_of_two(prefix: str) -> ModelRepo:
    """`first` and `second` (tiny models, one worker each) and the chain `both` that runs them (CHAIN_STEPS)."""
    repo = ModelRepo(prefix)
    repo.model("first", lambda path: onnx_builders.matmul_model(path, seed=11), config=MEMBER_CONFIG)
    repo.model("second", lambda path: onnx_builders.matmul_model(path, seed=12), config=MEMBER_CONFIG)
    repo.config("both", CHAIN_CONFIG)
    (repo.root / "both" / "steps.py").write_text(CHAIN_STEPS)
    return repo


@pytest.fixture
def fresh_chain() -> Iterator[Path]:
    """chain_of_two in a repository of its own, for a test that changes it."""
    repo = chain_of_two("oi-chain-fresh-")
    yield repo.ready()
    repo.remove()


@pytest.fixture(scope="module")
def chain_repo() -> Iterator[Path]:
    repo = chain_of_two("oi-chain-")
    repo.model("bystander", lambda path: onnx_builders.matmul_model(path, seed=13), config="workers = 1\n")  # in no chain: no chain may read it
    repo.config("parallel", CHAIN_CONFIG)
    (repo.root / "parallel" / "steps.py").write_text(PARALLEL_STEPS)
    for name, target in (("snoop_member", "first"), ("snoop_bystander", "bystander")):
        repo.config(name, CHAIN_CONFIG)
        (repo.root / name / "steps.py").write_text(SNOOP_STEPS.format(path=str(repo.root / target / "1" / "model.onnx")))
    yield repo.ready()
    repo.remove()


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def chain_daemon(chain_repo: Path) -> Iterator[RunningDaemon]:
    # The tiny members' weights shared too; metrics for the per-member figures.
    running = start_daemon(chain_repo, env={"OPENINFER_POOL_SHARE_MIN_BYTES": "0", "OPENINFER_METRICS_LISTEN": f"127.0.0.1:{METRICS_PORT}"})
    yield running
    running.stop()
    cleanup_workdir(running)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_a_chain_runs_its_models_as_one_request_equal_to_running_them_in_turn(chain_daemon: RunningDaemon, chain_repo: Path, direct: bool) -> None:
    rng = np.random.default_rng(5)
    with Client(chain_daemon.address, direct=direct) as client:
        for rows in (1, 4, 9):
            x = rng.standard_normal((rows, 64)).astype(np.float32)
            want, kept = chained(chain_repo, x)
            result = client.infer("both", {"x": x})
            assert int(result.outputs["kept"]) == kept
            np.testing.assert_allclose(result.outputs["y"], want, rtol=1e-5, atol=1e-5)
            # One timing breakdown per member: each ran once, and their times are within the request's compute.
            assert result.stages is not None and set(result.stages) == {"first", "second"}
            assert result.stages["first"]["runs"] == 1 and result.stages["second"]["runs"] == (1 if kept else 0)
            assert 0 < result.stages["first"]["compute_us"] <= result.timing["compute_us"]
        # The members serve on their own too, and say nothing of stages.
        alone = client.infer("first", {"x": x})
        np.testing.assert_allclose(alone.outputs["y"], run_reference(chain_repo / "first" / "1" / "model.onnx", {"x": x})["y"], rtol=1e-5, atol=1e-5)
        assert alone.stages is None


def test_the_daemon_adds_up_each_members_time_over_both_paths(chain_daemon: RunningDaemon) -> None:
    """Accounting per member: the daemon's books (stats, Prometheus) hold exactly what the replies said each
    member ran, whichever path the requests took (the direct path's through the worker's ledger)."""
    rng = np.random.default_rng(8)

    def books() -> dict[str, Any]:
        with Client(chain_daemon.address) as admin:
            return dict(admin.stats()["models"]["both"].get("chain", {}).get("1", {}))

    before = books()
    replies = []
    for direct in (True, False):
        with Client(chain_daemon.address, direct=direct) as client:
            for rows in (1, 3, 5):
                replies.append(client.infer("both", {"x": rng.standard_normal((rows, 64)).astype(np.float32)}))
    after = books()
    for member in ("first", "second"):
        was = before.get(member, {"requests": 0, "runs": 0, "compute_ms": 0.0})
        assert after[member]["requests"] - was["requests"] == len(replies)
        assert after[member]["runs"] - was["runs"] == sum(r.stages[member]["runs"] for r in replies)
        assert after[member]["compute_ms"] - was["compute_ms"] == pytest.approx(sum(r.stages[member]["compute_us"] for r in replies) / 1000, abs=0.01)
    samples = parse(scrape(f"http://127.0.0.1:{METRICS_PORT}/metrics"))
    for member in ("first", "second"):
        assert value(samples, "openinfer_chain_model_runs", "openinfer_chain_model_runs_total", model="both", version="1", member=member) == after[member]["runs"]


def test_a_chain_that_runs_its_models_at_the_same_time_is_served_and_counted(chain_daemon: RunningDaemon, chain_repo: Path) -> None:
    """A drive step may run its models in threads at once, so the members' times add up to more than the
    request's compute time; that is no lie (found by an attacker: such an honest worker was retired, and
    the model crash-looped to UNAVAILABLE)."""
    x = np.random.default_rng(3).standard_normal((16384, 64)).astype(np.float32)
    want = sum(run_reference(chain_repo / name / "1" / "model.onnx", {"x": x})["y"] for name in ("first", "second"))
    replies = []
    with Client(chain_daemon.address, timeout=30) as admin:
        pid = next(w["pid"] for w in admin.status()["workers"] if w["model"] == "parallel")
        before = dict(admin.stats()["models"].get("parallel", {}).get("chain", {}).get("1", {}))
        for direct in (True, False):
            with Client(chain_daemon.address, direct=direct, timeout=30) as client:
                for _ in range(4):
                    result = client.infer("parallel", {"x": x})
                    np.testing.assert_allclose(result.outputs["y"], want, rtol=1e-4, atol=1e-3)
                    replies.append(result)
        after = admin.stats()["models"]["parallel"]["chain"]["1"]
        assert next(w["pid"] for w in admin.status()["workers"] if w["model"] == "parallel") == pid  # never retired
    assert any(sum(r.stages[m]["compute_us"] for m in r.stages) > r.timing["compute_us"] for r in replies), "the models never ran at once: the case is not tested"
    for member in ("first", "second"):
        assert after[member]["runs"] - before.get(member, {}).get("runs", 0) == len(replies)
    assert "retiring it" not in chain_daemon.log_text()


def test_a_chain_is_described_and_listed_as_clients_and_operators_see_it(chain_daemon: RunningDaemon) -> None:
    with Client(chain_daemon.address) as client:
        meta = client.metadata("both")
        status = client.status()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["y", "kept"]
    row = next(m for m in status["models"] if m["name"] == "both")
    assert row["state"] == "ready" and row["chain"] == ["first:1", "second:1"]
    # Loaded once and shared: the chain's worker maps its members' prepared weights, not copies of its own.
    members = {m["name"]: m for m in status["models"]}
    assert members["first"]["sharing"] == "shared" and members["second"]["sharing"] == "shared"
    chain_pid = next(w["pid"] for w in status["workers"] if w["model"] == "both")
    with open(f"/proc/{chain_pid}/maps") as maps:
        weights = {line.split()[-1] for line in maps if line.rstrip().endswith("/weights.bin")}
    assert len(weights) == 2, weights  # both members' prepared weights.bin, mapped, not loaded into private memory


def test_a_chain_survives_its_worker_being_killed(chain_daemon: RunningDaemon, chain_repo: Path) -> None:
    x = np.ones((2, 64), np.float32)
    want, _ = chained(chain_repo, x)
    with Client(chain_daemon.address, timeout=30) as client:
        pid = next(w["pid"] for w in client.status()["workers"] if w["model"] == "both")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: any(w["model"] == "both" and w["state"] == "ready" and w["pid"] != pid for w in client.status()["workers"]), 60, "a new chain worker")
        np.testing.assert_allclose(client.infer("both", {"x": x}).outputs["y"], want, rtol=1e-5, atol=1e-5)


def test_a_chains_steps_see_its_members_files_and_no_other_models(chain_daemon: RunningDaemon, chain_repo: Path) -> None:
    """Landlock grants a chain's worker its members' directories only: a hostile chain's steps cannot read
    the model of a bystander the same repository serves (world-readable, so only the sandbox stops it),
    and once serving, under the serve policy, they open no file at all."""
    with Client(chain_daemon.address, timeout=30) as client:
        assert int(client.infer("snoop_member", {"which": np.array(0, np.int64)}).outputs["size"]) == (chain_repo / "first" / "1" / "model.onnx").stat().st_size
        with pytest.raises(OpenInferError) as at_serve:
            client.infer("snoop_member", {"which": np.array(1, np.int64)})
        assert at_serve.value.code == "INTERNAL" and "PermissionError" in str(at_serve.value), str(at_serve.value)
        bystander = model_status(client, "snoop_bystander")
    assert bystander["state"] == "failed" and "PermissionError" in bystander["reason"] and "Permission denied" in bystander["reason"], bystander


def test_chain_configuration_is_checked_where_it_is_read(tmp_path: Path) -> None:
    from openinfer.daemon.modelstore.modelconfig import ConfigError, parse_model_config

    path = tmp_path / "config.toml"
    steps = '[steps]\nmodule = "steps.py"\n'
    cases = {
        '[chain]\nmodels = ["a"]\n': "needs `[steps]",
        '[chain]\nmodels = []\n' + steps: "non-empty list",
        '[chain]\nmodels = ["../a"]\n' + steps: "not a model name",
        '[chain]\nmodels = ["a", "a"]\n' + steps: "names a model twice",
        '[chain]\nmodels = ["a"]\nthen = 1\n' + steps: "unknown key `chain.then`",
        '[chain]\nmodels = ["a"]\n[batching]\nmax_batch_size = 2\n' + steps: "cannot batch",
        'chains = ["c"]\n[chain]\nmodels = ["a"]\n' + steps: "never another chain's model",
        'chains = "c"\n': "`chains` must be a list",
        'chains = ["c", "c"]\n': "`chains` names a model twice",
        'chains = ["../c"]\n': "`chains` entry '../c' is not a model name",
    }
    for text, words in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
            parse_model_config(path)


def model_status(client: Client, name: str) -> dict[str, Any]:
    return next(m for m in client.status()["models"] if m["name"] == name)


def test_a_chain_that_cannot_run_fails_with_the_reason_and_the_rest_serves(daemon_factory: Any) -> None:
    repo = ModelRepo("oi-chain-bad-")
    try:
        repo.model("plain", onnx_builders.matmul_model, config='workers = 1\nchains = ["missing", "on_broken", "nested", "undriven"]\n')
        repo.model("broken", lambda path: path.write_bytes(b"not onnx"), config="workers = 1\n")
        for name, members in (("missing", '["plain", "nowhere"]'), ("on_broken", '["plain", "broken"]'), ("nested", '["plain", "missing"]'), ("undriven", '["plain"]')):
            repo.config(name, f'workers = 1\n\n[chain]\nmodels = {members}\n\n[steps]\nmodule = "steps.py"\n')
            (repo.root / name / "steps.py").write_text(CHAIN_STEPS if name != "undriven" else "INPUTS = [{\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": [-1, 64]}]\ndef pre(inputs):\n    return inputs\n")
        repo.config("with_version", CHAIN_CONFIG)
        onnx_builders.matmul_model((repo.root / "with_version" / "1").mkdir(parents=True) or repo.root / "with_version" / "1" / "model.onnx")
        running = daemon_factory(repo.ready())
        with Client(running.address, timeout=30) as client:
            wait_for(lambda: all(model_status(client, name)["state"] == "failed" for name in ("missing", "on_broken", "nested", "undriven")), 60, "the chains that cannot run to fail")
            assert "'nowhere' is not in the repository" in model_status(client, "missing")["reason"]
            assert "broken" in model_status(client, "on_broken")["reason"]
            assert "is itself a chain" in model_status(client, "nested")["reason"]
            assert "defines no `drive(inputs, models)`" in model_status(client, "undriven")["reason"]
            reasons = str(client.status())
            assert "has `[chain]` and a <version>/model.onnx" in reasons, reasons
            assert client.infer("plain", {"x": np.zeros((1, 64), np.float32)}).outputs["y"].shape == (1, 64)
            with pytest.raises(OpenInferError) as caught:
                client.infer("missing", {"x": np.zeros((1, 64), np.float32)})
            assert caught.value.code == "UNAVAILABLE" and "nowhere" in str(caught.value)
    finally:
        repo.remove()


def test_a_reload_that_finds_a_new_member_file_replaces_the_chain(daemon_factory: Any, fresh_chain: Path) -> None:
    root = fresh_chain
    running = daemon_factory(root)
    x = np.ones((3, 64), np.float32)
    with Client(running.address, timeout=30) as client:
        before = client.infer("both", {"x": x}).outputs["y"].copy()
        second = root / "second" / "1" / "model.onnx"
        onnx_builders.matmul_model(second.with_name("new.onnx"), seed=99)
        os.replace(second.with_name("new.onnx"), second)
        make_world_readable(root)
        want, _ = chained(root, x)
        assert not np.allclose(want, before)
        client.reload()
        wait_for(lambda: np.allclose(client.infer("both", {"x": x}).outputs["y"], want, rtol=1e-5, atol=1e-5), 60, "the chain to answer with the new member")


def test_a_workers_report_of_stages_is_checked_where_it_arrives() -> None:
    """A worker may be compromised: what it says of a chain's members must name exactly those members, each
    with a count and a duration, and a worker that serves no chain has none to report."""
    import time

    import msgpack

    from openinfer.daemon.workerpool.worker_inbound import BadWorkerMessage, parse_result

    now = time.monotonic_ns()
    data = np.zeros((1, 2), np.float32).tobytes()
    meta = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2]}], "recv_ns": now, "send_ns": now, "prep_us": 1.0, "compute_us": 9.0, "encode_us": 1.0, "cpu_us": 9.0}

    def parsed(stages: Any, members: tuple[str, ...] = ("a", "b")) -> Any:
        return parse_result([b"R", msgpack.packb({**meta, "stages": stages}), data], now, ["y"], members).stages

    good = {"a": {"runs": 2, "compute_us": 5.0}, "b": {"runs": 0, "compute_us": 0.0}}
    assert parsed(good) == good
    lies = [
        {"a": good["a"]},  # a member left out
        {**good, "c": {"runs": 1, "compute_us": 1.0}},  # a model that is no member
        {**good, "a": {"runs": -1, "compute_us": 1.0}},
        {**good, "a": {"runs": 1 << 40, "compute_us": 1.0}},
        {**good, "a": {"runs": "1", "compute_us": 1.0}},
        {**good, "a": {"runs": 1, "compute_us": float("nan")}},
        {**good, "a": {"runs": 1, "compute_us": 1.0, "note": "x"}},
        {**good, "a": {"runs": 1, "compute_us": 50.0}},  # more time in its models than the request computed (9 us)
        [good],
    ]
    for lie in lies:
        with pytest.raises(BadWorkerMessage):
            parsed(lie)
    with pytest.raises(BadWorkerMessage, match="serves no chain"):
        parsed(good, members=())


@pytest.mark.parametrize("removed", ["model", "version"])
def test_a_chain_stops_when_one_of_its_models_is_removed(daemon_factory: Any, fresh_chain: Path, removed: str) -> None:
    """An operator who removes a model - or the version a chain runs - from the repository must not find it
    still answering inside a chain (found by attackers: the chain served the removed model's weights, then
    crash-looped on respawn; the same by removing version 1 beside a version 2 that does not load)."""
    import shutil

    root = fresh_chain
    running = daemon_factory(root)
    x = np.ones((1, 64), np.float32)
    with Client(running.address, timeout=30) as client:
        assert client.infer("both", {"x": x}).stages is not None
        if removed == "model":
            shutil.rmtree(root / "second")
        else:
            shutil.rmtree(root / "second" / "1")
            (root / "second" / "2").mkdir(mode=0o755)
            (root / "second" / "2" / "model.onnx").write_bytes(b"not a model")
            make_world_readable(root)
        client.reload()
        with pytest.raises(OpenInferError) as caught:
            client.infer("both", {"x": x})
        assert caught.value.code in ("NOT_FOUND", "UNAVAILABLE"), str(caught.value)
        row = model_status(client, "both")
        assert row["state"] == "failed" and "second:1 was removed" in row["reason"], row
        wait_for(lambda: not any(w["model"] in ("both", "second") and w["state"] != "exited" for w in client.status()["workers"]), 30, "the chain's and the removed model's workers to exit")
        assert client.infer("first", {"x": x}).outputs["y"].shape == (1, 64)  # the rest serves


def test_a_drive_step_that_calls_a_model_without_end_is_stopped_with_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_MODEL_CALLS calls of one model in one request, the request fails RESOURCE_EXHAUSTED naming
    the step (found by an attacker: the honest count reached the supervisor and retired the worker as a
    liar). Here in process, with the bound lowered, on a stand-in for the model's session."""
    from openinfer.daemon.steps import runner as runner_module
    from openinfer.daemon.steps.contract import StepFailed
    from openinfer.daemon.steps.loader import LoadedSteps
    from openinfer.daemon.steps.runner import Stage, StepRunner

    class Echo:
        calls = 0

        def run(self, wanted: list[str], feed: dict[str, Any], run_options: Any = None) -> list[Any]:
            Echo.calls += 1
            if Echo.calls > 1000:  # no bound in the runner: fail here rather than loop for ever
                raise RuntimeError("the runner let the step call the model without end")
            return [feed["x"]]

    def drive(inputs: dict[str, Any], models: dict[str, Any]) -> dict[str, Any]:
        y = inputs["x"]
        while True:
            y = models["first"]({"x": y})["y"]

    monkeypatch.setattr(runner_module, "MAX_MODEL_CALLS", 10)
    spec = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    steps = LoadedSteps("steps.py", None, None, spec, [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}], drive)
    model = {"inputs": spec, "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}]}
    runner = StepRunner({"first": Stage.of(Echo(), model)}, steps, {"inputs": spec, "outputs": model["outputs"]})
    with pytest.raises(StepFailed) as caught:
        runner.run(["y"], {"x": np.zeros((1, 64), np.float32)})
    assert caught.value.code == "RESOURCE_EXHAUSTED" and "called the model first more than 10 times" in str(caught.value)


def _shared_chain(daemon_factory: Any, root: Path) -> tuple[RunningDaemon, Path]:
    """A daemon serving `root`'s chain with every model's weights shared (a cache of the test's own),
    once it has answered the chain."""
    cache = world_readable_dir("oi-chain-cache-")
    running = daemon_factory(root, env={"OPENINFER_SERVER_CACHE_DIR": str(cache), "OPENINFER_POOL_SHARE_MIN_BYTES": "0"})
    with Client(running.address, timeout=30) as client:
        assert client.infer("both", {"x": np.ones((1, 64), np.float32)}).stages is not None
    return running, cache


def _kill_the_chain_worker_and_wait_for_another(client: Client, running: RunningDaemon) -> None:
    (chain_worker,) = [w["pid"] for w in client.status()["workers"] if w["model"] == "both" and w["state"] != "exited"]
    os.kill(chain_worker, signal.SIGKILL)
    wait_for(lambda: any(w["model"] == "both" and w["state"] == "ready" and w["pid"] != chain_worker for w in client.status()["workers"]), 60, "a new chain worker", daemon=running)


def test_a_chain_still_serving_a_replaced_members_weights_keeps_them(daemon_factory: Any, fresh_chain: Path) -> None:
    """Round 33: a member replaced while the chain's own replacement fails (here its config.toml broken in
    the same edit: the chain keeps serving, as a broken directory keeps what it served) left the chain on
    the member's old version; once that version was released, the weights cache set its entry aside -
    no live version's own - and the chain's next worker could not start: "crash loop ... Landlock path
    '<cache>/<key>': No such file or directory", every request UNAVAILABLE. A chain's workers map its
    members' entries: those are kept."""
    root = fresh_chain
    running, cache = _shared_chain(daemon_factory, root)
    x = np.ones((1, 64), np.float32)
    try:
        with Client(running.address, timeout=30) as client:
            onnx_builders.matmul_model(root / "first" / "1" / "model.onnx", seed=99)
            (root / "both" / "config.toml").write_text("workers = [\n")  # the chain's replacement cannot load
            make_world_readable(root)
            client.reload()
            wait_for(lambda: '"msg":"retired model released","model":"first:1"' in running.log_text(), 30, "the old first released", daemon=running)
            assert "reload failed" in model_status(client, "both")["reason"]  # the chain still serves, on the old first
            _kill_the_chain_worker_and_wait_for_another(client, running)
            assert client.infer("both", {"x": x}).stages is not None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_a_chain_whose_member_weights_fail_verification_serves_on_that_member_unshared(daemon_factory: Any, fresh_chain: Path) -> None:
    """Round 34: a chain's worker that found a member's prepared weights wrong exited "prepared artefact
    mismatch"; the supervisor logged "preparing again" for the chain - which has no weights of its own -
    prepared nothing and spawned nothing: the chain "ready" with no worker, every request expiring in its
    queue, a reload "unchanged". The member's entry goes aside and the chain's next worker loads that
    member unshared. Here `first`'s recorded check is replaced with `second`'s (a wrong entry)."""
    root = fresh_chain
    running, cache = _shared_chain(daemon_factory, root)
    x = np.ones((1, 64), np.float32)
    try:
        with Client(running.address, timeout=30) as client:
            dirs = {row["name"]: row for row in client.status()["models"]}
            assert dirs["first"]["sharing"] == "shared" and dirs["second"]["sharing"] == "shared", dirs
            entries = {json.loads((entry / "manifest.json").read_text())["source"].split("/")[-3]: entry for entry in cache.iterdir() if not entry.name.startswith(".")}
            shutil.copyfile(entries["second"] / "check.msgpack", entries["first"] / "check.msgpack")
            _kill_the_chain_worker_and_wait_for_another(client, running)
            got = client.infer("both", {"x": x})
            expected, _ = chained(root, x)
            np.testing.assert_allclose(got.outputs["y"], expected, rtol=1e-4, atol=1e-4)
            assert model_status(client, "first")["sharing"].startswith("off: its prepared weights failed verification"), model_status(client, "first")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_a_chain_on_a_superseded_member_version_serves_on_through_another_reload(daemon_factory: Any, fresh_chain: Path) -> None:
    """Round 34's suspicion, reproduced: a member's version 2 arrived while the chain's own replacement could
    not load (here its config.toml broken in the same edit); version 1 left once 2 served, the chain serving
    on, on version 1's files. The next reload - any SIGHUP, or one in the window before a chain's replacement
    is ready - dropped the chain: "its model second:1 was removed from the repository", which it was not. A
    chain stops only when a member's files are gone; until its replacement serves it runs the version it
    was built on, as a model serves its old version until the new one is ready."""
    root = fresh_chain
    running = daemon_factory(root)
    x = np.ones((1, 64), np.float32)
    with Client(running.address, timeout=30) as client:
        before = client.infer("both", {"x": x}).outputs["y"].copy()
        (root / "second" / "2").mkdir(mode=0o755)
        onnx_builders.matmul_model(root / "second" / "2" / "model.onnx", seed=99)
        (root / "second" / "config.toml").write_text(MEMBER_CONFIG + 'version_policy = "latest"\n')
        chain_config = (root / "both" / "config.toml").read_text()
        (root / "both" / "config.toml").write_text("workers = [\n")
        make_world_readable(root)
        client.reload()
        wait_for(lambda: '"msg":"version left: the newer one serves","model":"second:1"' in running.log_text(), 60, "second:1 to leave", daemon=running)
        client.reload()
        row = model_status(client, "both")
        assert row["state"] == "ready", row
        np.testing.assert_array_equal(client.infer("both", {"x": x}).outputs["y"], before)
        (root / "both" / "config.toml").write_text(chain_config)
        client.reload()
        second = run_reference(root / "second" / "2" / "model.onnx", {"x": run_reference(root / "first" / "1" / "model.onnx", {"x": x})["y"]})["y"]
        wait_for(lambda: np.allclose(client.infer("both", {"x": x}).outputs["y"], second, rtol=1e-4, atol=1e-4), 60, "the chain to run second:2", daemon=running)
