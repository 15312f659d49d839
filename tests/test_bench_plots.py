"""Benchmarks in the environment the README's commands create (no matplotlib): each one that plots
writes its JSON first and then says the plot was skipped, instead of dying after its measurement; the
`bench` extra, installed by one documented command, has what they need."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon_harness import REPO_ROOT

pytestmark = pytest.mark.live

BENCH = REPO_ROOT / "bench"
PLOTTING = {"latency.py": "latency.json", "batching.py": "batching.json", "accounting_overhead.py": "accounting.json",
            "memory.py": "memory.json", "soak.py": "soak.json", "peers.py": "peers.json", "steps.py": "steps.json", "cache.py": "cache.json",
            "ocr.py": "ocr.json", "client_cpu.py": "client_cpu.json", "client_wakeup.py": "client_wakeup.json",
            "connection_churn.py": "connection_churn.json", "preauth_flood.py": "preauth_flood.json",
            "restart_storm.py": "restart_storm.json"}
# Modules that draw for a script of PLOTTING (its --plot-only goes through them).
DRAWS_FOR = {"peers_report.py": "peers.py"}
# Runs a benchmark as `python bench/X.py ...` would, with `import matplotlib` failing as when it is not installed.
WITHOUT_MATPLOTLIB = "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def draws(path: Path) -> bool:
    """The script draws itself, or through common.two_bars (common.py is the benchmarks' library, not one)."""
    text = path.read_text()
    return path.name != "common.py" and ("plt." in text or "two_bars(" in text)


def test_every_plotting_benchmark_is_listed() -> None:
    plotting = {DRAWS_FOR.get(path.name, path.name) for path in BENCH.glob("*.py") if draws(path)}
    assert plotting == set(PLOTTING)


@pytest.mark.parametrize("script", sorted(PLOTTING))
def test_without_matplotlib_the_plot_is_skipped_with_a_note(script: str, tmp_path: Path) -> None:
    results = tmp_path / PLOTTING[script]
    shutil.copy(BENCH / "results" / PLOTTING[script], results)  # a real results file of this benchmark
    done = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, str(BENCH / script), "--plot-only", str(results)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "matplotlib is not installed: plot skipped" in done.stderr and "bash examples/bootstrap.sh bench" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [results.name]  # no plot, nothing else written


@pytest.mark.parametrize("script", sorted(PLOTTING))
def test_with_matplotlib_the_plot_is_drawn(script: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed (bash examples/bootstrap.sh bench)")
    results = tmp_path / PLOTTING[script]
    shutil.copy(BENCH / "results" / PLOTTING[script], results)
    done = subprocess.run([sys.executable, str(BENCH / script), "--plot-only", str(results)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert results.with_suffix(".png").stat().st_size > 0


def test_the_bench_extra_has_what_the_benchmarks_import_and_is_one_command() -> None:
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    assert {requirement.split(">")[0].split("=")[0] for requirement in extra} >= {"matplotlib", "py-spy"}
    assert "bash examples/bootstrap.sh bench" in (BENCH / "README.md").read_text()
