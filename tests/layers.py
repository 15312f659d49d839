"""The test suite's layers (markers registered in pyproject.toml), enforced at collection.

- `unit`: in process only: no daemon, no worker, no child process. `pytest -m unit` runs in seconds.
- `live`: real processes: daemons on temporary ipc:// paths, sandboxed workers and children, the CLI,
  compilers and checkers (mypy, systemd-analyze, valgrind). A live module may hold a few in-process
  checks of the same subject (a control for its probe, a static check of the same unit file).
- `attack`: security tests that attack the daemon from every side; everything under tests/attack/ is
  `attack` by where it lives.

Every test carries exactly one of them (module-level `pytestmark` or per test), so `-m unit` and
`-m live` together run everything but the attacks, and the README's `bash tests/run.sh` runs all three.
"""
from __future__ import annotations

from pathlib import Path

import pytest

LAYERS = ("unit", "live", "attack")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        if "attack" in Path(item.path).relative_to(config.rootpath).parts[:-1]:  # tests/attack/...
            item.add_marker(pytest.mark.attack)
        layers = sorted({mark.name for mark in item.iter_markers() if mark.name in LAYERS})
        if len(layers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(layers) if layers else 'no layer'}")
    if wrong:
        raise pytest.UsageError("each test needs exactly one layer marker, unit, live or attack (tests/layers.py):\n  " + "\n  ".join(wrong))
