"""The supervisor's side of shared weights: where prepared directories live and how they come into place.

The helper that writes a prepared directory parses the untrusted model, so nothing it writes or says is
trusted (issue #16). The supervisor chose the key before starting it (preparation.py); when the helper
reports success, its temporary directory is first taken from the worker user (root owns it, so its entries
can no longer change), then checked - exactly the four expected names (prepared_layout.py), each a regular
file with one link and a bounded size, opened without following symlinks, and a manifest that names the
source the supervisor hashed, its onnxruntime and CPU - then made read-only for everyone through those same
descriptors and renamed into `<cache>/<key>`. A directory that failed verification is renamed aside, never
rewritten: workers that still map its files keep valid pages.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openinfer.daemon.modelstore.modelconfig import ConfigError

from .cache_key import fd_sha256
from .prepared_layout import FILES, MANIFEST, MANIFEST_MAX_BYTES, OPT_MODEL, WEIGHTS
from .private_dir import open_private_dir

log = logging.getLogger("openinfer.supervisor")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
LOCK = ".lock"  # held by the daemon that uses the cache (never swept: only .tmp- and .stale- entries are)
# The names this store makes (cache_key.cache_key; before its owner and files fields, keys had fewer
# fields - entries of older daemons are still collected): nothing else in the directory is touched.
_KEY = re.compile(r"(?:[0-9a-f]{16}-)?[0-9a-f]{32}(?:-[0-9a-f]{32})?-ort[0-9A-Za-z.+_]+-(?:[0-9a-f]{12}|unknown)")
_TMP = re.compile(r"\.tmp-[0-9a-f]{16}")
_STALE = re.compile(r"\.stale-" + _KEY.pattern + r"-[0-9]+")
_MANIFEST_TEXT = ("source", "source_sha256", "onnxruntime", "cpu", "weights_sha256", "model_sha256")


class PreparedRejected(Exception):
    """A prepared directory is not exactly what it must be; the message says what was found."""


@dataclass(frozen=True)
class Expectation:
    """What the supervisor computed itself, before any helper ran: a prepared directory must match it."""

    source_sha256: str
    onnxruntime: str
    cpu: str
    max_file_bytes: int


class PreparedStore:
    def __init__(self, base: Path, worker_uid: int | None) -> None:
        self.base = base
        self.worker_uid = worker_uid
        self.base_fd = open_private_dir(base, 0o711, "prepared-weights cache")
        # Ours alone while we run: a start sweeps what is in progress or set aside, and retire_unused sets
        # aside what no model of ours maps - another daemon's live entries too (round 33: its next
        # worker then found its weights gone, and the model crash-looped).
        self.lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=self.base_fd)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            os.close(self.base_fd)
            raise ConfigError(f"server.cache_dir {base} is in use by another openinfer daemon (its lock {base / LOCK} is held): give each daemon a cache directory of its own") from None
        if worker_uid is not None:  # workers run as another user: they must reach <base>/<key> (never list it)
            os.fchmod(self.base_fd, stat.S_IMODE(os.fstat(self.base_fd).st_mode) | 0o711)
        self.sweep()

    def close(self) -> None:
        os.close(self.lock_fd)
        os.close(self.base_fd)

    def path(self, key: str) -> Path:
        return self.base / key

    def sweep(self) -> None:
        """Remove what an interrupted run left: temporary and retired directories - only names this store
        makes (round 34: anything named .tmp-/.stale- went, and what retire_unused had set aside of a
        directory that was not a cache, its repository included)."""
        for child in os.scandir(self.base_fd):
            if _TMP.fullmatch(child.name) or _STALE.fullmatch(child.name):
                self._remove(child.name)

    def _remove(self, name: str) -> None:
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=self.base_fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=self.base_fd, ignore_errors=True)
            else:  # (rmtree leaves a file where it is, silently)
                os.unlink(name, dir_fd=self.base_fd)
        except OSError:
            pass

    def new_tmp_dir(self) -> Path:
        """A private directory for one helper to write into (the helper runs as the worker user)."""
        name = f".tmp-{secrets.token_hex(8)}"
        os.mkdir(name, 0o700, dir_fd=self.base_fd)
        if self.worker_uid is not None:
            fd = os.open(name, _OPEN_DIR, dir_fd=self.base_fd)
            try:
                os.fchown(fd, self.worker_uid, -1)
            finally:
                os.close(fd)
        return self.base / name

    def remove_tmp(self, tmp: Path) -> None:
        shutil.rmtree(self._own_child(tmp), dir_fd=self.base_fd, ignore_errors=True)

    def holds(self, key: str, expected: Expectation) -> str | None:
        """None when `<base>/<key>` may be reused for `expected` (layout, manifest and file hashes all
        check out), else why not. Reads every byte of the weights: run it off the supervisor's loop."""
        try:
            dir_fd = os.open(key, _OPEN_DIR, dir_fd=self.base_fd)
        except FileNotFoundError:
            return "not prepared yet"
        except OSError as exc:
            return f"{self.base / key}: {exc.strerror}"
        try:
            with _Checked(dir_fd, expected) as checked:
                if fd_sha256(checked.fds[WEIGHTS]) != checked.manifest["weights_sha256"]:
                    return f"{WEIGHTS} does not match its manifest"
                if fd_sha256(checked.fds[OPT_MODEL]) != checked.manifest["model_sha256"]:
                    return f"{OPT_MODEL} does not match its manifest"
            return None
        except PreparedRejected as exc:
            return str(exc)
        finally:
            os.close(dir_fd)

    def finalize(self, tmp: Path, key: str, expected: Expectation) -> Path:
        """Check the helper's directory and rename it to `<base>/<key>`; PreparedRejected (and the directory
        removed) when it is not exactly a prepared directory for `expected`."""
        name = self._own_child(tmp)
        dir_fd = os.open(name, _OPEN_DIR, dir_fd=self.base_fd)
        try:
            if os.geteuid() == 0:
                os.fchown(dir_fd, 0, 0)  # first: from now on the worker user cannot add, remove or rename
            os.fchmod(dir_fd, 0o755)
            with _Checked(dir_fd, expected) as checked:
                for fd in checked.fds.values():
                    if os.geteuid() == 0:
                        os.fchown(fd, 0, 0)
                    os.fchmod(fd, 0o644)
        except (PreparedRejected, OSError) as exc:
            os.close(dir_fd)
            shutil.rmtree(name, dir_fd=self.base_fd, ignore_errors=True)
            raise PreparedRejected(str(exc)) from None
        os.close(dir_fd)
        try:
            os.stat(key, dir_fd=self.base_fd, follow_symlinks=False)
            self.discard(key)
        except FileNotFoundError:
            pass
        os.rename(name, key, src_dir_fd=self.base_fd, dst_dir_fd=self.base_fd)
        return self.base / key

    def retire_unused(self, keep: set[str], owners_preparing: set[str]) -> list[str]:
        """Retire (discard) every entry but those in `keep` (what live model versions map) and those of
        an owner still preparing (its plan may be about to use one: cache_key's first field). Nothing
        else ever removed an entry: each new version, data file, onnxruntime, repository path or name left
        a full copy of its weights for good (round 32: three copies of one model in four starts).
        Returns the keys retired."""
        retired = []
        for child in os.scandir(self.base_fd):
            name = child.name
            if not _KEY.fullmatch(name) or name in keep or name.split("-", 1)[0] in owners_preparing:
                continue  # (only entries: a cache_dir shared with other files, a repository even, keeps them - round 34)
            self.discard(name)
            retired.append(name)
        return retired

    def weights_bytes(self, key: str) -> int:
        return os.stat(f"{key}/{WEIGHTS}", dir_fd=self.base_fd, follow_symlinks=False).st_size

    def discard(self, key: str) -> None:
        try:
            os.rename(key, f".stale-{key}-{time.monotonic_ns()}", src_dir_fd=self.base_fd, dst_dir_fd=self.base_fd)
        except FileNotFoundError:
            return
        log.warning("prepared weights retired", extra={"key": key})

    def _own_child(self, tmp: Path) -> str:
        if tmp.parent != self.base or not tmp.name.startswith(".tmp-"):
            raise ValueError(f"{tmp} is not a temporary directory of this store")
        return tmp.name


class _Checked:
    """A prepared directory's files, opened without following symlinks and checked, with its manifest.
    `fds` stay open until the `with` block ends, so that whatever is done next happens to these files."""

    def __init__(self, dir_fd: int, expected: Expectation) -> None:
        self.dir_fd = dir_fd
        self.expected = expected
        self.fds: dict[str, int] = {}
        self.manifest: dict[str, Any] = {}

    def __enter__(self) -> "_Checked":
        try:
            self._check()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _check(self) -> None:
        names = set(os.listdir(self.dir_fd))
        if names != FILES:
            extra, missing = sorted(names - FILES), sorted(FILES - names)
            raise PreparedRejected("; ".join([*(f"unexpected entry {n!r}" for n in extra), *(f"missing {n!r}" for n in missing)]))
        for name in sorted(FILES):
            try:
                fd = os.open(name, _OPEN_FILE, dir_fd=self.dir_fd)
            except OSError as exc:
                raise PreparedRejected(f"{name!r}: {exc.strerror}") from None
            self.fds[name] = fd
            st = os.fstat(fd)
            limit = MANIFEST_MAX_BYTES if name == MANIFEST else self.expected.max_file_bytes
            if not stat.S_ISREG(st.st_mode):
                raise PreparedRejected(f"{name!r} is not a regular file")
            if st.st_nlink != 1:
                raise PreparedRejected(f"{name!r} has {st.st_nlink} links")
            if st.st_size > limit:
                raise PreparedRejected(f"{name!r} is {st.st_size} bytes, over the limit of {limit}")
        self.manifest = self._manifest()

    def _manifest(self) -> dict[str, Any]:
        raw = os.pread(self.fds[MANIFEST], MANIFEST_MAX_BYTES, 0)
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise PreparedRejected(f"{MANIFEST} is not JSON") from None
        if not isinstance(manifest, dict) or not all(isinstance(manifest.get(k), str) for k in _MANIFEST_TEXT):
            raise PreparedRejected(f"{MANIFEST} lacks one of {', '.join(_MANIFEST_TEXT)} (as text)")
        expected = self.expected
        for field, want in (("source_sha256", expected.source_sha256), ("onnxruntime", expected.onnxruntime), ("cpu", expected.cpu)):
            if manifest[field] != want:
                raise PreparedRejected(f"{MANIFEST}: {field} is {manifest[field][:80]!r}, expected {want!r}")
        weights_bytes = manifest.get("weights_bytes")
        if type(weights_bytes) is not int or weights_bytes != os.fstat(self.fds[WEIGHTS]).st_size:
            raise PreparedRejected(f"{MANIFEST}: weights_bytes does not match {WEIGHTS}")
        return manifest
