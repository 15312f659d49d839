"""The README's quick start stays true: the example script serves the shipped models and shows results."""
from __future__ import annotations

import subprocess
import sys

import pytest

from daemon_harness import REPO_ROOT

pytestmark = pytest.mark.live


def test_quickstart_script_runs_and_shows_real_results() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quickstart.py    -> python" in done.stdout
    assert "silero_vad: speech probability" in done.stdout
    assert "seccomp=2" in done.stdout and "daemon stopped (exit 0)" in done.stdout
