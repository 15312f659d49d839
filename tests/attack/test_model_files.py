"""Attacks through the model repository (issue #16, findings 9, 10 and 13), against a real sandboxed daemon.

A repository is a directory an operator drops files into; anyone who can place a file there must not be able
to make a worker read anything but that model's own files, with the worker user's rights:

- a `model.onnx` that is a symlink, or a file only root may read, must not be read (finding 9: the worker read
  the model as root, before dropping privileges, following symlinks);
- an initializer whose external data names a file outside the model's version directory (`../` traversal,
  an absolute path, a symlink, another model's weights, and the same hidden in a subgraph) must fail the
  load with a reason naming the tensor, and its bytes must never reach a client (finding 10: the file's
  bytes came back as the model's output) - with Landlock on, and with `sandbox.landlock = false`;
- a legitimate external-data file beside the model still loads and computes;
- a model the worker user cannot read fails with a reason naming the path, the user and what to change,
  instead of loading without shared weights (finding 13).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon, world_readable_dir
from openinfer.client import OpenInferError

pytestmark = pytest.mark.attack

COUNT = 16  # INT32 elements: the first 64 bytes of the targeted file
UP = "../" * 24  # more than enough to climb from any directory to /
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="workers drop to another uid only when the daemon runs as root")


def first_bytes(path: Path) -> bytes:
    return path.read_bytes()[: 4 * COUNT]


class Repository:
    """The hostile repository and the files its models try to reach."""

    def __init__(self, root: Path, outside: Path) -> None:
        self.root = root
        self.secret = outside / "secret.bin"  # world-readable, outside the repository
        # In the read set every worker had under Landlock (the dynamic linker's cache, next to /usr/lib):
        # reachable even with Landlock on, and readable by any user.
        self.system_file = Path("/etc/ld.so.cache")
        self.neighbour_weights = root / "good_external" / "1" / "weights.bin"
        self.root_only_model = outside / "root-only.onnx"
        self.good_weight = np.zeros(COUNT, np.float32)  # W of good_external, set when it is built


@pytest.fixture(scope="module")
def repository() -> Iterator[Repository]:
    root = world_readable_dir("oi-attack-repo-")
    outside = world_readable_dir("oi-attack-outside-")
    repo = Repository(root, outside)
    repo.secret.write_bytes(b"SECRET!!" * 64)
    _, repo.good_weight = onnx_builders.external_weights_model(root / "good_external" / "1" / "model.onnx", size=COUNT)
    onnx_builders.leaking_model(root / "leak_traversal" / "1" / "model.onnx", UP + str(repo.secret).lstrip("/"))
    onnx_builders.leaking_model(root / "leak_system" / "1" / "model.onnx", UP + str(repo.system_file).lstrip("/"))
    onnx_builders.leaking_model(root / "leak_absolute" / "1" / "model.onnx", str(repo.secret))
    onnx_builders.leaking_model(root / "leak_neighbour" / "1" / "model.onnx", UP + str(repo.neighbour_weights).lstrip("/"))
    onnx_builders.leaking_model(root / "leak_nested" / "1" / "model.onnx", UP + str(repo.secret).lstrip("/"), nested=True)
    onnx_builders.leaking_model(root / "leak_symlink" / "1" / "model.onnx", "data.bin")
    (root / "leak_symlink" / "1" / "data.bin").symlink_to(repo.secret)
    # Finding 9: a valid model only root may read, reached through a symlink and placed as a file.
    onnx_builders.matmul_model(repo.root_only_model, seed=9)
    (root / "symlinked_model" / "1").mkdir(parents=True)
    (root / "symlinked_model" / "1" / "model.onnx").symlink_to(repo.root_only_model)
    onnx_builders.matmul_model(root / "root_only" / "1" / "model.onnx", seed=9)
    for path in [*root.rglob("*"), *outside.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    repo.root_only_model.chmod(0o600)
    (root / "root_only" / "1" / "model.onnx").chmod(0o600)
    yield repo
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(outside, ignore_errors=True)


@pytest.fixture(scope="module", params=[True, False], ids=["landlock", "no-landlock"])
def daemon(request: pytest.FixtureRequest, repository: Repository) -> Iterator[RunningDaemon]:
    env = {"OPENINFER_SANDBOX_LANDLOCK": "true" if request.param else "false"}
    running = start_daemon(repository.root, env=env, timeout=180)
    yield running
    running.stop()
    cleanup_workdir(running)


def model_row(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    (row,) = [r for r in daemon.client().models() if r["name"] == name]
    return row


def leaked(daemon: RunningDaemon, name: str) -> bytes | None:
    """The bytes the model returns for a zero input (its external tensor's bytes), or None if refused."""
    try:
        result = daemon.client(timeout=20).infer(name, {"x": np.zeros(COUNT, np.int32)})
    except OpenInferError:
        return None
    return bytes(result.outputs["y"].tobytes())


def test_a_legitimate_external_data_file_loads_and_computes(daemon: RunningDaemon, repository: Repository) -> None:
    row = model_row(daemon, "good_external")
    assert row["state"] == "ready", row
    x = np.linspace(-1, 1, COUNT, dtype=np.float32)
    np.testing.assert_allclose(daemon.client().infer("good_external", {"x": x}).outputs["y"], x + repository.good_weight, rtol=1e-6)


@pytest.mark.parametrize(
    ("model", "target"),
    [
        ("leak_traversal", "secret"),
        ("leak_system", "system_file"),
        ("leak_absolute", "secret"),
        ("leak_neighbour", "neighbour_weights"),
        ("leak_nested", "secret"),
        ("leak_symlink", "secret"),
    ],
)
def test_external_data_outside_the_version_directory_fails_the_load_naming_the_tensor(daemon: RunningDaemon, repository: Repository, model: str, target: str) -> None:
    secret = first_bytes(getattr(repository, target))
    assert leaked(daemon, model) != secret, f"{model} returned the first bytes of {getattr(repository, target)}"
    row = model_row(daemon, model)
    assert row["state"] == "failed", row
    assert "'W'" in row["reason"] and "external data" in row["reason"], row["reason"]


@as_root
def test_a_symlinked_model_file_is_refused_and_never_read(daemon: RunningDaemon, repository: Repository) -> None:
    row = model_row(daemon, "symlinked_model")
    assert row["state"] == "failed", row
    assert "symlink" in row["reason"] and "model.onnx" in row["reason"], row["reason"]
    with pytest.raises(OpenInferError):
        daemon.client().infer("symlinked_model", {"x": np.ones((1, 64), np.float32)})


@as_root
def test_a_model_only_root_can_read_is_not_read_as_root(daemon: RunningDaemon, repository: Repository) -> None:
    row = model_row(daemon, "root_only")
    assert row["state"] == "failed", row
    path = repository.root / "root_only" / "1" / "model.onnx"
    assert str(path) in row["reason"] and "nobody" in row["reason"] and "Permission denied" in row["reason"], row["reason"]


@as_root
def test_a_model_the_worker_user_cannot_read_fails_instead_of_loading_without_shared_weights(daemon_factory: Any) -> None:
    """Finding 13: with the prepare helper and the workers reading through one function after the uid drop,
    a readable model gets shared weights and an unreadable one fails, saying why and what to change."""
    root = world_readable_dir("oi-attack-private-")
    try:
        onnx_builders.matmul_model(root / "readable" / "1" / "model.onnx", size=256)
        onnx_builders.matmul_model(root / "private" / "1" / "model.onnx", size=256)
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (root / "private").chmod(0o700)  # the model directory is private to root, the daemon's user
        daemon = daemon_factory(root, env={"OPENINFER_POOL_SHARE_MIN_BYTES": "0"}, timeout=180)
        rows = {r["name"]: r for r in daemon.client().models()}
        assert rows["readable"]["state"] == "ready" and rows["readable"]["sharing"] == "shared", rows["readable"]
        private = rows["private"]
        assert private["state"] == "failed", private
        reason = private["reason"]
        assert str(root / "private" / "1" / "model.onnx") in reason, reason
        assert "nobody" in reason and "Permission denied" in reason and "sandbox.worker_user" in reason, reason
    finally:
        shutil.rmtree(root, ignore_errors=True)



@as_root
def test_no_landlock_view_holds_the_repository_the_cache_or_another_model(daemon_factory: Any) -> None:
    """Landlock grants whole trees. Started from the directory that holds the repository (`python -m` puts
    the working directory on sys.path), the workers' read set used to include it, so every worker could
    read every model; the prepare helper's held the whole cache (every model's prepared weights)."""
    base = world_readable_dir("oi-attack-view-")
    repo, cache = base / "models", base / "cache"
    try:
        onnx_builders.matmul_model(repo / "first" / "1" / "model.onnx", size=256)
        onnx_builders.matmul_model(repo / "second" / "1" / "model.onnx", size=256, seed=1)
        cache.mkdir()
        for path in base.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        daemon = daemon_factory(repo, env={"OPENINFER_POOL_SHARE_MIN_BYTES": "0", "OPENINFER_SERVER_CACHE_DIR": str(cache)}, cwd=base, timeout=180)
        # Workers' own log lines reach the daemon's log nested under "record" (tagged with the worker).
        records = [r.get("record", r) for r in map(json.loads, daemon.log_text().splitlines())]
        views = [r["read_only"] for r in records if r.get("msg") == "Landlock applied"]
        assert len(views) >= 4, views  # two helpers, two workers
        for view in views:
            own = [p for p in view if p.startswith(f"{repo}/")]
            assert len(own) == 1 and Path(own[0]).parent.parent == repo, view  # its own <model>/<version> only
            prepared = [p for p in view if p.startswith(f"{cache}/")]
            assert len(prepared) <= 1 and all(Path(p).parent == cache and not Path(p).name.startswith(".") for p in prepared), view
            for path in view:
                for private in (repo, cache, Path(daemon.workdir) / "run"):
                    assert not f"{private}/".startswith(path.rstrip("/") + "/"), f"{path} holds {private}: {view}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_version_directory_not_named_in_ascii_digits_fails_its_model_alone(daemon_factory: Any) -> None:
    """Round 37: `str.isdigit()` is true of "²" and "١": int("²") raised out of the repository scan, so one
    such directory stopped the daemon from starting (exit 1) and every later reload (INTERNAL, nothing else
    of the reload applied - a withdrawn chain consent among it); "01" beside "1" was a second version 1.
    Each is now its model's own failure, with the rule in the reason; the rest serves and reloads."""
    from openinfer.client import Client
    from repo_builder import ModelRepo

    repo = ModelRepo("oi-version-names-")
    try:
        repo.model("good", onnx_builders.matmul_model)
        for name, directory in (("superscript", "\u00b2"), ("arabic", "\u0661"), ("padded", "01")):
            repo.model(name, onnx_builders.matmul_model)  # version 1, and beside it:
            (repo.root / name / directory).mkdir()
            onnx_builders.matmul_model(repo.root / name / directory / "model.onnx")
        running = daemon_factory(repo.ready())
        with Client(running.address, timeout=30) as client:
            rows = {row["name"]: row for row in client.models()}
            for name in ("superscript", "arabic", "padded"):
                assert rows[name]["state"] == "failed" and "ASCII digits, without leading zeros" in rows[name]["reason"], rows[name]
            assert client.infer("good", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape == (1, 64)
            repo.model("late", onnx_builders.matmul_model)
            repo.ready()
            assert "late:1" in client.reload()["added"]
    finally:
        repo.remove()


def test_a_config_toml_of_one_long_dotted_key_fails_its_model_at_once(tmp_path: Path) -> None:
    """Round 72: tomllib keeps every prefix of a dotted key, so a key of N parts costs N^2 - one line of
    `a.a.a...` in a model's config.toml (48 KB) held the supervisor 5.2 s and 2.3 GB at a reload (128 KB:
    21.8 s, 7.8 GB; at the start too). A config.toml now has at most 1,024 dots and 64 KiB."""
    from openinfer.daemon.modelstore.repository import scan_repository

    onnx_builders.matmul_model(tmp_path / "good" / "1" / "model.onnx")
    onnx_builders.matmul_model(tmp_path / "dotted" / "1" / "model.onnx")
    (tmp_path / "dotted" / "config.toml").write_text(".".join(["a"] * 16_000) + " = 1\n")  # 32 KB: ~1 GB to parse before
    onnx_builders.matmul_model(tmp_path / "large" / "1" / "model.onnx")
    (tmp_path / "large" / "config.toml").write_text("# padding\n" * 7000)
    rows = {entry.name: entry for entry in scan_repository(tmp_path)}
    assert rows["good"].error is None
    assert rows["dotted"].error is not None and "more than 1024 dots" in rows["dotted"].error, rows["dotted"].error
    assert rows["large"].error is not None and "larger than 65536 bytes" in rows["large"].error, rows["large"].error


def test_a_model_with_more_versions_than_are_served_at_once_fails_alone(tmp_path: Path) -> None:
    """Round 72: every version of a model served with version_policy = "all" is walked at every reload on
    the supervisor's loop (its files' stamps, up to 1,000 entries each): 1,000 versions of 999 hard links
    held it 4.5-7.3 s a reload, every reload. At most 16 versions are served at once; with more the model
    fails to load, saying what to do; "latest" serves the newest of any number."""
    from openinfer.daemon.modelstore.repository import scan_repository

    for version in range(1, 18):
        onnx_builders.matmul_model(tmp_path / "many" / str(version) / "model.onnx", size=4)
        onnx_builders.matmul_model(tmp_path / "newest" / str(version) / "model.onnx", size=4)
    (tmp_path / "newest" / "config.toml").write_text('version_policy = "latest"\n')
    for version in range(1, 17):
        onnx_builders.matmul_model(tmp_path / "sixteen" / str(version) / "model.onnx", size=4)
    rows = {entry.name: entry for entry in scan_repository(tmp_path)}
    assert rows["many"].error is not None and "at most 16 are served at once" in rows["many"].error, rows["many"].error
    assert rows["newest"].error is None and [v.version for v in rows["newest"].versions] == [17]
    assert rows["sixteen"].error is None and len(rows["sixteen"].versions) == 16


def test_a_model_directory_the_daemon_may_not_list_fails_that_model_alone(tmp_path: Path) -> None:
    """Under the shipped unit the daemon is not root: a model directory it may enter but not list (another
    owner, mode 0711) raised PermissionError out of the scan - no start, no reload - like round 37's "²".
    Here the scan runs as uid 65534 over a repository with one such directory."""
    from openinfer.daemon.modelstore.repository import scan_repository

    root = world_readable_dir("oi-unlistable-")
    try:
        onnx_builders.matmul_model(root / "good" / "1" / "model.onnx")
        onnx_builders.matmul_model(root / "closed" / "1" / "model.onnx")
        for path in (root / "good", root / "good" / "1", root / "closed"):
            path.chmod(0o755)
        (root / "good" / "1" / "model.onnx").chmod(0o644)
        (root / "closed").chmod(0o711)  # root's: others may pass through, not list it
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            gc.freeze()  # nothing inherited is collected here (tests/other_uid.py call_as)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                entries = scan_repository(root)
                os.write(write_fd, json.dumps({e.name: e.error for e in entries}).encode())
            except BaseException as exc:  # noqa: BLE001
                os.write(write_fd, json.dumps({"raised": repr(exc)}).encode())
            os._exit(0)
        os.close(write_fd)
        seen = json.loads(os.read(read_fd, 65536))
        os.close(read_fd)
        os.waitpid(pid, 0)
        assert seen.get("good", "missing") is None and "Permission denied" in (seen.get("closed") or ""), seen
    finally:
        shutil.rmtree(root, ignore_errors=True)
