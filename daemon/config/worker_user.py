"""Whose uid and gid the workers take when the daemon runs as root (`sandbox.worker_user`).

A user name (from the system's user database), or `UID:GID`: ids of their own that no account needs to
exist for, the way systemd's DynamicUser= gives a service ids no one else has. Workers never run as root.
The default, `nobody`, exists everywhere but is shared: any process of uid 65534 (NFS squashes unknown
users to it, and many services run as it) can signal the workers - stop or kill them - though not
ptrace them or read their /proc (an attacker round showed SIGSTOP from uid 65534 failing the requests).
"""
from __future__ import annotations

import grp
import pwd
import re
from typing import Any, Callable

from openinfer.daemon.modelstore.modelconfig import ConfigError

SHARED_UID = 65534  # nobody / the kernel's overflow uid
_NUMERIC = re.compile(r"(\d{1,10}):(\d{1,10})")
_MAX_ID = 2**32 - 2  # (2**32 - 1 is "no id" to setresuid)


def resolve_worker_user(value: str) -> tuple[int, int]:
    """(uid, gid) for `sandbox.worker_user`; ConfigError naming the setting when it cannot be used."""
    numeric = _NUMERIC.fullmatch(value)
    if numeric is not None:
        uid, gid = int(numeric.group(1)), int(numeric.group(2))
        if uid > _MAX_ID or gid > _MAX_ID:
            raise ConfigError(f"sandbox.worker_user {value!r}: ids go up to {_MAX_ID}")
    else:
        try:
            entry = pwd.getpwnam(value)
        except KeyError:
            raise ConfigError(f"sandbox.worker_user {value!r}: no such user; name one, or give ids of their own as UID:GID") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0 or gid == 0:
        raise ConfigError(f"sandbox.worker_user {value!r}: workers never run as root (uid or gid 0)")
    return uid, gid


def shared_ids_warning(value: str, uid: int, gid: int) -> str | None:
    """What to tell the operator when the workers' ids are ones others have: uid 65534, or `UID:GID`
    naming an existing account or group (its members could enter the instance directory, 0710 with
    the workers' group; processes of the account could signal the workers)."""
    if uid == SHARED_UID:
        return (f"workers run as uid {SHARED_UID} (nobody), which other services share: any process of that uid can stop or kill "
                "them (not ptrace them or read their memory). Give them ids of their own: sandbox.worker_user = \"UID:GID\" "
                "(unused ids) or a user created for them alone")
    if _NUMERIC.fullmatch(value) is None:
        return None  # a user named: the operator chose that account
    user, group = _name(pwd.getpwuid, uid), _name(grp.getgrgid, gid)
    taken = "; ".join([*([f"uid {uid} is user {user}"] if user else []), *([f"gid {gid} is group {group}"] if group else [])])
    if not taken:
        return None
    return f"sandbox.worker_user {value!r} is meant to give workers ids of their own, but {taken}: that account's processes can signal the workers, that group's members can enter their directory"


def _name(lookup: Callable[[int], Any], number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return ""
