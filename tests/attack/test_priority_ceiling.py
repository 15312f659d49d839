"""A client of another uid asks for the top priority to go before everyone else: any client could
(PROTOCOL.md 10.2; a flood at priority 9 delays others by up to starvation_ms). policies/clients.toml's
`max_priority` is the operator's ceiling per identity: a request above it is refused PERMISSION_DENIED,
naming the limit, at the front door and by the workers of the direct path (the lease carries it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import onnx_builders
from daemon_harness import world_readable_dir
from openinfer.client import Client
from other_uid import NOBODY, run_as
from repo_builder import make_world_readable

pytestmark = pytest.mark.attack

X = np.ones((1, 64), np.float32)

ASK_EACH_PRIORITY = """
for direct in (True, False):
    with Client(sys.argv[1], timeout=10, direct=direct) as client:
        for priority in (9, 2):
            try:
                result = client.infer("tiny", {"x": np.ones((1, 64), np.float32)}, priority=priority)
                print(json.dumps([direct, priority, "OK", "dispatch_us" not in result.timing]))  # direct: no dispatch stage
            except OpenInferError as exc:
                print(json.dumps([direct, priority, exc.code, str(exc)]))
"""


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = world_readable_dir("oi-priority-")
    onnx_builders.matmul_model(root / "tiny" / "1" / "model.onnx")
    yield make_world_readable(root)
    shutil.rmtree(root, ignore_errors=True)


def test_another_uid_cannot_ask_for_more_than_its_max_priority_on_either_path(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:
    access = tmp_path / "access.toml"
    access.write_text(f'[[grant]]\nname = "root"\nuids = [0]\noperations = ["infer", "health"]\n\n[[grant]]\nname = "nobody"\nuids = [{NOBODY}]\noperations = ["infer"]\n')
    clients = tmp_path / "clients.toml"
    clients.write_text('[default]\nmax_priority = 2\n\n[uids."0"]\nmax_priority = 9\n')
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(access), "OPENINFER_SERVER_CLIENT_POLICY": str(clients), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    done = run_as(NOBODY, ASK_EACH_PRIORITY, daemon.address)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 4, done.stdout + done.stderr
    answers = {(direct, priority): (code, detail) for direct, priority, code, detail in rows}
    for direct in (True, False):
        code, message = answers[(direct, 9)]
        assert code == "PERMISSION_DENIED" and f"uid={NOBODY} may ask for priority 2 at most (max_priority" in message, (direct, message)
        assert answers[(direct, 2)] == ("OK", direct), answers  # within the ceiling: served, on the path asked for
    with Client(daemon.address, timeout=10) as client:  # the ceiling is per identity: root's is 9
        assert "dispatch_us" not in client.infer("tiny", {"x": X}, priority=9).timing
