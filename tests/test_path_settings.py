"""Path settings resolved once at start, against the directory `openinfer serve` started in: relative
paths work for the workers too, and a path that does not exist stops the daemon at once, naming the
setting and the path."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnx_builders
from daemon_harness import REPO_ROOT, world_readable_dir
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.path_settings import resolve_paths
from openinfer.daemon.config.settings import SECTIONS, MetricsSettings, SandboxSettings, ServerSettings, Settings, describe_settings
from repo_builder import make_world_readable


def settings(**server: Any) -> Settings:
    return Settings(server=ServerSettings(**server))


# -- unit: resolve_paths --------------------------------------------------------------------------------
@pytest.mark.unit
def test_relative_paths_become_absolute_against_the_start_directory(tmp_path: Path) -> None:
    for name in ("models", "keys", "mine"):
        (tmp_path / name).mkdir()
    (tmp_path / "keys" / "server.key").write_text("secret\n")
    (tmp_path / "keys" / "server.key.pub").write_text("public\n")
    (tmp_path / "mine" / "access.toml").write_text("")
    (tmp_path / "mine" / "serve.toml").write_text("")
    given = Settings(
        server=ServerSettings(models="models", runtime_dir="run", cache_dir="./models/../cache", access_policy="mine/access.toml",
                              client_policy="clients", curve_secret_key_file="keys/server.key"),
        sandbox=SandboxSettings(serve_policy="./mine/serve.toml", boot_policy="boot"),
        metrics=MetricsSettings(textfile="metrics.prom"),
    )
    got = resolve_paths(given, tmp_path)
    assert got.server.models == str(tmp_path / "models")
    assert got.server.runtime_dir == str(tmp_path / "run")  # created later by the daemon: its parent exists
    assert got.server.cache_dir == str(tmp_path / "cache")
    assert got.server.access_policy == str(tmp_path / "mine" / "access.toml")
    assert got.server.client_policy == "clients"  # a shipped name stays a name
    assert got.server.curve_secret_key_file == str(tmp_path / "keys" / "server.key")
    assert got.sandbox.serve_policy == str(tmp_path / "mine" / "serve.toml") and got.sandbox.boot_policy == "boot"
    assert got.metrics.textfile == str(tmp_path / "metrics.prom")
    assert resolve_paths(got, Path("/elsewhere")) == got  # absolute paths are left alone
    assert resolve_paths(Settings(server=ServerSettings(access_policy="", client_policy="")), tmp_path).server.access_policy == ""


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (settings(models="nope"), "server.models: {tmp}/nope does not exist (given as 'nope', relative to {tmp}, where openinfer serve started)"),
        (settings(models="afile"), "server.models: {tmp}/afile is not a directory"),
        (settings(access_policy="missing/access.toml"), "server.access_policy: {tmp}/missing/access.toml does not exist"),
        (settings(access_policy="acces"), "server.access_policy: no shipped policy named 'acces' (shipped: access, audit, boot, clients, prepare, worker)"),
        (Settings(sandbox=SandboxSettings(serve_policy="serve.toml")), "sandbox.serve_policy: {tmp}/serve.toml does not exist"),
        (settings(runtime_dir="no/such/run"), "server.runtime_dir: {tmp}/no/such/run cannot be created: {tmp}/no/such does not exist"),
        (settings(cache_dir="afile"), "server.cache_dir: {tmp}/afile is not a directory"),
        (Settings(metrics=MetricsSettings(textfile="gone/m.prom")), "metrics.textfile: {tmp}/gone/m.prom cannot be created: {tmp}/gone does not exist"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
@pytest.mark.unit
def test_a_path_that_does_not_exist_names_the_setting_and_the_path(tmp_path: Path, given: Settings, message: str) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError) as info:
        resolve_paths(given, tmp_path)
    assert str(info.value).startswith(message.format(tmp=tmp_path)), str(info.value)


# -- live: `openinfer serve` from another directory -----------------------------------------------------
def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "openinfer.daemon.cli", "serve", *args]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--models", "some/relative/dir"], {}, "server.models: {tmp}/some/relative/dir does not exist"),
        (["--models", "repo"], {"OPENINFER_SANDBOX_SERVE_POLICY": "policies/serve.toml"}, "sandbox.serve_policy: {tmp}/policies/serve.toml does not exist"),
        (["--models", "repo"], {"OPENINFER_SERVER_ACCESS_POLICY": "acces"}, "server.access_policy: no shipped policy named 'acces'"),
    ],
    ids=["models", "serve_policy", "access_policy"],
)
@pytest.mark.live
def test_serve_stops_at_start_when_a_path_does_not_exist(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    (tmp_path / "repo").mkdir()
    done = subprocess.run(serve_command(*args, "--socket", f"ipc://{tmp_path}/oi.sock"), cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OPENINFER_SERVER_RUNTIME_DIR": str(tmp_path / "run"), **env})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "invalid configuration" in done.stderr and message.format(tmp=tmp_path) in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "oi.sock").exists()  # it never started serving


@pytest.mark.live
def test_serve_with_relative_paths_serves_from_the_workers_too(daemon_factory: Any) -> None:
    """Before: the supervisor found the models relative to its cwd, every worker (cwd /) did not."""
    base = world_readable_dir("oi-relative-")
    try:
        onnx_builders.matmul_model(base / "some" / "relative" / "dir" / "tiny" / "1" / "model.onnx")
        (base / "mine").mkdir()
        shutil.copy(REPO_ROOT / "policies" / "worker.toml", base / "mine" / "serve.toml")
        shutil.copy(REPO_ROOT / "policies" / "access.toml", base / "mine" / "access.toml")
        make_world_readable(base)
        env = {"OPENINFER_SANDBOX_SERVE_POLICY": "mine/serve.toml", "OPENINFER_SERVER_ACCESS_POLICY": "./mine/access.toml"}
        daemon = daemon_factory(Path("some/relative/dir"), env=env, cwd=base)
        client = daemon.client(timeout=30)
        assert client.infer("tiny", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape == (1, 64)
        (worker,) = client.status()["workers"]
        assert worker["sandbox"]["policy"] == str(base / "mine" / "serve.toml")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.unit
def test_config_doc_names_every_path_setting() -> None:
    doc = (REPO_ROOT / "docs" / "CONFIG.md").read_text()
    paragraph = doc[doc.index("**Paths** (") : doc.index(") may be relative")]
    listed = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", paragraph))
    marked = {key for key, *_ in describe_settings() if _path_kind(key)}
    assert listed == marked


def _path_kind(key: str) -> str | None:
    section, _, name = key.partition(".")
    return {f.name: f.metadata.get("path") for f in fields(SECTIONS[section])}[name]  # type: ignore[no-any-return]
