"""Telling systemd how the daemon is doing (`sd_notify(3)`): READY, STATUS, RELOADING, STOPPING, WATCHDOG.

Only the supervisor's main process talks to systemd (the unit says `NotifyAccess=main`); workers are
spawned with an empty environment and never see `$NOTIFY_SOCKET`.

Unlike the `sdnotify` package, a broken `$NOTIFY_SOCKET` is never silent: `SystemdNotifier.from_environ`
raises `NotifyError`, and a message that cannot be delivered later is logged (once per run of failures).
When `$NOTIFY_SOCKET` is unset (not started by systemd, or `Type=simple`) every method is a no-op by design.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("openinfer.supervisor")


class NotifyError(RuntimeError):
    """`$NOTIFY_SOCKET` is set but cannot be used; the message names the address and the reason."""


def parse_notify_address(value: str) -> str | bytes:
    """`/path` or `@abstract` (Linux abstract namespace, sent with a leading NUL) as a socket address."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    raise NotifyError(f"NOTIFY_SOCKET={value!r} is not supported: expected an absolute path or @abstract-name")


def watchdog_interval_us(environ: Mapping[str, str], pid: int) -> int | None:
    """`$WATCHDOG_USEC` if the watchdog is meant for `pid` (`$WATCHDOG_PID` unset or equal), else None."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        raise NotifyError(f"WATCHDOG_USEC={raw!r} is not a number of microseconds") from None
    if usec <= 0:
        raise NotifyError(f"WATCHDOG_USEC={raw!r} must be positive")
    return usec


class SystemdNotifier:
    """One connection to systemd's notification socket, created from the environment.

    `address=None` makes a disabled notifier whose methods do nothing and return False. Methods return
    True when the message was delivered. Not thread-safe; call it from the supervisor loop only.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._target: str | bytes | None = None
        self._socket: socket.socket | None = None
        self._watchdog_ns = watchdog_usec * 1000 if address and watchdog_usec else None
        self._last_ping_ns: int | None = None
        self._failing = False
        if address is None:
            return
        self._target = parse_notify_address(address)
        # A datagram connect() sends nothing; it proves the socket exists and accepts datagrams from us.
        # Messages then go out with sendto() on an unconnected socket: systemd re-creates its socket at the
        # same address on daemon-reexec, and a connected socket would keep pointing at the old one.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
            try:
                probe.connect(self._target)
            except OSError as exc:
                raise NotifyError(f"NOTIFY_SOCKET={address!r} is unusable: {exc.strerror or exc}") from None
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> SystemdNotifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID` (default: os.environ, this process)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = watchdog_interval_us(env, os.getpid() if pid is None else pid) if address else None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_interval_ns(self) -> int | None:
        """systemd's WatchdogSec= in ns, or None when no watchdog is configured for this process."""
        return self._watchdog_ns

    def ready(self, status: str) -> bool:
        """Startup or reload finished: every model has a ready worker."""
        return self._send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Free text for `systemctl status` (one line)."""
        return self._send(f"STATUS={_one_line(text)}")

    def reloading(self, status: str = "reloading") -> bool:
        """A reload began; follow with `ready()`. MONOTONIC_USEC lets systemd >= 253 match the pair."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={_one_line(status)}")

    def stopping(self, status: str = "stopping") -> bool:
        """Shutdown began (SIGTERM): draining, then exiting."""
        return self._send("STOPPING=1", f"STATUS={_one_line(status)}")

    def watchdog_due(self, now_ns: int) -> bool:
        """A ping is due: the watchdog is on and half its interval passed since the last ping."""
        if self._watchdog_ns is None:
            return False
        return self._last_ping_ns is None or now_ns - self._last_ping_ns >= self._watchdog_ns // 2

    def watchdog(self, now_ns: int | None = None) -> bool:
        """Send WATCHDOG=1 if due (cheap to call every loop turn); True when a ping went out."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        if not self.watchdog_due(now):
            return False
        sent = self._send("WATCHDOG=1")
        if sent:
            self._last_ping_ns = now
        return sent

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, *fields: str) -> bool:
        if self._socket is None or self._target is None:
            return False
        message = "\n".join(fields).encode()
        try:
            self._socket.sendto(message, self._target)
        except OSError as exc:
            if not self._failing:
                log.error(
                    "cannot notify systemd",
                    extra={"notify_socket": self._address, "notification": fields[0], "reason": exc.strerror or str(exc)},
                )
            self._failing = True
            return False
        if self._failing:
            log.info("notifying systemd works again", extra={"notify_socket": self._address})
            self._failing = False
        return True


def _one_line(text: str) -> str:
    return " ".join(text.split())
