"""`openinfer sandbox check` as an operator runs it: real seccomp in forked children of the CLI, judged by
its exit status and its output. (tests/sandbox/test_sandbox_probes.py covers run_probes() itself.)"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

# The threat model's list, in the probe names the CLI prints.
REQUIRED_PROBES = {
    "network_socket", "unix_socket", "connect", "exec", "file_write", "file_read", "fork", "ptrace",
    "unshare", "mount", "chmod", "signal", "exec_memory",
}
BLOCKED_HOW = {"SIGSYS", *errno.errorcode.values()}
ALLOW_EVERYTHING = '[policy]\ndescription = "the control: a sandbox that stops nothing"\ndefault_action = "allow"\n'


def sandbox_check(*args: str) -> subprocess.CompletedProcess[str]:
    """The probes alone (tests/test_sandbox_deployment.py covers the deployment checks)."""
    return subprocess.run(
        [sys.executable, "-m", "openinfer.daemon.cli", "sandbox", "check", "--no-deployment", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """probe -> [result, how] from the rendered table (box-drawing borders, one probe per row)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if len(cells) == 3 and cells[0] and cells[0] != "probe":
            rows[cells[0]] = cells[1:]
    return rows


def test_default_policy_blocks_every_probe_in_the_table() -> None:
    done = sandbox_check()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "policy 'worker'" in done.stdout
    rows = table_rows(done.stdout)
    assert set(rows) >= REQUIRED_PROBES, sorted(rows)
    assert all(result == "blocked" and how in BLOCKED_HOW for result, how in rows.values()), rows
    assert "ALLOWED" not in done.stdout


def test_json_lists_every_probe_as_blocked_and_agrees_with_the_table() -> None:
    done = sandbox_check("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)["probes"]
    assert isinstance(results, list) and all(set(row) == {"probe", "blocked", "how"} for row in results), results
    by_name = {row["probe"]: row for row in results}
    assert len(by_name) == len(results), "a probe is listed twice"
    assert set(by_name) >= REQUIRED_PROBES, sorted(by_name)
    assert all(row["blocked"] is True and row["how"] in BLOCKED_HOW for row in results), results
    table = table_rows(sandbox_check().stdout)
    assert {name: row["how"] for name, row in by_name.items()} == {name: how for name, (_, how) in table.items()}


def test_a_policy_that_allows_everything_fails_the_check_and_shows_allowed_rows(tmp_path: Path) -> None:
    """The control: without a sandbox every probe must get through, or the check proves nothing."""
    permissive = tmp_path / "allow-everything.toml"
    permissive.write_text(ALLOW_EVERYTHING)
    done = sandbox_check("--policy", str(permissive))
    assert done.returncode == 1, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert set(rows) >= REQUIRED_PROBES, sorted(rows)
    assert all(result == "ALLOWED" for result, _ in rows.values()), rows
    as_json = sandbox_check("--json", "--policy", str(permissive))
    assert as_json.returncode == 1
    assert all(row["blocked"] is False for row in json.loads(as_json.stdout)["probes"])


def test_a_policy_that_misses_one_rule_is_caught_by_name(tmp_path: Path) -> None:
    """worker.toml with execve allowed again: exactly the exec probe reports ALLOWED."""
    leaky = tmp_path / "leaky.toml"
    leaky.write_text('[policy]\ninclude = "worker"\n\n[[rule]]\nsyscalls = ["execve"]\naction = "allow"\n')
    done = sandbox_check("--json", "--policy", str(leaky))
    assert done.returncode == 1, done.stdout + done.stderr
    allowed = {row["probe"] for row in json.loads(done.stdout)["probes"] if not row["blocked"]}
    assert allowed == {"exec"}, allowed


def test_an_unreadable_policy_is_an_error_message_not_a_traceback(tmp_path: Path) -> None:
    done = sandbox_check("--policy", str(tmp_path / "no-such-policy.toml"))
    assert done.returncode != 0
    assert "no-such-policy.toml" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
