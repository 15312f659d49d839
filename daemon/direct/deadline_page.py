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

PAGE_BYTES = 4096
_SINCE, _DEADLINE = 0, 1  # signed 64-bit words: running since (ns), must be done by (ns); deadline 0 = idle, since = when the last run ended
# Whose requests the run in progress is (the third word, written before the deadline): the uid + 1 when they
# are all one uid's, SEVERAL when not, 0 when idle. A worker that dies in a run is held to that client
# alone (workerpool/crash_blame.py), not to every client with a request waiting behind it (attacker round
# 80: a request of its own that ran long let another uid's requests queue up, and its next crash was no
# one's). The worker's word: a hostile model can only have a client refused by itself.
_OWNER = 2
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

    def running(self, since_ns: int, deadline_ns: int, owner: int = SEVERAL) -> None:
        self.words[_OWNER] = owner
        self.words[_SINCE] = since_ns
        self.words[_DEADLINE] = deadline_ns

    def idle(self) -> None:
        """No run now; the first word keeps when the last one ended (a retired worker is not killed in
        the moment between a run and its reply's write: supervisor._gone_or_killed)."""
        self.words[_DEADLINE] = 0
        self.words[_OWNER] = 0
        self.words[_SINCE] = time.monotonic_ns()

    def read(self) -> tuple[int, int]:
        deadline = self.words[_DEADLINE]
        return int(self.words[_SINCE]), int(deadline)

    def run_owners(self) -> frozenset[str] | None:
        """Whose the run in progress is: `{"uid=N"}`, or an empty set when several uids' (not named here);
        None when idle."""
        if not self.words[_DEADLINE]:
            return None
        owner = int(self.words[_OWNER])
        return frozenset({f"uid={owner - 1}"}) if 0 < owner <= 2**32 else frozenset()

    def close(self) -> None:
        self.words.release()
        self.map.close()
        try:
            os.close(self.fd)
        except OSError:
            pass
