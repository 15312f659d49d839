"""Turn a Policy into a libseccomp filter and load it into the calling process (every thread, via TSYNC).

pyseccomp is imported at module import on purpose: its import runs ctypes.util.find_library, which forks
`ldconfig -p`. That must happen before any seccomp policy or Landlock ruleset forbids fork/exec, so
`openinfer.sandbox` imports this module eagerly.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping

import pyseccomp

from .constants import BUILTIN_RUNTIME_CONSTANTS, to_u64
from .errors import SandboxError
from .process_flags import set_no_new_privs
from .loader import load_policy
from .policy import ArgCondition, ComparisonOp, Operand, Policy, RuntimeConstant

log = logging.getLogger("openinfer.sandbox")


def apply_policy(name_or_path: str | os.PathLike[str] | Policy, *, constants: Mapping[str, int] | None = None) -> Policy:
    """Load a policy and install it, irrevocably, on the calling process and all its threads.

    Pass a name ("worker"), a path, or a Policy from load_policy (load it before a uid drop or Landlock
    makes the policy files unreadable). `constants` supplies runtime constants the policy declares;
    SELF_PID defaults to os.getpid(). Sets PR_SET_NO_NEW_PRIVS first. Raises PolicyError for a bad policy
    and SandboxError if anything else fails; on success every thread shows `Seccomp: 2` and
    `NoNewPrivs: 1`. Filters stack: a later policy can only narrow what an earlier one allows.
    """
    policy = name_or_path if isinstance(name_or_path, Policy) else load_policy(name_or_path)
    values = runtime_values(policy, constants)
    seccomp_filter = build_filter(policy, values)
    set_no_new_privs()
    log.info(
        "loading seccomp policy",
        extra={"policy": policy.name, "path": str(policy.path), "default_action": str(policy.default_action), "rules": len(policy.rules)},
    )
    try:
        seccomp_filter.load()
    except OSError as exc:
        raise SandboxError(f"loading seccomp policy {policy.name!r} failed: {exc}") from exc
    return policy


def runtime_values(policy: Policy, constants: Mapping[str, int] | None) -> dict[str, int]:
    """Runtime constant values for `policy`: built-ins (SELF_PID) overridden by the caller's, all checked."""
    values: dict[str, int] = {"SELF_PID": os.getpid()}
    for name, value in (constants or {}).items():
        if name not in policy.runtime_constants and name not in BUILTIN_RUNTIME_CONSTANTS:
            raise SandboxError(f"policy {policy.name!r} declares no runtime constant {name!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise SandboxError(f"runtime constant {name!r} must be an int, got {value!r}")
        values[name] = value
    missing = sorted(policy.runtime_constants - values.keys())
    if missing:
        raise SandboxError(f"policy {policy.name!r} needs runtime constants {missing}")
    return values


def build_filter(policy: Policy, values: Mapping[str, int]) -> pyseccomp.SyscallFilter:
    """A libseccomp filter for `policy` with runtime constants substituted, not yet loaded."""
    try:
        seccomp_filter = pyseccomp.SyscallFilter(policy.default_action.to_seccomp())
        # Syscalls from another ABI (i386 int 0x80, x32) would dodge every rule: kill them outright.
        seccomp_filter.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        seccomp_filter.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
        seccomp_filter.set_attr(pyseccomp.Attr.CTL_NNP, 1)
        if policy.log_denials:
            seccomp_filter.set_attr(pyseccomp.Attr.CTL_LOG, 1)
    except OSError as exc:
        raise SandboxError(f"libseccomp refused the filter settings for {policy.name!r}: {exc}") from exc
    for rule in policy.rules:
        if rule.action == policy.default_action:
            continue  # changes nothing (rules never overlap), and libseccomp rejects it with EACCES
        args = [_argument(condition, values) for condition in rule.args]
        try:
            seccomp_filter.add_rule(rule.action.to_seccomp(), rule.syscall, *args)
        except OSError as exc:
            raise SandboxError(f"libseccomp rejected {rule.describe()} from {rule.source}: {exc}") from exc
    return seccomp_filter


def filter_pseudocode(policy: Policy, constants: Mapping[str, int] | None = None) -> str:
    """libseccomp's readable rendering of the filter (what `openinfer sandbox show` could print)."""
    seccomp_filter = build_filter(policy, runtime_values(policy, constants))
    with tempfile.TemporaryFile(mode="w+") as out:
        seccomp_filter.export_pfc(out)
        out.seek(0)
        return out.read()


def _argument(condition: ArgCondition, values: Mapping[str, int]) -> pyseccomp.Arg:
    value = _resolve(condition.value, values)
    if condition.op is ComparisonOp.MASKED_EQ:
        # libseccomp's SCMP_CMP_MASKED_EQ takes (mask, value) in that order.
        return pyseccomp.Arg(condition.index, condition.op.to_seccomp(), _resolve(condition.mask, values), value)
    return pyseccomp.Arg(condition.index, condition.op.to_seccomp(), value)


def _resolve(operand: Operand | None, values: Mapping[str, int]) -> int:
    assert operand is not None
    if isinstance(operand, RuntimeConstant):
        return to_u64(values[operand.name])
    return operand
