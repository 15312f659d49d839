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

from other_uid import call_as
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
    import socket

    from openinfer.daemon.direct.peer_credentials import peer_groups

    wanted = list(range(50_000, 50_300))
    # The kernel records the creator's groups for both ends of a socketpair.
    seen = call_as(0, lambda: list(peer_groups(socket.socketpair()[0])), gid=0, groups=tuple(wanted))
    assert set(wanted) <= set(seen)


def test_a_lease_granted_by_group_is_useless_to_a_process_of_the_same_uid_without_it(daemon_factory: Any, repo: Path, tmp_path: Path) -> None:  # noqa: F811
    """Round 38: a lease is bound to its uid; a process of the granted group took one and a process of the
    same uid without that group - refused at the front door - attached it on the worker and ran `infer`.
    A lease whose grant matched by group now names the groups, and the worker checks the attaching
    process holds one (SO_PEERGROUPS)."""
    from direct_peer import Peer, attach, infer

    from openinfer.client import Client

    policy = tmp_path / "access.toml"
    policy.write_text(
        f'[[grant]]\nname = "group-infer"\ngids = [{GRANTED_GID}]\noperations = ["infer"]\nmodels = ["public"]\n\n'
        '[[grant]]\nname = "root-health"\nuids = [0]\noperations = ["health", "status"]\n'
    )
    policy.chmod(0o644)
    daemon = daemon_factory(repo, env={"OPENINFER_SERVER_ACCESS_POLICY": str(policy), "OPENINFER_SERVER_SOCKET_MODE": "0o666", "OPENINFER_POOL_DIRECT": "1"})

    def take_lease() -> dict[str, Any]:
        with Client(daemon.address, direct=False) as client:
            lease = client._call("lease", model="public")
        return {"token": lease["lease"].hex(), "address": lease["workers"][0]["address"]}

    lease = call_as(ATTACKER, take_lease, groups=(GRANTED_GID,))

    def use_lease() -> list[Any]:
        peer = Peer(lease["address"])
        answers = [peer.ask(attach(bytes.fromhex(lease["token"])))]
        answers.append(peer.ask(infer(2)))
        return [None if a is None else {"error": a.get("error"), "ok": "result" in a or "outputs" in a} for a in answers]

    without = call_as(ATTACKER, use_lease)
    assert without[0]["error"]["code"] == "PERMISSION_DENIED" and "in group 0" in without[0]["error"]["message"], without
    assert without[1] is None or not without[1]["ok"], without
    with_group = call_as(ATTACKER, use_lease, groups=(GRANTED_GID,))  # control: the lease works for its group
    assert with_group[0]["ok"] and with_group[1]["ok"], with_group
