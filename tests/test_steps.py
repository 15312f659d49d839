"""Processing steps (daemon/steps/): a model's pre and post steps run inside its sandboxed worker.

magika with its built-in steps is checked against the `magika` package itself, in process, on real files
that nobody here wrote (the Python installation this suite runs on: modules, compiled extensions, data
files, licences, headers, images); a repository's own steps module is checked for what clients see
(metadata, answers, typed errors naming the step) on both paths into a worker."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon
from openinfer.client import Client, OpenInferError
from real_files import real_files
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

@pytest.fixture(scope="module")
def magika_daemon() -> Iterator[RunningDaemon]:
    repo = ModelRepo("oi-steps-magika-")
    repo.examples(["magika"])
    running = start_daemon(repo.ready())
    yield running
    running.stop()
    cleanup_workdir(running)
    repo.remove()


def verdict(result: Any) -> tuple[str, str, float]:
    out = result.outputs
    return out["label"].item().decode(), out["group"].item().decode(), float(out["score"])


def test_magika_steps_answer_as_the_magika_library_does_on_real_files(magika_daemon: RunningDaemon) -> None:
    from magika import Magika

    files = real_files()
    assert len(files) >= 200, len(files)
    library = Magika()
    kinds = set()
    with Client(magika_daemon.address, timeout=30) as client:
        assert client.infer("magika", {"bytes": b"%PDF-1.7\n" + bytes(range(256)) * 20}).text("label") == str(library.identify_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 20).output.label)
        for path in files:
            data = path.read_bytes()
            expected = library.identify_bytes(data)
            label, group, score = verdict(client.infer("magika", {"bytes": data}))
            assert (label, group) == (str(expected.output.label), expected.output.group), path
            assert score == pytest.approx(expected.score, rel=1e-5, abs=1e-6), path
            kinds.add(label)
    # Real variety, not 240 text files: the sample spans many content types (and the small-file rules).
    assert len(kinds) >= 10, sorted(kinds)


def test_magika_steps_through_the_front_door_and_for_tiny_and_empty_files(magika_daemon: RunningDaemon) -> None:
    from magika import Magika

    library = Magika()
    samples = [b"", b"abc", b"\xff\xfe\x00", b"   \n\t   \n", b"  x  ", Path(sys.executable).read_bytes()[:5000], b"%PDF-1.4\n" + bytes(range(256)) * 8]
    with Client(magika_daemon.address, timeout=30, direct=False) as client:
        for data in samples:
            expected = library.identify_bytes(data)
            label, group, score = verdict(client.infer("magika", {"bytes": data}))
            assert (label, group) == (str(expected.output.label), expected.output.group), data[:20]
            assert score == pytest.approx(expected.score, rel=1e-5, abs=1e-6)


def test_a_model_with_steps_is_described_as_clients_see_it(magika_daemon: RunningDaemon) -> None:
    with Client(magika_daemon.address) as client:
        meta = client.metadata("magika")
    assert meta["inputs"] == [{"name": "bytes", "datatype": "BYTES", "shape": []}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "group", "mime_type", "score"]
    with Client(magika_daemon.address) as client, pytest.raises(OpenInferError) as caught:
        client.infer("magika", {"bytes": np.zeros((1, 2048), np.int32)})  # the model's own tensor: not what the steps take
    assert caught.value.code == "INVALID_ARGUMENT" and "BYTES" in str(caught.value)


REPOSITORY_STEPS = '''
import numpy as np
from openinfer.daemon.steps.contract import Answer

INPUTS = [{"name": "text", "datatype": "BYTES", "shape": []}]
OUTPUTS = [{"name": "total", "datatype": "FP32", "shape": []}, {"name": "echo", "datatype": "BYTES", "shape": []}]
_scale = 1.0

def setup(files):
    global _scale
    _scale = float(files["scale.txt"])

def pre(inputs):
    text = inputs["text"].item().decode("utf-8")  # not UTF-8: UnicodeDecodeError, the caller's mistake
    if text == "answer-yourself":
        return Answer(total=-1.0, echo=text)
    if text == "wrong-shape":
        return {"x": np.zeros((2, 3), np.float32)}
    if text == "int-echo":
        return Answer(total=1.0, echo=5)  # not bytes: would have gone out as five zero bytes
    if text == "text-x":
        return {"x": "abc"}
    values = [float(v) for v in text.split(",")]  # "a,b": ValueError, the caller's mistake
    x = np.zeros((1, 64), np.float32)
    x[0, : len(values)] = values
    return {"x": x * _scale}

def post(outputs):
    y = outputs["y"]
    if not np.isfinite(y).all():
        raise RuntimeError("the model gave a non-finite value")
    return {"total": float(y.sum()), "echo": "ok"}
'''


@pytest.fixture(scope="module")
def steps_repo() -> Iterator[Path]:
    repo = ModelRepo("oi-steps-repo-")
    repo.model("summed", onnx_builders.matmul_model, config='workers = 1\n\n[steps]\nmodule = "steps.py"\nfiles = ["scale.txt"]\n')
    (repo.root / "summed" / "steps.py").write_text(REPOSITORY_STEPS)
    (repo.root / "summed" / "scale.txt").write_text("2.0\n")
    root = repo.ready()
    yield root
    repo.remove()


@pytest.fixture(scope="module")
def steps_daemon(steps_repo: Path) -> Iterator[RunningDaemon]:
    running = start_daemon(steps_repo)
    yield running
    running.stop()
    cleanup_workdir(running)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_a_repository_steps_module_runs_around_its_model(steps_daemon: RunningDaemon, steps_repo: Path, direct: bool) -> None:
    from reference import run_reference

    x = np.zeros((1, 64), np.float32)
    x[0, :3] = [1.5, -2.0, 4.0]
    want = float(run_reference(steps_repo / "summed" / "1" / "model.onnx", {"x": x * 2.0})["y"].sum())  # scale.txt says 2
    with Client(steps_daemon.address, direct=direct) as client:
        result = client.infer("summed", {"text": "1.5,-2,4"})
        assert float(result.outputs["total"]) == pytest.approx(want, rel=1e-5)
        assert result.outputs["echo"].item() == b"ok"
        answered = client.infer("summed", {"text": "answer-yourself"})  # the pre step answered: no model run
        assert float(answered.outputs["total"]) == -1.0 and answered.outputs["echo"].item() == b"answer-yourself"


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_a_step_that_fails_answers_a_typed_error_naming_the_step_and_the_worker_serves_on(steps_daemon: RunningDaemon, direct: bool) -> None:
    cases = [
        ({"text": "1,a"}, "INVALID_ARGUMENT", "the pre step of steps.py failed: ValueError"),
        ({"text": b"\xff\xfe"}, "INVALID_ARGUMENT", "the pre step of steps.py failed: UnicodeDecodeError"),
        ({"text": "inf,1"}, "INTERNAL", "the post step of steps.py failed: RuntimeError: the model gave a non-finite value"),
        ({"text": "wrong-shape"}, "INTERNAL", "the model refused what the pre step of steps.py made ('x' [2, 3])"),  # the step's fault
        ({"text": "int-echo"}, "INTERNAL", "the pre step of steps.py: output 'echo' is not BYTES"),  # not the caller's
        ({"text": "text-x"}, "INTERNAL", "the pre step of steps.py gave the model input 'x' that is not FP32"),
    ]
    with Client(steps_daemon.address, direct=direct) as client:
        pids = {w["pid"] for w in client.status()["workers"]}
        for feed, code, words in cases:
            with pytest.raises(OpenInferError) as caught:
                client.infer("summed", feed)
            assert caught.value.code == code and words in str(caught.value), (feed, caught.value.code, str(caught.value))
        assert float(client.infer("summed", {"text": "1"}).outputs["total"]) != 0.0
        assert {w["pid"] for w in client.status()["workers"]} == pids  # nothing was restarted
        with pytest.raises(OpenInferError) as refused:  # an int is no BYTES element: refused before sending
            client.infer("summed", {"text": np.array(5, dtype=object)})
        assert refused.value.code == "INVALID_ARGUMENT" and "must be bytes or str" in str(refused.value)


def test_steps_configuration_is_checked_where_it_is_read(tmp_path: Path) -> None:
    from openinfer.daemon.modelstore.modelconfig import ConfigError, parse_model_config

    path = tmp_path / "config.toml"
    cases = {
        '[steps]\nmodule = "openinfer:nope"\n': "not a built-in",
        '[steps]\nmodule = "../steps.py"\n': "plain .py file name",
        '[steps]\nmodule = "sub/steps.py"\n': "plain .py file name",
        '[steps]\nmodule = ".hidden.py"\n': "plain .py file name",
        '[steps]\nfiles = ["a.txt"]\n': "`steps.module` is required",
        '[steps]\nmodule = "steps.py"\nfiles = ["../etc/passwd"]\n': "not a plain file name",
        '[steps]\nmodule = "steps.py"\nrun = "x"\n': "unknown key `steps.run`",
        '[steps]\nmodule = "steps.py"\nfiles = ["a.txt", "a.txt"]\n': "lists a file twice",
        '[steps]\nmodule = "openinfer:magika"\n[batching]\nmax_batch_size = 4\n': "cannot batch yet",
    }
    for text, words in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
            parse_model_config(path)
    path.write_text('[steps]\nmodule = "openinfer:magika"\n')
    steps = parse_model_config(path).steps
    assert steps is not None and steps.builtin == "magika"


def test_a_steps_module_that_cannot_load_fails_its_model_with_the_reason(tmp_path: Path) -> None:
    repo = ModelRepo("oi-steps-broken-")
    config = 'workers = 1\n[steps]\nmodule = "steps.py"\n'
    repo.model("syntax", onnx_builders.matmul_model, config=config)
    (repo.root / "syntax" / "steps.py").write_text("def pre(inputs:\n")
    repo.model("nothing", onnx_builders.matmul_model, config=config)
    (repo.root / "nothing" / "steps.py").write_text("X = 1\n")
    repo.model("linked", onnx_builders.matmul_model, config=config)
    (repo.root / "linked" / "real.py").write_text("def post(outputs):\n    return outputs\nOUTPUTS = [{'name': 'y', 'datatype': 'FP32', 'shape': [-1, 64]}]\n")
    os.symlink("real.py", repo.root / "linked" / "steps.py")
    repo.model("twice", onnx_builders.matmul_model, config=config)  # two outputs by one name: no client could pick one
    (repo.root / "twice" / "steps.py").write_text("OUTPUTS = [{'name': 'out', 'datatype': 'BYTES', 'shape': []}, {'name': 'out', 'datatype': 'FP32', 'shape': []}]\ndef post(outputs):\n    return {'out': b''}\n")
    repo.model("good", onnx_builders.matmul_model, config="workers = 1\n")
    running = start_daemon(repo.ready())
    try:
        rows = {r["name"]: r for r in running.client().models()}
        assert rows["good"]["state"] == "ready", rows["good"]
        reasons = {name: str(rows[name].get("error") or rows[name].get("reason") or rows[name]) for name in ("syntax", "nothing", "linked", "twice")}
        assert "names a tensor twice: ['out']" in reasons["twice"], reasons
        assert "SyntaxError" in reasons["syntax"], reasons
        assert "defines neither `pre` nor `post`" in reasons["nothing"], reasons
        assert "symlink" in reasons["linked"] or "Too many levels" in reasons["linked"], reasons
    finally:
        running.stop()
        cleanup_workdir(running)
        repo.remove()


def test_a_reload_after_the_steps_module_changed_serves_the_new_steps() -> None:
    """The model file and config.toml are unchanged; only steps.py is edited: SIGHUP replaces the workers."""
    import signal

    from daemon_harness import wait_for

    module = 'INPUTS = [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]\nOUTPUTS = [{"name": "tag", "datatype": "BYTES", "shape": []}]\n\ndef post(outputs):\n    return {"tag": %r}\n'
    repo = ModelRepo("oi-steps-reload-")
    repo.model("tagged", onnx_builders.matmul_model, config='workers = 1\n[steps]\nmodule = "steps.py"\n')
    (repo.root / "tagged" / "steps.py").write_text(module % "first")
    running = start_daemon(repo.ready())
    try:
        client = running.client()
        x = np.ones((1, 64), np.float32)
        assert client.infer("tagged", {"x": x}).outputs["tag"].item() == b"first"
        (repo.root / "tagged" / "steps.py").write_text(module % "second, longer")
        os.chmod(repo.root / "tagged" / "steps.py", 0o644)
        os.kill(running.process.pid, signal.SIGHUP)
        wait_for(lambda: client.infer("tagged", {"x": x}).outputs["tag"].item() == b"second, longer", 60, "the edited steps serving")
    finally:
        running.stop()
        cleanup_workdir(running)
        repo.remove()


def test_a_drive_step_that_swallows_the_deadline_stop_is_still_answered_deadline_exceeded() -> None:
    """The worker stops a run at the request's deadline by making the model's next call fail; a drive
    step that catches that and returns anyway must not turn a cut-short loop into a success (nor a cached
    answer). Found by an attacker; on the direct path, where the worker stops runs itself."""
    module = (
        "import numpy as np\n"
        "INPUTS = [{'name': 'x', 'datatype': 'FP32', 'shape': [-1, 64]}]\n"
        "OUTPUTS = [{'name': 'calls', 'datatype': 'INT64', 'shape': []}]\n"
        "def drive(inputs, model):\n"
        "    calls = 0\n"
        "    while True:\n"
        "        try:\n"
        "            model({'x': inputs['x']})\n"
        "        except Exception:\n"
        "            return {'calls': calls}  # swallowed: 'done'\n"
        "        calls += 1\n"
    )
    repo = ModelRepo("oi-steps-swallow-")
    repo.model("looping", onnx_builders.matmul_model, config='workers = 1\n[steps]\nmodule = "steps.py"\n\n[cache]\n')
    (repo.root / "looping" / "steps.py").write_text(module)
    running = start_daemon(repo.ready())
    try:
        with Client(running.address, timeout=0.3) as client:
            for _ in range(2):  # the second would be a cache hit if the first had been kept
                with pytest.raises(OpenInferError) as caught:
                    client.infer("looping", {"x": np.ones((1, 64), np.float32)})
                assert caught.value.code == "DEADLINE_EXCEEDED", str(caught.value)
    finally:
        running.stop()
        cleanup_workdir(running)
        repo.remove()
