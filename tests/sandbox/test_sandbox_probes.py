"""`openinfer sandbox check`: each forbidden action, tried from inside a freshly sandboxed child."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from openinfer.sandbox import PolicyError
from openinfer.sandbox.probes import ALLOWED, ProbeResult, all_blocked, probe_names, run_probes

pytestmark = pytest.mark.live

# How the worker policy stops each attempt: soft denials where callers must keep working, death otherwise.
WORKER_EXPECTED = {
    "network_socket": "SIGSYS",  # the channel is inherited: no socket is ever made
    "unix_socket": "SIGSYS",
    "connect": "SIGSYS",
    "exec": "SIGSYS",
    "file_write": "EPERM",
    "file_read": "EPERM",
    "fork": "SIGSYS",
    "ptrace": "SIGSYS",
    "unshare": "SIGSYS",
    "mount": "SIGSYS",
    "chmod": "SIGSYS",
    "signal": "SIGSYS",
    "exec_memory": "SIGSYS",
    "mprotect_exec": "SIGSYS",
    "personality": "SIGSYS",
}


def test_the_probe_list_covers_the_threat_model() -> None:
    assert probe_names() == list(WORKER_EXPECTED)


def test_worker_policy_blocks_every_probe() -> None:
    results = run_probes("worker")
    assert {r.name: r.how for r in results} == WORKER_EXPECTED
    assert all(r.blocked for r in results) and all_blocked(results)


def test_audit_policy_still_blocks_every_probe() -> None:
    """Audit only logs syscalls the worker policy does not mention; every probe hits an explicit rule."""
    results = run_probes("audit")
    assert all_blocked(results), [r for r in results if not r.blocked]


def test_boot_policy_allows_loading_and_blocks_escapes() -> None:
    results = {r.name: r for r in run_probes("boot")}
    loading_needs = {"file_read", "exec_memory", "mprotect_exec"}
    assert {name for name, r in results.items() if not r.blocked} == loading_needs
    assert all(results[name].how == ALLOWED for name in loading_needs)
    # The channel is inherited at spawn: no socket of any family, and no connect, while a model loads.
    assert results["network_socket"].how == "SIGSYS" and results["unix_socket"].how == "SIGSYS" and results["connect"].how == "SIGSYS"
    assert results["file_write"].how == "EPERM"
    assert results["exec"].how == "SIGSYS" and results["fork"].how == "SIGSYS"


def test_probes_detect_a_policy_that_allows_everything(write_policy: Callable[..., Path]) -> None:
    """The control: without a sandbox every probe must succeed, or the probes prove nothing."""
    permissive = write_policy('[policy]\ndefault_action = "allow"\n', name="permissive.toml")
    results = run_probes(str(permissive))
    assert {r.name: r.how for r in results} == {name: ALLOWED for name in WORKER_EXPECTED}
    assert not all_blocked(results)


def test_bad_policy_fails_in_the_caller_not_in_children(write_policy: Callable[..., Path]) -> None:
    with pytest.raises(PolicyError):
        run_probes(str(write_policy('[policy]\ndefault_action = "nope"\n')))


def test_probe_results_are_frozen_and_empty_is_not_blocked() -> None:
    result = ProbeResult("exec", True, "SIGSYS")
    with pytest.raises(AttributeError):
        result.blocked = False  # type: ignore[misc]
    assert not all_blocked([])
