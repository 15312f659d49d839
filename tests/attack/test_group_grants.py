"""Grants by group (round 36): `groups = [...]` and `gids = [...]` match the groups the connecting process
holds - its primary group and its supplementary groups, both from the kernel at connect time (SO_PEERCRED,
SO_PEERGROUPS) - and nothing remembered of an earlier connection.

Before, the groups were looked up once per uid and kept until the next reload, the first connection's
primary gid among them: one process of a uid that connected with a granted primary group (a setgid helper)
let every later process of that uid in, whatever its groups; a uid that first connected with its own
group was refused later with a granted one; and the process's supplementary groups were never read (only
/etc/group's members by user name), so a granted supplementary group counted for nothing.
"""
from __future__ import annotations

import grp
from pathlib import Path
from typing import Any

import pytest

from test_access import as_user, repo  # noqa: F401  (repo: the fixture)

pytestmark = pytest.mark.attack

# Ids no account uses: the kernel's view is all there is to them.
ATTACKER, OTHER = 40001, 40002
GRANTED_GID = 0  # root's group: present on every system, so its name resolves


@pytest.mark.parametrize("selector", ["groups", "gids"])
def test_a_group_grant_follows_the_groups_each_connection_holds(daemon_factory: Any, repo: Path, tmp_path: Path, selector: str) -> None:  # noqa: F811
    chooser = f'groups = ["{grp.getgrgid(GRANTED_GID).gr_name}"]' if selector == "groups" else f"gids = [{GRANTED_GID}]"
    policy = tmp_path / "access.toml"
    policy.write_text(
        '[[grant]]\nname = "everyone-health"\nlocal = true\noperations = ["health"]\n\n'
        f'[[grant]]\nname = "group-stats"\n{chooser}\noperations = ["stats"]\n'
    )
    policy.chmod(0o644)
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666"})
    calls = [("stats", "")]
    # The granted group as the primary one (a setgid helper): allowed.
    assert as_user(ATTACKER, daemon.address, calls, gid=GRANTED_GID) == ["OK"]
    # The same uid without it, next: refused (before, the first connection's gid was kept for the uid).
    denied = as_user(ATTACKER, daemon.address, calls)
    assert denied[0].startswith("PERMISSION_DENIED") and "group-stats" not in denied[0], denied
    # Another uid: refused with its own group, then allowed with the granted one as a supplementary group
    # (before: refused - the groups read once, from /etc/group, which lists no member of that uid).
    assert as_user(OTHER, daemon.address, calls)[0].startswith("PERMISSION_DENIED")
    assert as_user(OTHER, daemon.address, calls, groups=(GRANTED_GID,)) == ["OK"]
    assert as_user(OTHER, daemon.address, calls)[0].startswith("PERMISSION_DENIED")


def test_a_peer_in_more_groups_than_pythons_getsockopt_can_read_is_read_whole() -> None:
    """SO_PEERGROUPS with more than 256 groups needs more than Python's 1024-byte getsockopt: the daemon
    reads them with a buffer of NGROUPS_MAX (else a granted group past the 256th would not count)."""
    import os
    import socket

    from openinfer.daemon.frontdoor.listener import peer_groups

    wanted = list(range(50_000, 50_300))
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        ok = False
        try:
            os.setgroups(wanted)
            a, b = socket.socketpair()  # the kernel records the creator's groups for both ends
            ok = set(wanted) <= set(peer_groups(a))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
