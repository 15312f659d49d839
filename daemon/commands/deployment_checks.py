"""What `openinfer sandbox check` looks at around the sandbox: the files and directories a deployment gives
the daemon, checked the way the daemon itself will use them (issue #16).

- runtime_dir, cache_dir: must belong to the daemon's user, be writable by nobody else and not be symlinks
  (daemon/files/private_dir.py: the daemon refuses to start otherwise);
- socket: the ipc:// socket's directory must not be writable by others (they could replace the socket or
  its lock), and the socket, once there, must be a socket of ours with the configured mode;
- repository: nothing in it writable by anyone but its owner (root or the daemon's user), no symlinks
  (they are never followed: such models fail), only directories and regular files;
- repository_readable: every model readable by the worker user, tried with that user's rights through the
  function workers and the prepare helper use (daemon/files/model_files.py).

Each check yields one row; `ok` is False on a finding.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from openinfer.daemon.files.model_files import ModelFileError, describe_user, open_model
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.files.private_dir import directory_problem
from openinfer.daemon.modelstore.repository import scan_repository
from openinfer.daemon.files.runtime_dir import base_runtime_dir
from openinfer.daemon.config.settings import Settings
from openinfer.daemon.config.worker_user import resolve_worker_user

MAX_LISTED = 10  # paths named per finding; the rest are counted


@dataclass(frozen=True)
class CheckResult:
    check: str
    ok: bool
    detail: str


def run_deployment_checks(settings: Settings, address: str) -> list[CheckResult]:
    """`address`: the socket the daemon would serve on (resolved, e.g. by client.protocol.resolve_address)."""
    results = [_runtime_dir(settings), _cache_dir(settings), _socket(settings, address)]
    return results + _repository(settings)


def all_ok(results: list[CheckResult]) -> bool:
    return all(result.ok for result in results)


def _private_dir(check: str, path: Path, absent: str) -> CheckResult:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return CheckResult(check, True, f"{path}: {absent}")
    problem = directory_problem(st, os.geteuid())
    if problem is None:
        return CheckResult(check, True, f"{path}: ours (uid {st.st_uid}), mode {stat.S_IMODE(st.st_mode):04o}")
    return CheckResult(check, False, f"{path} {problem}: the daemon will refuse to start; remove it or choose a directory of the daemon's user")


def _runtime_dir(settings: Settings) -> CheckResult:
    path = base_runtime_dir(settings.server.runtime_dir)
    return _private_dir("runtime_dir", path, "absent, created private (0711) at start")


def _cache_dir(settings: Settings) -> CheckResult:
    if not settings.server.cache_dir:
        return CheckResult("cache_dir", True, "not configured: prepared weights live in the runtime directory")
    return _private_dir("cache_dir", Path(settings.server.cache_dir), "absent, created private (0711) at start")


def _socket(settings: Settings, address: str) -> CheckResult:
    if not address.startswith("ipc://"):
        return CheckResult("socket", True, f"{address}: no socket file")
    path = Path(address[len("ipc://") :])
    try:
        parent = os.lstat(path.parent)
    except FileNotFoundError:
        return CheckResult("socket", True, f"{path.parent}: absent, created (0750) at start")
    if stat.S_ISLNK(parent.st_mode) or parent.st_mode & 0o022 or parent.st_uid not in (0, os.geteuid()):
        return CheckResult("socket", False, f"{path.parent} (uid {parent.st_uid}, mode {stat.S_IMODE(parent.st_mode):04o}) is a symlink, or writable or owned by someone else: they could replace the socket; put it in a directory of the daemon's own")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return CheckResult("socket", True, f"{path}: absent (daemon not running); its directory is private")
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or mode != settings.server.socket_mode:
        return CheckResult("socket", False, f"{path}: {'a socket' if stat.S_ISSOCK(st.st_mode) else 'NOT a socket'} of uid {st.st_uid}, mode {mode:04o}; expected a socket of uid {os.geteuid()}, mode {settings.server.socket_mode:04o}")
    return CheckResult("socket", True, f"{path}: socket of uid {st.st_uid}, mode {mode:04o}")


def _repository(settings: Settings) -> list[CheckResult]:
    if not settings.server.models:
        return [CheckResult("repository", True, "not configured (--models or server.models)")]
    root = Path(os.path.abspath(settings.server.models))
    if not root.is_dir():
        return [CheckResult("repository", False, f"{root} is not a directory")]
    writable, symlinks, strange = _walk(root)
    results = [
        _listed("repository", writable, "writable by someone other than root or the daemon's user (they could swap a model)", f"{root}: only root or the daemon's user can change it"),
        _listed("repository_symlinks", symlinks, "symlinks, never followed (those models fail): put the files themselves there", "no symlinks"),
        _listed("repository_files", strange, "neither directories nor regular files", "only directories and regular files"),
    ]
    return results + [_readable(settings, root)]


def _walk(root: Path) -> tuple[list[str], list[str], list[str]]:
    writable: list[str] = []
    symlinks: list[str] = []
    strange: list[str] = []
    owners = {0, os.geteuid()}
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            path = os.path.normpath(os.path.join(directory, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                symlinks.append(f"{path} -> {os.readlink(path)}")
                continue
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                strange.append(path)
            if st.st_mode & 0o022 or st.st_uid not in owners:
                writable.append(f"{path} (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    return writable, symlinks, strange


def _listed(check: str, found: list[str], what: str, fine: str) -> CheckResult:
    if not found:
        return CheckResult(check, True, fine)
    more = f" and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
    return CheckResult(check, False, f"{what}: {', '.join(found[:MAX_LISTED])}{more}")


def _readable(settings: Settings, root: Path) -> CheckResult:
    try:
        entries = scan_repository(root)
    except ConfigError as exc:
        return CheckResult("repository_readable", False, str(exc))
    paths = [str(v.path) for entry in entries if entry.config.chain is None for v in entry.versions]  # a chain has no file of its own
    uid = gid = None
    if os.geteuid() == 0 and settings.sandbox.enabled:
        try:
            uid, gid = resolve_worker_user(settings.sandbox.worker_user)
        except ConfigError as exc:
            return CheckResult("repository_readable", False, str(exc))
    failures = _open_as(uid, gid, str(root), paths)
    user = describe_user(uid if uid is not None else os.geteuid())
    if failures:
        return CheckResult("repository_readable", False, " | ".join(failures[:MAX_LISTED]))
    return CheckResult("repository_readable", True, f"all {len(paths)} model files readable by {user}")


def _open_as(uid: int | None, gid: int | None, repository: str, paths: list[str]) -> list[str]:
    """The messages of the model files that cannot be opened with uid/gid's rights (None: ours). As root,
    in a forked child that drops to uid/gid for good, the way a worker does."""
    if uid is None or gid is None:
        return _failures(repository, paths, describe_user(os.geteuid()))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with os.fdopen(write_end, "w") as out:
                json.dump(_failures(repository, paths, describe_user(uid)), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return [f"could not try the model files as uid {uid} (child exit status {status})"]
    return list(json.loads(text))


def _failures(repository: str, paths: list[str], user: str) -> list[str]:
    failures = []
    for path in paths:
        try:
            version_dir, fd = open_model(repository, path, user)
        except ModelFileError as exc:
            failures.append(str(exc))
            continue
        os.close(fd)
        os.close(version_dir)
    return failures
