"""What sandbox a process is in, read from /proc, for `openinfer status` and tests.

Reads only /proc files: under the worker policy those opens fail with EPERM (and nothing else is tried),
so calling describe_sandbox() after the serve policy returns {"proc_readable": False} instead of dying.
Call it just before applying the serve policy to capture the full picture.
"""
from __future__ import annotations

import os
import re
from typing import Any

from .landlock import landlock_abi

_NAMESPACES = ("user", "net", "ipc", "mnt", "pid", "uts", "cgroup", "time")
_LIMITS = {"Max address space": "as", "Max open files": "nofile", "Max file size": "fsize", "Max core file size": "core"}


def read_status_fields(path: str) -> dict[str, str]:
    """`Key: value` lines of a /proc status file; {} if it cannot be read."""
    try:
        with open(path, "rb") as status:
            # bytes.decode("ascii") needs no codec import: after a uid drop the stdlib may be unreadable
            text = status.read().decode("ascii", "replace")
    except OSError:
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def describe_sandbox() -> dict[str, Any]:
    """Seccomp mode of every thread, no_new_privs, ids, capabilities, namespaces that differ from pid 1,
    the Landlock ABI the kernel offers (whether a domain is in force is not visible in /proc: callers keep
    what apply_landlock returned), and the rlimits that bound a worker."""
    status = read_status_fields("/proc/self/status")
    if not status:
        return {"pid": os.getpid(), "proc_readable": False}
    threads = _thread_states()
    return {
        "pid": os.getpid(),
        "proc_readable": True,
        "seccomp_mode": int(status.get("Seccomp", "0")),
        "seccomp_filters": int(status.get("Seccomp_filters", "0")),
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "threads": threads,
        "all_threads_filtered": bool(threads) and all(t["seccomp_mode"] == 2 and t["no_new_privs"] for t in threads.values()),
        "uid": [int(v) for v in status.get("Uid", "").split()],
        "gid": [int(v) for v in status.get("Gid", "").split()],
        "groups": [int(v) for v in status.get("Groups", "").split()],
        "cap_eff": status.get("CapEff", ""),
        **_namespaces(),
        "landlock_abi_available": landlock_abi(),
        "rlimits": _limits(),
    }


def _thread_states() -> dict[str, dict[str, Any]]:
    states: dict[str, dict[str, Any]] = {}
    try:
        tids = sorted(os.listdir("/proc/self/task"), key=int)
    except OSError:
        return states
    for tid in tids:
        fields = read_status_fields(f"/proc/self/task/{tid}/status")
        if fields:  # a thread may exit while we look
            states[tid] = {
                "name": fields.get("Name", ""),
                "seccomp_mode": int(fields.get("Seccomp", "0")),
                "no_new_privs": fields.get("NoNewPrivs") == "1",
            }
    return states


def _namespaces() -> dict[str, list[str]]:
    differing: list[str] = []
    unknown: list[str] = []
    for name in _NAMESPACES:
        try:
            own = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            continue  # namespace type not in this kernel
        try:
            init = os.readlink(f"/proc/1/ns/{name}")
        except OSError:
            unknown.append(name)  # pid 1's links need ptrace access: not readable as a normal user
            continue
        if own != init:
            differing.append(name)
    return {"namespaces": differing, "namespaces_unknown": unknown}


def _limits() -> dict[str, dict[str, int | None]]:
    limits: dict[str, dict[str, int | None]] = {}
    try:
        with open("/proc/self/limits", "rb") as table:
            lines = table.read().decode("ascii", "replace").splitlines()[1:]
    except OSError:
        return limits
    for line in lines:
        columns = re.split(r"\s{2,}", line.strip())
        if len(columns) >= 3 and columns[0] in _LIMITS:
            soft, hard = (None if c == "unlimited" else int(c) for c in columns[1:3])
            limits[_LIMITS[columns[0]]] = {"soft": soft, "hard": hard}
    return limits
