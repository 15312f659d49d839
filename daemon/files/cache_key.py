"""What prepared weights depend on, computed the same way by the supervisor and the prepare helper.

The supervisor chooses the cache key (`<cache>/<key>`) itself, from the source bytes it hashed, never from
what the helper reports (issue #16): so this module must not import onnxruntime or parse ONNX. Hashing is
not parsing; the onnxruntime version comes from the installed distribution's metadata.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import importlib.metadata
import os
import stat
from dataclasses import dataclass

CHUNK = 1 << 22


@functools.cache
def onnxruntime_version() -> str:
    return importlib.metadata.version("onnxruntime")


def cpu_fingerprint() -> str:
    """What the packed weight layout depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return "unknown"
    wanted = [line for line in text.splitlines() if line.startswith(("flags", "model name", "vendor_id"))]
    return hashlib.sha256("\n".join(sorted(set(wanted))).encode()).hexdigest()[:12]


def fd_sha256(fd: int, max_bytes: int | None = None) -> str:
    """sha256 of the whole file behind `fd` (pread: the descriptor's offset is left alone). With `max_bytes`
    (the size the caller checked), OSError(EFBIG) rather than read on: the file grew meanwhile, and a file
    in a hostile repository can grow without bound (a sparse one costs nothing on disk)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
        if max_bytes is not None and offset > max_bytes:
            raise OSError(errno.EFBIG, f"the file grew past the {max_bytes} bytes it had when it was checked, while it was hashed")
    return digest.hexdigest()


MAX_VERSION_ENTRIES = 1000  # entries of a version directory, at every depth: its walk stays a few ms
MAX_VERSION_DEPTH = 8
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class VersionFiles:
    """What the rest of a model's version directory holds, beside its model file: the external-data files
    a prepared model was built from are among them. The supervisor cannot tell which ones (that would be
    parsing the model), so every entry counts: a change to any of them is a new key (attacker round 28:
    two models with the same model.onnx and different external data shared one key, and one of them was
    served the other's weights; a replaced data file kept the old weights across restarts)."""

    sha256: str  # of each entry's path, kind and, for a regular file, its bytes
    stamps: tuple[tuple[str, int, int, int, int, int], ...]  # (path, mode, inode, size, mtime, ctime) of each
    total_bytes: int  # the regular files' apparent sizes, added up: what hashing them reads


def version_files(version_dir: int, model_file: str, max_bytes: int | None, hash_bytes: bool = True) -> VersionFiles:
    """Every entry beneath `version_dir` but the model file `model_file` (its basename), in name order at
    every level, without following a symlink (a symlink, a FIFO or a device counts by its kind and name,
    never opened). OSError when the directory holds more than MAX_VERSION_ENTRIES entries, nests deeper
    than MAX_VERSION_DEPTH, or its regular files come to more than `max_bytes` by their apparent size
    (None: no bound): hashing is bounded as the model file's is (a sparse file costs nothing on disk).
    `hash_bytes=False`: the stamps only (`sha256` is then of names and sizes alone), to tell that nothing
    changed since a walk that hashed."""
    digest = hashlib.sha256()
    stamps: list[tuple[str, int, int, int, int, int]] = []
    total = listed = 0

    def walk(dir_fd: int, prefix: str, depth: int) -> None:
        nonlocal total, listed
        entries = []
        with os.scandir(dir_fd) as listing:
            for entry in listing:  # counted as they are read: a million entries are never all listed (round 29)
                if not prefix and entry.name == model_file:
                    continue
                listed += 1
                if listed > MAX_VERSION_ENTRIES:
                    raise OSError(errno.E2BIG, f"the version directory holds more than {MAX_VERSION_ENTRIES} entries")
                entries.append(entry)
        entries.sort(key=lambda entry: entry.name)
        for entry in entries:
            path = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            stamps.append((path, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            record = os.fsencode(path) + b"\0"
            if stat.S_ISDIR(st.st_mode):
                if depth >= MAX_VERSION_DEPTH:
                    raise OSError(errno.E2BIG, f"the version directory nests deeper than {MAX_VERSION_DEPTH} levels ({path})")
                digest.update(b"d" + record)
                sub = os.open(entry.name, _OPEN_DIR, dir_fd=dir_fd)
                try:
                    walk(sub, path + "/", depth + 1)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                if max_bytes is not None and total > max_bytes:
                    raise OSError(errno.EFBIG, f"the files beside the model come to more than {max_bytes} bytes")
                digest.update(b"f" + record + str(st.st_size).encode() + b"\0")
                if hash_bytes:
                    fd = os.open(entry.name, _OPEN_FILE, dir_fd=dir_fd)
                    try:
                        if not stat.S_ISREG(os.fstat(fd).st_mode):
                            raise OSError(errno.EAGAIN, f"{path} was replaced while it was hashed")
                        digest.update(fd_sha256(fd, st.st_size).encode())
                    finally:
                        os.close(fd)
            else:
                digest.update(b"o%o" % stat.S_IFMT(st.st_mode) + record)

    top = os.open(".", _OPEN_DIR, dir_fd=version_dir)
    try:
        walk(top, "", 0)
    finally:
        os.close(top)
    return VersionFiles(digest.hexdigest(), tuple(stamps), total)


def cache_key(source_sha256: str, files_sha256: str, owner: str) -> str:
    """`<cache>/<key>`: whose it is (`owner`: the model version's repository, name and version), the model
    file's hash, the rest of its version directory's (version_files), and what the packed layout depends
    on. No two model versions share an entry, even with the same bytes: what a prepare helper wrote
    (it parsed the model: a hostile one may own it) or what changed under it unseen (a same-size rewrite
    within one tick of a coarse clock, round 31's suspicion) reaches no other model."""
    return f"{owner_prefix(owner)}-{source_sha256[:32]}-{files_sha256[:32]}-ort{onnxruntime_version()}-{cpu_fingerprint()}"


def owner_prefix(owner: str) -> str:
    """The first field of every key of `owner` (cache_key)."""
    return hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:16]
