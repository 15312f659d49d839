"""What prepared weights depend on, computed the same way by the supervisor and the prepare helper.

The supervisor chooses the cache key (`<cache>/<key>`) itself, from the source bytes it hashed, never from
what the helper reports (issue #16): so this module must not import onnxruntime or parse ONNX. Hashing is
not parsing; the onnxruntime version comes from the installed distribution's metadata.
"""
from __future__ import annotations

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


def fd_sha256(fd: int) -> str:
    """sha256 of the whole file behind `fd` (pread: the descriptor's offset is left alone)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def cache_key(source_sha256: str) -> str:
    return f"{source_sha256[:32]}-ort{onnxruntime_version()}-{cpu_fingerprint()}"
