"""Read the kernel's seccomp audit lines (dmesg, journalctl -k, audit.log) back into syscall names.

For tightening a policy on a new platform: serve real traffic under policies/audit.toml, then

    dmesg | python -m openinfer.sandbox.audit_log          # or: journalctl -k -o cat | python -m ...

prints each syscall the worker made that the worker policy does not allow, with the action and a count.
"""
from __future__ import annotations

import collections
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import pyseccomp

_LINE = re.compile(r"type=(?:1326|SECCOMP)\b.*?\bpid=(\d+).*?\bcomm=\"([^\"]*)\".*?\barch=([0-9a-f]+).*?\bsyscall=(\d+).*?\bcode=(0x[0-9a-f]+)")
_ACTIONS = {0x80000000: "kill_process", 0x00000000: "kill_thread", 0x00030000: "trap", 0x00050000: "errno",
            0x7FC00000: "user_notif", 0x7FF00000: "trace", 0x7FFC0000: "log", 0x7FFF0000: "allow"}
_ACTION_MASK = 0xFFFF0000


@dataclass(frozen=True)
class SeccompEvent:
    pid: int
    command: str
    syscall: str
    action: str


def parse_audit_line(line: str) -> SeccompEvent | None:
    """One kernel audit record of type 1326 (SECCOMP), or None for any other line."""
    match = _LINE.search(line)
    if not match:
        return None
    pid, command, arch, number, code = match.groups()
    try:
        name = pyseccomp.resolve_syscall(int(arch, 16), int(number)).decode()
    except ValueError:
        name = f"syscall {number} (arch {arch})"
    action = _ACTIONS.get(int(code, 16) & _ACTION_MASK, code)
    return SeccompEvent(int(pid), command, name, action)


def summarize(lines: Iterable[str]) -> collections.Counter[tuple[str, str]]:
    """(syscall, action) -> how often, over every seccomp record in `lines`."""
    events = (parse_audit_line(line) for line in lines)
    return collections.Counter((e.syscall, e.action) for e in events if e is not None)


def main() -> int:
    for (syscall, action), count in sorted(summarize(sys.stdin).items()):
        print(f"{count:8d}  {action:12s}  {syscall}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
