"""The daemon under the restrictions the systemd unit imposes, reproduced without systemd: a private
network namespace (PrivateNetwork=yes: only path-based ipc:// works) and a read-only model repository
and Python installation (ProtectSystem=strict, ReadOnlyPaths=)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnx_builders
from daemon_harness import wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from repo_builder import make_world_readable

pytestmark = pytest.mark.live


def test_serves_in_a_private_network_namespace_with_read_only_files(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "reproducing the unit's namespaces needs root (CI runs as root)"
    repo = world_readable_dir("oi-unit-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    run = world_readable_dir("oi-unit-run-")
    address = f"ipc://{run}/openinfer.sock"
    prefix = Path(sys.prefix)
    script = (
        f"mount --bind -o ro {repo} {repo} && mount -o remount,bind,ro {repo} && "
        f"mount --bind {prefix} {prefix} && mount -o remount,bind,ro {prefix} && "
        f"exec {sys.executable} -m openinfer.daemon.cli serve --models {repo} --socket {address}"
    )
    env = dict(os.environ, OPENINFER_SERVER_RUNTIME_DIR=str(run / "rt"))
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with Client(address, timeout=2) as client:

            def ready() -> bool:
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                try:
                    return bool(client.health()["ready"])
                except OpenInferError:
                    return False  # not listening yet

            wait_for(ready, 60, "the daemon in its private namespaces to be ready")
            assert client.infer("tiny", {"x": np.ones((1, 64), np.float32)}).outputs["y"].shape == (1, 64)
            # The daemon sees no network but loopback (down): its namespace differs from ours.
            assert os.readlink(f"/proc/{daemon.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0
        log.close()
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
