"""Turning kernel seccomp audit records back into syscall names (the audit-policy workflow)."""
from __future__ import annotations

import pytest

from openinfer.sandbox.audit_log import SeccompEvent, parse_audit_line, summarize

pytestmark = pytest.mark.unit

KILL = ('audit: type=1326 audit(1795337862.758:46): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=11707 comm="python" '
        'exe="/usr/bin/python3.11" sig=31 arch=c000003e syscall=41 compat=0 ip=0x7f621b928dc7 code=0x80000000')
LOGGED = ('[ 2084.394656] audit: type=1326 audit(1795338424.514:223): auid=4294967295 uid=0 gid=0 ses=4294967295 '
          'pid=18968 comm="python" exe="/usr/bin/python3.11" sig=0 arch=c000003e syscall=63 compat=0 ip=0x7f60188f1b07 code=0x7ffc0000')
ERRNO = LOGGED.replace("syscall=63", "syscall=257").replace("code=0x7ffc0000", "code=0x50001")


def test_parse_kernel_records() -> None:
    assert parse_audit_line(KILL) == SeccompEvent(11707, "python", "socket", "kill_process")
    assert parse_audit_line(LOGGED) == SeccompEvent(18968, "python", "uname", "log")
    assert parse_audit_line(ERRNO) == SeccompEvent(18968, "python", "openat", "errno")
    assert parse_audit_line("[    1.2] EXT4-fs (vda): mounted filesystem") is None


def test_summarize_counts_per_syscall_and_action() -> None:
    assert summarize([LOGGED, KILL, LOGGED, "noise"]) == {("uname", "log"): 2, ("socket", "kill_process"): 1}
