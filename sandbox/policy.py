"""The in-memory form of a seccomp policy: what a TOML policy file means once it has been validated.

Everything here is immutable and already checked (syscall names resolve, constants are numbers), except
runtime constants, which stay symbolic (`RuntimeConstant`) until apply_policy knows their values.
"""
from __future__ import annotations

import enum
import errno as errno_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyseccomp


class ActionKind(enum.Enum):
    ALLOW = "allow"
    KILL_PROCESS = "kill_process"
    KILL_THREAD = "kill_thread"
    ERRNO = "errno"
    LOG = "log"
    TRAP = "trap"


@dataclass(frozen=True)
class Action:
    """What the kernel does when a rule (or the default) matches. `errno` is set only for ActionKind.ERRNO."""

    kind: ActionKind
    errno: int | None = None

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse `allow`, `kill_process`, `kill_thread`, `log`, `trap` or `errno:NAME` / `errno:NUMBER`.

        Raises ValueError with a message fit for a PolicyError.
        """
        if not isinstance(text, str):
            raise ValueError(f"action must be a string, got {text!r}")
        head, sep, tail = text.partition(":")
        try:
            kind = ActionKind(head)
        except ValueError:
            known = ", ".join(k.value for k in ActionKind if k is not ActionKind.ERRNO)
            raise ValueError(f"unknown action {text!r} (expected {known} or errno:NAME)") from None
        if kind is not ActionKind.ERRNO:
            if sep:
                raise ValueError(f"action {head!r} takes no argument, got {text!r}")
            return cls(kind)
        if not tail:
            raise ValueError(f"action {text!r} needs an errno, e.g. errno:EPERM")
        if tail.isdigit():
            number = int(tail)
        elif tail in errno_module.__dict__ and tail.startswith("E") and isinstance(errno_module.__dict__[tail], int):
            number = errno_module.__dict__[tail]
        else:
            raise ValueError(f"unknown errno {tail!r} in action {text!r}")
        if not 0 < number < 4096:  # the kernel returns -errno; only 1..4095 reads as an error in userspace
            raise ValueError(f"errno {number} in action {text!r} is out of range 1..4095")
        return cls(kind, number)

    def to_seccomp(self) -> int:
        """The SECCOMP_RET_* value libseccomp expects."""
        if self.kind is ActionKind.ERRNO:
            assert self.errno is not None
            return int(pyseccomp.ERRNO(self.errno))
        return _SECCOMP_ACTIONS[self.kind]

    def __str__(self) -> str:
        if self.kind is ActionKind.ERRNO:
            assert self.errno is not None
            return f"errno:{errno_module.errorcode.get(self.errno, self.errno)}"
        return str(self.kind.value)


_SECCOMP_ACTIONS: dict[ActionKind, int] = {
    ActionKind.ALLOW: pyseccomp.ALLOW,
    ActionKind.KILL_PROCESS: pyseccomp.KILL_PROCESS,
    ActionKind.KILL_THREAD: pyseccomp.KILL_THREAD,
    ActionKind.LOG: pyseccomp.LOG,
    ActionKind.TRAP: pyseccomp.TRAP,
}


class ComparisonOp(enum.Enum):
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    MASKED_EQ = "masked_eq"

    def to_seccomp(self) -> int:
        return _SECCOMP_OPS[self]


_SECCOMP_OPS: dict[ComparisonOp, int] = {
    ComparisonOp.EQ: pyseccomp.EQ,
    ComparisonOp.NE: pyseccomp.NE,
    ComparisonOp.LT: pyseccomp.LT,
    ComparisonOp.LE: pyseccomp.LE,
    ComparisonOp.GT: pyseccomp.GT,
    ComparisonOp.GE: pyseccomp.GE,
    ComparisonOp.MASKED_EQ: pyseccomp.MASKED_EQ,
}


@dataclass(frozen=True)
class RuntimeConstant:
    """A value only known when the policy is applied (e.g. SELF_PID, the applying process's pid)."""

    name: str

    def __str__(self) -> str:
        return self.name


Operand = int | RuntimeConstant  # ints are already 64-bit register images (see constants.to_u64)


@dataclass(frozen=True)
class ArgCondition:
    """`(arg[index] & mask) == value` for masked_eq, else `arg[index] <op> value`, all unsigned 64-bit."""

    index: int
    op: ComparisonOp
    value: Operand
    mask: Operand | None = None

    def __str__(self) -> str:
        if self.op is ComparisonOp.MASKED_EQ:
            return f"(arg{self.index} & {_show(self.mask)}) == {_show(self.value)}"
        return f"arg{self.index} {self.op.value} {_show(self.value)}"


def _show(operand: Operand | None) -> str:
    return hex(operand) if isinstance(operand, int) else str(operand)


@dataclass(frozen=True)
class SyscallRule:
    """One syscall, the conditions that must all hold (none = always), and the action when they do."""

    syscall: str
    action: Action
    args: tuple[ArgCondition, ...] = ()
    source: str = ""  # "FILE:LINE" of the [[rule]] that produced it, for messages
    comment: str = field(default="", compare=False)  # the rule's `comment`: why it exists

    def describe(self) -> str:
        conditions = " and ".join(str(a) for a in self.args) or "always"
        return f"{self.syscall}: {self.action} when {conditions}"


@dataclass(frozen=True)
class Policy:
    """A validated policy. Rules for one syscall never overlap with different actions (checked at load)."""

    name: str
    path: Path
    default_action: Action
    rules: tuple[SyscallRule, ...]
    description: str = ""
    log_denials: bool = False
    runtime_constants: frozenset[str] = field(default_factory=frozenset)
    included: tuple[Path, ...] = ()
    constants: Mapping[str, int] = field(default_factory=dict, hash=False)  # [constants] here and in includes

    def rules_for(self, syscall: str) -> tuple[SyscallRule, ...]:
        return tuple(rule for rule in self.rules if rule.syscall == syscall)

    @property
    def syscalls(self) -> frozenset[str]:
        return frozenset(rule.syscall for rule in self.rules)
