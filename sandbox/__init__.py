"""OpenInfer's sandbox layer: seccomp policies as data (policies/*.toml), process hardening, and probes.

    from openinfer.sandbox import apply_policy, load_policy
    apply_policy("worker")               # shipped policies/worker.toml; SELF_PID = os.getpid()

docs/SANDBOX.md describes the threat model, the layers, the order a worker applies them and the policy format.
"""
from __future__ import annotations

# Imported eagerly: pyseccomp's import forks `ldconfig -p` (ctypes.util.find_library), which has to happen
# before any policy or Landlock ruleset forbids fork and exec.
from .errors import PolicyError, SandboxError
from .loader import load_policy, shipped_policy_dir
from .policy import Action, ActionKind, ArgCondition, ComparisonOp, Policy, RuntimeConstant, SyscallRule
from .probes import ProbeResult, all_blocked, run_probes
from .seccomp_filter import apply_policy, filter_pseudocode

__all__ = [
    "Action",
    "ActionKind",
    "ArgCondition",
    "ComparisonOp",
    "Policy",
    "PolicyError",
    "ProbeResult",
    "RuntimeConstant",
    "SandboxError",
    "SyscallRule",
    "all_blocked",
    "apply_policy",
    "filter_pseudocode",
    "load_policy",
    "run_probes",
    "shipped_policy_dir",
]
