"""The `openinfer` command end to end against a real daemon."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon_harness import RunningDaemon

pytestmark = pytest.mark.live


def run_cli(*args: str, socket: str | None = None, timeout: float = 60, columns: int = 200) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "openinfer.daemon.cli", *args]
    if socket:
        cmd += ["--socket", socket]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={"COLUMNS": str(columns), "PATH": "/usr/bin:/bin"})


def test_health_exits_zero_when_ready(daemon: RunningDaemon) -> None:
    done = run_cli("health", socket=daemon.address)
    assert done.returncode == 0, done.stderr
    assert "ready" in done.stdout
    parsed = json.loads(run_cli("health", "--json", socket=daemon.address).stdout)
    assert parsed["ready"] is True


def test_health_exits_nonzero_without_a_daemon(tmp_path: Path) -> None:
    done = run_cli("health", "--timeout", "0.5", socket=f"ipc://{tmp_path}/nothing.sock")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


def test_models_status_stats_tables_and_json(daemon: RunningDaemon) -> None:
    models = run_cli("models", socket=daemon.address)
    assert models.returncode == 0 and "silero_vad" in models.stdout and "failed" in models.stdout
    rows = json.loads(run_cli("models", "--json", socket=daemon.address).stdout)
    assert {"name", "version", "state", "reason", "workers", "ready_workers"} <= set(rows[0])
    status = json.loads(run_cli("status", "--json", socket=daemon.address).stdout)
    assert status["workers"] and {"pid", "model", "state", "tasks_served", "restarts", "sandbox", "memory"} <= set(status["workers"][0])
    assert "workers" in run_cli("status", socket=daemon.address).stdout
    stats = json.loads(run_cli("stats", "--json", socket=daemon.address).stdout)
    assert "tiny" in stats["models"]
    assert "per model" in run_cli("stats", socket=daemon.address).stdout


def test_status_fits_80_columns_and_wide_shows_the_rest(daemon: RunningDaemon) -> None:
    workers = json.loads(run_cli("status", "--json", socket=daemon.address).stdout)["workers"]
    narrow = run_cli("status", socket=daemon.address, columns=80)
    assert narrow.returncode == 0, narrow.stderr
    assert "…" not in narrow.stdout and max(len(line) for line in narrow.stdout.splitlines()) <= 80
    for w in workers:
        assert f" {w['pid']} " in narrow.stdout and f"{w['model']}:{w['version']}" in narrow.stdout
    wide = run_cli("status", "--wide", socket=daemon.address)
    assert wide.returncode == 0 and "landlock" in wide.stdout and "USS MiB" in wide.stdout and "landlock" not in narrow.stdout


def test_infer_with_random_input_prints_outputs_and_timing(daemon: RunningDaemon) -> None:
    done = run_cli("infer", "ocr_cls", "--random", "--dim", "48", socket=daemon.address)
    assert done.returncode == 0, done.stderr
    assert "save_infer_model/scale_0.tmp_1" in done.stdout and "compute" in done.stdout
    parsed = json.loads(run_cli("infer", "tiny", "--zeros", "--json", socket=daemon.address).stdout)
    assert parsed["outputs"]["y"]["shape"] == [1, 64]
    assert parsed["timing"]["total_us"] > 0


def test_infer_from_npy_files_and_save(daemon: RunningDaemon, tmp_path: Path) -> None:
    x = np.arange(128, dtype=np.float32).reshape(2, 64)
    np.save(tmp_path / "x.npy", x)
    done = run_cli("infer", "tiny", "--input", f"x={tmp_path / 'x.npy'}", "--save", str(tmp_path / "out"), "--json", socket=daemon.address)
    assert done.returncode == 0, done.stderr
    saved = np.load(tmp_path / "out" / "y.npy")
    assert saved.shape == (2, 64)
    assert json.loads(done.stdout)["outputs"]["y"]["data"] == saved.tolist()


def test_infer_a_file_prints_the_verdict_of_a_model_with_steps(daemon: RunningDaemon, tmp_path: Path) -> None:
    script = tmp_path / "tool.py"
    script.write_text("#!/usr/bin/env python3\nimport argparse\n\nparser = argparse.ArgumentParser()\nparser.add_argument('path')\nprint(parser.parse_args().path)\n")
    done = run_cli("infer", "magika", "--file", str(script), socket=daemon.address)
    assert done.returncode == 0, done.stderr
    assert "'python'" in done.stdout and "'code'" in done.stdout, done.stdout
    parsed = json.loads(run_cli("infer", "magika", "--file", str(script), "--json", socket=daemon.address).stdout)
    assert parsed["outputs"]["label"]["data"] == ["python"] and parsed["outputs"]["group"]["data"] == ["code"]
    refused = run_cli("infer", "tiny", "--file", str(script), socket=daemon.address)  # tiny takes a tensor, not a file
    assert refused.returncode == 1 and "--file needs a model with exactly one BYTES input" in refused.stderr, refused.stderr


def test_infer_a_picture_through_the_ocr_chain_shows_each_models_time(daemon: RunningDaemon, tmp_path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    picture = tmp_path / "line.png"
    image = Image.new("RGB", (600, 80), "white")
    ImageDraw.Draw(image).text((16, 16), "Hello sandbox", fill="black", font=ImageFont.load_default(size=40))
    image.save(picture)
    done = run_cli("infer", "ocr", "--file", str(picture), socket=daemon.address)
    assert done.returncode == 0, done.stderr
    assert "chain: compute per model" in done.stdout and "ocr_det" in done.stdout and "ocr_rec" in done.stdout, done.stdout
    parsed = json.loads(run_cli("infer", "ocr", "--file", str(picture), "--json", socket=daemon.address).stdout)
    assert parsed["outputs"]["text"]["data"] and parsed["stages"]["ocr_det"]["runs"] == 1, parsed
    stats = run_cli("stats", socket=daemon.address, columns=80)  # the daemon's sums, per model of the chain
    assert stats.returncode == 0 and "per chain: its models" in stats.stdout and "ocr_rec" in stats.stdout, stats.stdout
    assert max(len(line) for line in stats.stdout.splitlines()) <= 80


def test_infer_reports_typed_errors(daemon: RunningDaemon) -> None:
    done = run_cli("infer", "nope", "--zeros", socket=daemon.address)
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr


def test_socket_from_environment(daemon: RunningDaemon) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "openinfer.daemon.cli", "health"],
        capture_output=True, text=True, timeout=60, env={"OPENINFER_SOCKET": daemon.address, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr


def test_saved_outputs_never_share_a_file() -> None:
    """Round 32's suspicion: `--save` wrote outputs `a/b` and `a_b` both to `a_b.npy`, the second over the
    first. The model names its outputs: each gets a file of its own."""
    from openinfer.daemon.cli import _save_names

    assert _save_names(["a/b", "a_b", "y", "a_b"]) == {"a_b.npy": "a/b", "a_b-2.npy": "a_b", "y.npy": "y", "a_b-3.npy": "a_b"}
    assert list(_save_names(["x" * 300, "", "n\0ul"])) == [f"{'x' * 200}.npy", "_.npy", "n_ul.npy"]
