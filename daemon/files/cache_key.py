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


def cache_key(source_sha256: str) -> str:
    return f"{source_sha256[:32]}-ort{onnxruntime_version()}-{cpu_fingerprint()}"
