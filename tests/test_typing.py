"""Gate: the package type-checks (mypy, configured in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from daemon_harness import REPO_ROOT

pytestmark = pytest.mark.live


def test_mypy_passes_on_the_package() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "daemon", "client", "sandbox", "--config-file", "pyproject.toml"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:]
