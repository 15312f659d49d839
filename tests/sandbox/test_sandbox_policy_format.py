"""The policy file format: what loads, what it means, and that every mistake names its file and line."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openinfer.sandbox import Action, ActionKind, PolicyError, RuntimeConstant, SandboxError, load_policy
from openinfer.sandbox.constants import NAMED_CONSTANTS
from openinfer.sandbox.seccomp_filter import filter_pseudocode, runtime_values

pytestmark = pytest.mark.unit

WritePolicy = Callable[..., Path]

HEADER = '[policy]\ndefault_action = "kill_process"\n'


def error_for(write: WritePolicy, text: str) -> PolicyError:
    path = write(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.path == os.fspath(path)
    assert str(caught.value).startswith(f"{path}:")
    return caught.value


# ---------------------------------------------------------------- the shipped policies


def test_shipped_policies_load_with_expected_defaults() -> None:
    worker, boot, audit = load_policy("worker"), load_policy("boot"), load_policy("audit")
    assert worker.default_action == Action(ActionKind.KILL_PROCESS)
    assert boot.default_action == Action(ActionKind.ERRNO, 1)
    assert audit.default_action == Action(ActionKind.LOG) and audit.log_denials
    assert boot.included == (worker.path,) and audit.included == (worker.path,)
    # audit changes only the default: the same rules as the worker
    assert {(r.syscall, r.action, r.args) for r in audit.rules} == {(r.syscall, r.action, r.args) for r in worker.rules}


def test_name_and_path_resolve_to_the_same_file() -> None:
    by_name = load_policy("worker")
    assert load_policy(by_name.path) == by_name
    assert load_policy(str(by_name.path)) == by_name


def test_unknown_shipped_name_lists_the_available_ones() -> None:
    with pytest.raises(PolicyError, match=r"shipped policies: access, audit, boot, clients, prepare, worker"):
        load_policy("wrker")


def test_everything_the_worker_allows_is_allowed_by_boot_too() -> None:
    """Filters stack: the worker runs under boot AND worker, so a syscall boot refuses stays refused."""
    boot = load_policy("boot")
    for rule in load_policy("worker").rules:
        if rule.action.kind is ActionKind.ALLOW:
            boot_actions = {r.action.kind for r in boot.rules_for(rule.syscall)}
            assert ActionKind.ALLOW in boot_actions, f"{rule.syscall} is allowed by worker but not by boot"


def test_worker_policy_renders_as_a_seccomp_filter() -> None:
    text = filter_pseudocode(load_policy("worker"))
    assert 'filter for syscall "execve"' not in text  # same as default (kill): no rule emitted
    assert "ERRNO(38)" in text  # clone3 -> ENOSYS
    assert f"$a0.lo32 == {os.getpid()}" in text  # SELF_PID substituted for kill/tgkill


# ---------------------------------------------------------------- values, constants, includes


def test_named_constants_and_combinations_resolve(write_policy: WritePolicy) -> None:
    policy = load_policy(write_policy(HEADER + """
[[rule]]
syscalls = ["openat"]
action = "errno:EPERM"
args = [{ index = 2, op = "masked_eq", mask = "O_WRONLY|O_RDWR|0x40", value = "O_WRONLY" }]

[[rule]]
syscalls = ["newfstatat"]
action = "allow"
args = [{ index = 0, op = "eq", value = "AT_FDCWD" }]
"""))
    (openat,) = policy.rules_for("openat")
    assert openat.args[0].mask == os.O_WRONLY | os.O_RDWR | 0x40
    assert openat.args[0].value == os.O_WRONLY
    (stat,) = policy.rules_for("newfstatat")
    assert stat.args[0].value == (1 << 64) - 100  # AT_FDCWD as the kernel sees the register


def test_local_and_runtime_constants(write_policy: WritePolicy) -> None:
    policy = load_policy(write_policy("""
[policy]
default_action = "kill_process"
runtime_constants = ["CHANNEL_FD"]

[constants]
MY_FLAGS = "PROT_READ|PROT_WRITE"

[[rule]]
syscalls = ["mprotect"]
action = "allow"
args = [{ index = 2, op = "eq", value = "MY_FLAGS" }]

[[rule]]
syscalls = ["close"]
action = "allow"
args = [{ index = 0, op = "ne", value = "CHANNEL_FD" }]
"""))
    assert policy.constants == {"MY_FLAGS": NAMED_CONSTANTS["PROT_READ"] | NAMED_CONSTANTS["PROT_WRITE"]}
    assert policy.rules_for("close")[0].args[0].value == RuntimeConstant("CHANNEL_FD")
    with pytest.raises(SandboxError, match="needs runtime constants"):
        runtime_values(policy, {})
    assert runtime_values(policy, {"CHANNEL_FD": 7}) == {"SELF_PID": os.getpid(), "CHANNEL_FD": 7}
    with pytest.raises(SandboxError, match="declares no runtime constant 'OTHER'"):
        runtime_values(policy, {"CHANNEL_FD": 7, "OTHER": 1})


def test_include_replaces_rules_per_syscall_and_inherits_the_rest(write_policy: WritePolicy) -> None:
    write_policy(HEADER + """
[constants]
BASE_FLAG = 4

[[rule]]
syscalls = ["read", "write"]
action = "allow"

[[rule]]
syscalls = ["kill"]
action = "allow"
args = [{ index = 0, op = "eq", value = "SELF_PID" }]
""", name="base.toml")
    policy = load_policy(write_policy("""
[policy]
include = "base.toml"
default_action = "log"

[[rule]]
syscalls = ["write"]
action = "errno:EPERM"
args = [{ index = 2, op = "gt", value = "BASE_FLAG" }]
""", name="derived.toml"))
    assert policy.default_action == Action(ActionKind.LOG)
    assert [r.action.kind for r in policy.rules_for("read")] == [ActionKind.ALLOW]
    assert [(r.action.kind, r.args[0].value) for r in policy.rules_for("write")] == [(ActionKind.ERRNO, 4)]
    assert policy.rules_for("kill")[0].args[0].value == RuntimeConstant("SELF_PID")


def test_complementary_rules_for_one_syscall_are_accepted(write_policy: WritePolicy) -> None:
    policy = load_policy(write_policy(HEADER + """
[[rule]]
syscalls = ["socket"]
action = "allow"
args = [{ index = 0, op = "eq", value = "AF_UNIX" }]

[[rule]]
syscalls = ["socket"]
action = "errno:EAFNOSUPPORT"
args = [{ index = 0, op = "ne", value = "AF_UNIX" }]

[[rule]]
syscalls = ["fcntl"]
action = "allow"
args = [{ index = 1, op = "le", value = 4 }]

[[rule]]
syscalls = ["fcntl"]
action = "errno:EPERM"
args = [{ index = 1, op = "gt", value = 4 }]
"""))
    assert len(policy.rules_for("socket")) == 2 and len(policy.rules_for("fcntl")) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("allow", "allow"), ("kill_process", "kill_process"), ("kill_thread", "kill_thread"), ("log", "log"),
     ("trap", "trap"), ("errno:EPERM", "errno:EPERM"), ("errno:38", "errno:ENOSYS")],
)
def test_action_spellings(text: str, expected: str) -> None:
    assert str(Action.parse(text)) == expected


# ---------------------------------------------------------------- mistakes, each pointing at its line

LINE_CASES = {
    "unknown top-level key": (HEADER + "\n[polcy]\nx = 1\n", 4, "unknown top-level key 'polcy'"),
    "unknown key in [policy]": ('[policy]\ndefault_action = "log"\ndefualt = "allow"\n', 3, "unknown key 'defualt' in [policy]"),
    "unknown key in the second rule": (
        HEADER + '\n[[rule]]\nsyscalls = ["read"]\naction = "allow"\n\n[[rule]]\nsyscalls = ["write"]\naction = "allow"\nwhy = "x"\n',
        11, "unknown key 'why' in [[rule]]",
    ),
    "unknown key in args": (
        HEADER + '[[rule]]\nsyscalls = ["kill"]\naction = "allow"\nargs = [\n  { index = 0, op = "eq", valu = 1 },\n]\n',
        7, "unknown key 'valu' in args",
    ),
    "unknown syscall in a multi-line list": (
        HEADER + '[[rule]]\nsyscalls = [\n  "read",\n  "wrtie",\n]\naction = "allow"\n', 6, "unknown syscall 'wrtie'",
    ),
    "unknown constant": (
        HEADER + '[[rule]]\nsyscalls = ["mmap"]\naction = "allow"\n\nargs = [{ index = 2, op = "masked_eq", mask = "PROT_EXECC", value = 0 }]\n',
        7, "unknown constant 'PROT_EXECC'",
    ),
    "unknown constant inside an expression": (
        HEADER + '[[rule]]\nsyscalls = ["openat"]\naction = "allow"\nargs = [\n  { index = 2, op = "masked_eq", mask = "O_WRONLY|O_CREATE", value = 0 },\n]\n',
        7, "unknown constant 'O_CREATE'",
    ),
    "bad action": (HEADER + '[[rule]]\nsyscalls = ["read"]\n\naction = "permit"\n', 6, "unknown action 'permit'"),
    "bad errno": (HEADER + '[[rule]]\nsyscalls = ["read"]\naction = "errno:EWHATEVER"\n', 5, "unknown errno 'EWHATEVER'"),
    "errno out of range": (HEADER + '[[rule]]\nsyscalls = ["read"]\naction = "errno:5000"\n', 5, "out of range"),
    "bad default action": ('[policy]\n\ndefault_action = "deny"\n', 3, "unknown action 'deny'"),
    "bad comparison": (
        HEADER + '[[rule]]\nsyscalls = ["kill"]\naction = "allow"\nargs = [{ index = 0, op = "equals", value = 1 }]\n',
        6, "unknown comparison 'equals'",
    ),
    "argument index out of range": (
        HEADER + '[[rule]]\nsyscalls = ["kill"]\naction = "allow"\nargs = [{ index = 6, op = "eq", value = 1 }]\n',
        6, "index must be an integer 0..5",
    ),
    "argument compared twice": (
        HEADER + '[[rule]]\nsyscalls = ["kill"]\naction = "allow"\nargs = [{ index = 0, op = "ge", value = 1 },\n        { index = 0, op = "le", value = 9 }]\n',
        6, "compared twice",
    ),
    "masked_eq without mask": (
        HEADER + '[[rule]]\nsyscalls = ["mmap"]\naction = "allow"\nargs = [{ index = 2, op = "masked_eq", value = 0 }]\n',
        6, "masked_eq needs a mask",
    ),
    "value outside mask": (
        HEADER + '[[rule]]\nsyscalls = ["mmap"]\naction = "allow"\nargs = [{ index = 2, op = "masked_eq", mask = 4, value = 6 }]\n',
        6, "bits outside mask",
    ),
    "overlapping rules with different actions": (
        HEADER + '[[rule]]\nsyscalls = ["kill"]\naction = "allow"\nargs = [{ index = 0, op = "eq", value = "SELF_PID" }]\n\n'
        '[[rule]]\nsyscalls = ["kill"]\naction = "errno:EPERM"\nargs = [{ index = 1, op = "eq", value = 0 }]\n',
        9, "can match the same call with different actions",
    ),
    "syscall listed twice": (HEADER + '[[rule]]\nsyscalls = ["read",\n "read"]\naction = "allow"\n', 4, "listed twice"),
    "runtime constant in an expression": (
        HEADER + '[[rule]]\nsyscalls = ["kill"]\naction = "allow"\nargs = [{ index = 0, op = "eq", value = "SELF_PID|1" }]\n',
        6, "cannot be combined",
    ),
    "constant shadowing a named one": (HEADER + "[constants]\n\nPROT_EXEC = 1\n", 5, "shadows"),
    "invalid TOML": (HEADER + '[[rule]]\nsyscalls = ["read"]\naction = allow\n', 5, "invalid TOML"),
    "comment after the offending key does not confuse the line finder": (
        HEADER + '# syscalls = ["wrtie"] is a typo we once made\n[[rule]]\nsyscalls = ["wrtie"]  # "wrtie"\naction = "allow"\n',
        5, "unknown syscall 'wrtie'",
    ),
}


@pytest.mark.parametrize("case", sorted(LINE_CASES))
def test_mistakes_name_the_file_and_line(write_policy: WritePolicy, case: str) -> None:
    text, line, message = LINE_CASES[case]
    error = error_for(write_policy, text)
    assert message in str(error)
    assert error.line == line, f"{case}: expected line {line}, got {error}"


def test_missing_default_action(write_policy: WritePolicy) -> None:
    error = error_for(write_policy, '[policy]\ndescription = "x"\n')
    assert "needs default_action" in str(error) and error.line == 1


def test_include_cycle_and_missing_include(write_policy: WritePolicy) -> None:
    write_policy('[policy]\ninclude = "b.toml"\ndefault_action = "log"\n', name="a.toml")
    b = write_policy('[policy]\ninclude = "a.toml"\ndefault_action = "log"\n', name="b.toml")
    with pytest.raises(PolicyError, match="include cycle"):
        load_policy(b)
    missing = write_policy('[policy]\ninclude = "nowhere.toml"\ndefault_action = "log"\n', name="c.toml")
    with pytest.raises(PolicyError, match="nowhere.toml: no such policy file"):
        load_policy(missing)


@settings(max_examples=150, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from(list('[]{}="\n ,.:|#01xabdefiklnoprstuwyAEFILNOPRSTUWX_')), max_size=200))
def test_arbitrary_text_loads_or_raises_policy_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.toml"
    path.write_text(HEADER + text)
    try:
        load_policy(path)
    except PolicyError as exc:
        assert str(exc).startswith(str(path))
