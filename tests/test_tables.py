"""`openinfer status` fits an 80-column terminal: no cell is cut to an ellipsis and the values that matter
are all there, whole; `--wide` has every column."""
from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from openinfer.daemon.commands.tables import status_tables

pytestmark = pytest.mark.unit

ELLIPSIS = "…"


def rendered(tables: list[Table], width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, soft_wrap=False)
    for table in tables:
        console.print(table)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert all(len(line) <= width for line in text.splitlines())
    return text  # type: ignore[no-any-return]


def worker(wid: int, pid: int, model: str, state: str, tasks: int, pss_mib: float, **sandbox: Any) -> dict[str, Any]:
    return {
        "id": wid, "pid": pid, "model": model, "version": 1, "state": state, "tasks_served": tasks, "restarts": 12, "uptime_s": 5.0,
        "sandbox": {"enabled": True, "seccomp_mode": 2, "policy": "worker", "uid": [65534] * 4, "namespaces_entered": ["net", "ipc"],
                    "landlock_abi": 7, "memory_limit_bytes": 4 << 30, **sandbox},
        "memory": {"rss": 84 << 20, "uss": 44 << 20, "pss": int(pss_mib * 2**20)},
    }


def status_result(workers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pid": 4194301, "address": "ipc:///run/openinfer/openinfer.sock", "uptime_s": 86400.0, "draining": False, "sandbox": True,
        "models": [
            {"name": "silero_vad", "version": 1, "state": "ready", "workers": 1, "ready_workers": 1, "queued": 1024, "reason": None},
            {"name": "broken", "version": 1, "state": "failed", "workers": 0, "ready_workers": 0, "queued": 0,
             "reason": "cannot load: InvalidProtobuf: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from /var/lib/openinfer/models/broken/1/model.onnx failed: Protobuf parsing failed."},
        ],
        "workers": workers,
    }


WORKERS = [
    worker(1, 4194303, "silero_vad", "ready", 123456789, 1234.5),
    worker(102, 4194304, "magika", "draining", 7, 48.2, policy="/etc/openinfer/policies/strict-worker.toml"),
    worker(103, 917, "ocr_det", "spawned", 0, 35.0, seccomp_mode=0),
    {**worker(104, 918, "tiny", "spawned", 0, 20.0), "sandbox": {}},
]


def test_status_at_80_columns_cuts_nothing_and_shows_what_matters() -> None:
    text = rendered(status_tables(status_result(WORKERS)))
    assert ELLIPSIS not in text
    for value in ("4194303", "4194304", "silero_vad:1", "magika:1", "draining", "123456789", "1234.5", "48.2", "seccomp 0", "PSS MiB", "restarts", "4194301"):
        assert value in text, value
    assert "ocr_det:1" in text and "tiny:1" in text
    assert " worker " in text  # the policy a worker serves under
    # The long values fold over lines rather than being cut: every character is still there.
    assert "/etc/openinfer/policies/strict-worker.toml" in column(text, " sandbox ", " PSS MiB")
    reason = status_result(WORKERS)["models"][1]["reason"]
    assert reason.replace(" ", "") in column(text, " reason ", "┃").replace(" ", "")


def column(text: str, header: str, next_header: str) -> str:
    """One column's text, top to bottom: what lies between the two headers' positions on every line."""
    lines = text.splitlines()
    (head,) = [line for line in lines if header in line and next_header in line[line.index(header) + len(header) - 1 :]]
    start = head.index(header)
    end = head.index(next_header, start + len(header) - 1)
    return "".join(line[start:end].strip() for line in lines[lines.index(head) + 1 :])


def header_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if " pid " in line and " state " in line]
    return line


def test_wide_has_every_sandbox_and_memory_column() -> None:
    narrow = header_line(rendered(status_tables(status_result(WORKERS)), width=200))
    wide = rendered(status_tables(status_result(WORKERS), wide=True), width=200)
    for column in ("seccomp", "uid", "netns", "landlock", "mem limit", "RSS MiB", "USS MiB"):
        assert column in header_line(wide) and column not in narrow, column
    assert ELLIPSIS not in wide and "65534" in wide and "net,ipc" in wide and "4096.0" in wide


def test_stats_show_each_verdict_cache_and_its_hit_ratio_within_80_columns() -> None:
    from openinfer.daemon.commands.tables import stats_tables

    version = {"requests": 4, "success": 4, "failures": {}}
    result = {"models": {
        "magika": {"versions": {"1": version}, "cache": {"1": {"lookups": 4, "hits": 3, "hit_ratio": 0.75, "bytes": 3 * 2**20, "max_bytes_per_worker": 8 << 20}}},
        "tiny": {"versions": {"1": version}},
    }}
    text = rendered(stats_tables(result))
    assert "verdict cache" in text and "75.0 %" in text and "3.0 MiB" in text and ELLIPSIS not in text
    assert "tiny:1" not in text.split("verdict cache")[1]  # only models with [cache] have a row
    assert "verdict cache" not in rendered(stats_tables({"models": {"tiny": {"versions": {"1": version}}}}))
