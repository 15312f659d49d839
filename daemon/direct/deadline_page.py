"""One page of memory a worker and the supervisor share: when the worker's running work must be done.

A worker serving clients directly runs requests the supervisor never sees, so the supervisor cannot
know from its own books that one is stuck inside session.run(). Before each run the worker writes the
run's deadline here (the earliest of its requests' deadlines and `max_compute_ms`), and zero after it.
The worker stops an overdue run itself (worker/run_watch.py); the supervisor reads the page on its
housekeeping pass, leaves the worker out of new leases while a run is past its deadline, and kills a
worker still running half a second past the model's max_compute_ms from the run's start (a kernel that
never checks the stop flag), as it does for tasks it dispatched itself. The page is a sealed-size memfd the supervisor creates and passes at
spawn; a compromised worker can only write its own page (lying there harms only its own clients).
"""
from __future__ import annotations

import mmap
import os
import time
from collections.abc import Sequence

PAGE_BYTES = 4096
_SINCE, _DEADLINE = 0, 1  # signed 64-bit words: running since (ns), must be done by (ns); deadline 0 = idle, since = when the last run ended
# Whose requests the run in progress is (written before the deadline): the third word is how many uids
# (0 when idle, SEVERAL when too many to name), the words after it each uid + 1. A worker that dies in a
# run of one uid's requests is held to that client alone (workerpool/crash_blame.py), not to every client
# with a request waiting behind it (attacker round 80: a request of its own that ran long let another
# uid's requests queue up, and its next crash was no one's); one that dies in a run of several has only
# those uids batched apart (round 82: a poison batched with others had every uid's requests batched one
# uid at a time, a third of the model's throughput for everyone). The worker's word: a hostile model can
# only have a client refused by itself, or batched apart.
_COUNT = 2
_UIDS = 3
MAX_NAMED = PAGE_BYTES // 8 - _UIDS
SEVERAL = -1


class DeadlinePage:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map = mmap.mmap(fd, PAGE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Each word is written and read in one 8-byte access (struct.pack_into writes byte by byte: the
        # supervisor could read a torn deadline and kill a worker whose run was on time).
        self.words = memoryview(self.map).cast("q")

    @classmethod
    def create(cls, name: str) -> "DeadlinePage":
        """The page, and after it the worker's ledger (ledger.py), in one memfd."""
        from .ledger import LEDGER_BYTES

        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGE_BYTES + LEDGER_BYTES)
        return cls(fd)

    def running(self, since_ns: int, deadline_ns: int, uids: Sequence[int] | None = None) -> None:
        """A run from `since_ns`, due by `deadline_ns`, of these distinct uids' requests (None: not named)."""
        words = self.words
        if uids is None or len(uids) > MAX_NAMED:
            words[_COUNT] = SEVERAL
        else:
            for at, uid in enumerate(uids, _UIDS):
                words[at] = uid + 1
            words[_COUNT] = len(uids)
        words[_SINCE] = since_ns
        words[_DEADLINE] = deadline_ns

    def idle(self) -> None:
        """No run now; the first word keeps when the last one ended (a retired worker is not killed in
        the moment between a run and its reply's write: supervisor._gone_or_killed)."""
        self.words[_DEADLINE] = 0
        self.words[_COUNT] = 0
        self.words[_SINCE] = time.monotonic_ns()

    def read(self) -> tuple[int, int]:
        deadline = self.words[_DEADLINE]
        return int(self.words[_SINCE]), int(deadline)

    def run_owners(self) -> frozenset[str] | None:
        """Whose the run in progress is: `{"uid=N", ...}`, or an empty set when not named (too many, or a
        word out of range: the worker's word is read, not trusted); None when idle."""
        words = self.words
        if not words[_DEADLINE]:
            return None
        count = int(words[_COUNT])
        if not 0 < count <= MAX_NAMED:
            return frozenset()
        uids = [int(words[at]) - 1 for at in range(_UIDS, _UIDS + count)]
        return frozenset(f"uid={uid}" for uid in uids) if all(0 <= uid < 2**32 for uid in uids) else frozenset()

    def close(self) -> None:
        self.words.release()
        self.map.close()
        try:
            os.close(self.fd)
        except OSError:
            pass
