"""Gate: the package type-checks (mypy, configured in pyproject.toml), as it is imported.

The source directories are mapped onto import names (pyproject.toml's package-dir: `daemon/` is
`openinfer.daemon`, `client/wire/` is `openinfer.wire` ...), which mypy cannot read from an editable
install. So the check runs on a tree of symlinks that spells the import names: every `openinfer.*`
import then resolves to its source and is checked, instead of being silently typed Any."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon_harness import REPO_ROOT

pytestmark = pytest.mark.live


def import_tree(root: Path) -> list[str]:
    """Symlinks <root>/openinfer/<name> -> source directory; returns the packages to check."""
    mapping = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    (root / "openinfer").mkdir()
    (root / "openinfer" / "__init__.py").write_text("")
    packages = []
    for name, source in mapping.items():
        _, sub = name.split(".", 1)
        (root / "openinfer" / sub).symlink_to(REPO_ROOT / source, target_is_directory=True)
        packages += ["-p", name]
    return packages


def test_mypy_passes_on_the_package(tmp_path: Path) -> None:
    packages = import_tree(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO_ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"), "--exclude", "openinfer/client/wire/", *packages],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:]
    assert "openinfer/daemon/supervisor.py" not in done.stdout  # (a guard that the tree was read: no errors listed)
    assert "Success" in done.stdout and "source files" in done.stdout
