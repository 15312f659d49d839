"""Signal handling that only records: handlers write the signal number to a wakeup fd the loop polls."""
from __future__ import annotations

import signal
import socket

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SignalInbox:
    """Installs no-op handlers and `set_wakeup_fd`; the supervisor loop drains `fd` and acts."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous = {sig: signal.signal(sig, self._record) for sig in HANDLED}
        self._old_wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    @staticmethod
    def _record(signum: int, frame: object) -> None:
        """Nothing here: the wakeup fd already carries the signal number."""

    @property
    def fd(self) -> int:
        return self._reader.fileno()

    def inject(self, signum: int) -> None:
        """Deliver a signal through the same path as a real one (used by admin ops and tests)."""
        self._writer.send(bytes([signum]))

    def drain(self) -> list[int]:
        try:
            return list(self._reader.recv(4096))
        except BlockingIOError:
            return []

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._reader.close()
        self._writer.close()
