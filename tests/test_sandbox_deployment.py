"""`openinfer sandbox check`'s deployment checks as an operator runs them (the CLI, a config file): each one
fires on a deployment broken in its way, and all stay quiet on a good one."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import onnx_builders
from daemon_harness import world_readable_dir

pytestmark = pytest.mark.live

CHECKS = {"runtime_dir", "cache_dir", "socket", "repository", "repository_symlinks", "repository_files", "repository_readable"}
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership and the worker user's rights need root")


class Deployment:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.repo = base / "models"
        self.runtime = base / "run"
        self.cache = base / "cache"
        self.socket_dir = base / "sock"
        self.socket = self.socket_dir / "oi.sock"
        self.config = base / "openinfer.toml"

    def check(self, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
        done = subprocess.run(
            [sys.executable, "-m", "openinfer.daemon.cli", "sandbox", "check", "--no-probes", "--json", "--config", str(self.config), *extra],
            capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("OPENINFER_") and k != "RUNTIME_DIRECTORY"},
        )
        assert done.returncode in (0, 1), done.stdout + done.stderr
        rows = {row["check"]: row for row in json.loads(done.stdout)["deployment"]}
        return done.returncode, rows


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    """A good deployment: everything root's and private, one readable model, the daemon's socket present."""
    d = Deployment(world_readable_dir("oi-deploy-"))
    onnx_builders.matmul_model(d.repo / "tiny" / "1" / "model.onnx")
    for path in d.repo.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    d.cache.mkdir(mode=0o700)
    d.socket_dir.mkdir(mode=0o750)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(d.socket))
    d.socket.chmod(0o660)
    d.config.write_text(f'[server]\nmodels = "{d.repo}"\nsocket = "ipc://{d.socket}"\nruntime_dir = "{d.runtime}"\ncache_dir = "{d.cache}"\n')
    yield d
    listener.close()
    shutil.rmtree(d.base, ignore_errors=True)


def test_a_good_deployment_has_no_finding(deployment: Deployment) -> None:
    code, rows = deployment.check()
    assert set(rows) == CHECKS
    assert code == 0 and all(row["ok"] for row in rows.values()), rows
    assert "readable by user" in rows["repository_readable"]["detail"] or os.geteuid() != 0


def runtime_dir_of_another_user(d: Deployment) -> None:
    d.runtime.mkdir(mode=0o755)
    os.chown(d.runtime, 65534, 65534)


def cache_dir_is_a_symlink(d: Deployment) -> None:
    d.cache.rmdir()
    d.cache.symlink_to(d.base)


def socket_dir_writable_by_all(d: Deployment) -> None:
    d.socket_dir.chmod(0o777)


def socket_mode_not_the_configured_one(d: Deployment) -> None:
    d.socket.chmod(0o666)


def repository_file_writable_by_all(d: Deployment) -> None:
    (d.repo / "tiny" / "1" / "model.onnx").chmod(0o666)


def repository_holds_a_symlink(d: Deployment) -> None:
    (d.repo / "tiny" / "2").mkdir()
    (d.repo / "tiny" / "2" / "model.onnx").symlink_to(d.repo / "tiny" / "1" / "model.onnx")


def repository_holds_a_fifo(d: Deployment) -> None:
    os.mkfifo(d.repo / "tiny" / "1" / "pipe", 0o644)


def model_the_worker_user_cannot_read(d: Deployment) -> None:
    (d.repo / "tiny" / "1" / "model.onnx").chmod(0o600)


BREAKAGES: dict[str, tuple[Callable[[Deployment], None], str, str]] = {
    "runtime_dir": (runtime_dir_of_another_user, "runtime_dir", "owned by uid 65534"),
    "cache_dir": (cache_dir_is_a_symlink, "cache_dir", "symlink"),
    "socket_dir": (socket_dir_writable_by_all, "socket", "could replace the socket"),
    "socket_mode": (socket_mode_not_the_configured_one, "socket", "mode 0666"),
    "repository": (repository_file_writable_by_all, "repository", "model.onnx (uid 0, mode 0666)"),
    "symlink": (repository_holds_a_symlink, "repository_symlinks", "tiny/2/model.onnx ->"),
    "fifo": (repository_holds_a_fifo, "repository_files", "tiny/1/pipe"),
    "unreadable": (model_the_worker_user_cannot_read, "repository_readable", "as user nobody (uid 65534): Permission denied"),
}


@as_root
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_check_fires_on_its_own_breakage(deployment: Deployment, breakage: str) -> None:
    breaking, check, evidence = BREAKAGES[breakage]
    breaking(deployment)
    code, rows = deployment.check()
    assert code == 1, rows
    assert {name for name, row in rows.items() if not row["ok"]} == {check}, rows
    assert evidence in rows[check]["detail"], rows[check]["detail"]


def test_the_table_names_the_finding_and_options_override_the_config(deployment: Deployment) -> None:
    other = deployment.base / "other-models"
    other.mkdir()
    other.chmod(0o777)  # passed on the command line: it is the one checked
    done = subprocess.run(
        [sys.executable, "-m", "openinfer.daemon.cli", "sandbox", "check", "--no-probes", "--config", str(deployment.config), "--models", str(other)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FINDING" in done.stdout and str(other) in done.stdout, done.stdout


def test_a_bad_config_is_exit_2_with_a_message(deployment: Deployment) -> None:
    deployment.config.write_text("[server]\nmodelz = 1\n")
    done = subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", "sandbox", "check", "--no-probes", "--config", str(deployment.config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "modelz" in done.stderr, done.stdout + done.stderr
