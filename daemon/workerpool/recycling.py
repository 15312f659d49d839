"""Workers that keep what a run took: replaced between requests, before the memory they hold fails the
next client.

A run can leave its worker holding most of its address space after it ends: Python and the allocator
do not give back everything a large run took, and a run stopped at its deadline leaves what it built.
An attacker round sent two dense 2000x2000 pages to the OCR chain (each stopped at max_compute_ms): its
worker kept 3.8 GiB of its 4 GiB address space, idle, and every later image of an honest client failed
for lack of memory, for as long as the worker lived. The pool looks at its idle workers as their PONGs
come back (pool.ping_interval_s): one whose free address space (its limit, less its VmSize - what RLIMIT_AS bounds - less
what its verdict cache holds, which is kept on purpose, and less what it holds for direct requests in
flight and replies not yet read - its last PONG says both - which go with them) is under RECYCLE_HEADROOM of what it had free
when it became ready is drained (its requests answered, its direct clients sent elsewhere) and replaced,
not counted as a crash. A worker whose model leaves little room from the start is held to the same
share of that little: a new one would have no more.
"""
from __future__ import annotations

import os

from openinfer.daemon.config.settings import Settings
from openinfer.daemon.modelstore.models import ServedModel

RECYCLE_HEADROOM = 0.25
# At most one worker of a model is recycled in this time: a client that keeps making its workers overgrow
# (round 9: large requests growing onnxruntime's arena, frames announced and trickled) forces a model load
# at most this often, not at every ping (five in 30 s). A worker left overgrown waits its turn.
RECYCLE_SPACING_NS = 60_000_000_000
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def address_space(pid: int) -> int | None:
    """VmSize of a process, in bytes (None when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[0]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def memory_limit_bytes(settings: Settings, model: ServedModel) -> int | None:
    """The address-space limit (RLIMIT_AS) the model's workers are spawned with: its own memory_limit_mb,
    else sandbox.memory_limit_mb; None for none (and the sandbox applies it only when enabled)."""
    limit_mb = model.config.memory_limit_mb or settings.sandbox.memory_limit_mb
    return limit_mb * 1024 * 1024 if limit_mb else None


def enforced_memory_limit(settings: Settings, model: ServedModel) -> int | None:
    """The limit the model's workers really run under: memory_limit_bytes when the sandbox is on, else none
    (what recycling and the check of a PONG's report measure against)."""
    return memory_limit_bytes(settings, model) if settings.sandbox.enabled else None


def overgrown(pid: int, ready_bytes: int | None, limit: int | None, cache_bytes: int = 0, request_bytes: int = 0) -> str | None:
    """Why an idle worker should be replaced, or None. `request_bytes`: what it holds for direct requests
    in flight and unread replies (its last PONG), which goes with them."""
    if not limit or ready_bytes is None or ready_bytes >= limit:
        return None
    now = address_space(pid)
    if now is None:
        return None
    free_now, free_at_ready = limit - (now - cache_bytes - request_bytes), limit - ready_bytes
    if free_now >= RECYCLE_HEADROOM * free_at_ready:
        return None
    return (f"recycled: idle with {now >> 20} MiB of its {limit >> 20} MiB address space in use ({cache_bytes >> 20} MiB of it its cache, "
            f"{request_bytes >> 20} MiB held for requests in flight), {max(0, free_now) >> 20} MiB free of the {free_at_ready >> 20} MiB it had when ready (under {RECYCLE_HEADROOM:.0%})")
