"""SystemdNotifier against a real notification socket: the test plays systemd."""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from openinfer.daemon.observability.jsonlog import JsonFormatter
from openinfer.daemon.control.sdnotify import NotifyError, SystemdNotifier

pytestmark = pytest.mark.unit


class FakeSystemd:
    """A datagram socket bound where systemd would put $NOTIFY_SOCKET; parses what arrives."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def receive(self) -> dict[str, str]:
        raw = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in raw.split("\n"))

    def pending(self) -> int:
        count = 0
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
                count += 1
        except BlockingIOError:
            return count
        finally:
            self.sock.settimeout(2.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="oi-notify-") as path:  # short: sun_path holds 107 bytes
        yield Path(path)


@pytest.fixture
def systemd(notify_dir: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(notify_dir / "notify")
    fake = FakeSystemd(path)
    yield fake, path
    fake.close()


def test_unset_notify_socket_is_a_documented_no_op() -> None:
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_ns is None
    assert notifier.ready("serving") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


def test_ready_carries_status(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    with SystemdNotifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("serving 3 models\nwith 6 workers") is True
    assert fake.receive() == {"READY": "1", "STATUS": "serving 3 models with 6 workers"}


def test_status_stopping_and_reloading(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    with SystemdNotifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.status("2/3 models ready")
        assert fake.receive() == {"STATUS": "2/3 models ready"}
        before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        message = fake.receive()
        assert message["RELOADING"] == "1"
        assert before_us <= int(message["MONOTONIC_USEC"]) <= after_us
        assert notifier.ready("reloaded")
        assert fake.receive() == {"READY": "1", "STATUS": "reloaded"}
        assert notifier.stopping("draining 4 tasks")
        assert fake.receive() == {"STOPPING": "1", "STATUS": "draining 4 tasks"}


def test_watchdog_pings_at_half_the_interval(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    with SystemdNotifier.from_environ(environ) as notifier:
        assert notifier.watchdog_interval_ns == 10_000_000_000
        start = 1_000_000_000_000
        assert notifier.watchdog_due(start)
        assert notifier.watchdog(start) is True
        assert fake.receive() == {"WATCHDOG": "1"}
        # Called every loop turn: nothing more until half the interval (5 s) has passed.
        for offset_ms in range(0, 5000, 10):
            assert notifier.watchdog(start + offset_ms * 1_000_000) is False
        assert fake.pending() == 0
        assert notifier.watchdog_due(start + 5_000_000_000)
        assert notifier.watchdog(start + 5_000_000_000) is True
        assert fake.receive() == {"WATCHDOG": "1"}
        assert not notifier.watchdog_due(start + 9_999_999_999)


def test_watchdog_meant_for_another_process_is_off(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with SystemdNotifier.from_environ(environ) as notifier:
        assert notifier.enabled
        assert notifier.watchdog_interval_ns is None
        assert notifier.watchdog() is False
    assert fake.pending() == 0


def test_abstract_socket() -> None:
    name = f"openinfer-test-{os.getpid()}-{time.monotonic_ns()}"
    fake = FakeSystemd(b"\0" + name.encode())
    try:
        with SystemdNotifier.from_environ({"NOTIFY_SOCKET": f"@{name}"}) as notifier:
            assert notifier.ready("up")
        assert fake.receive() == {"READY": "1", "STATUS": "up"}
    finally:
        fake.close()


@pytest.mark.parametrize("value", ["relative/notify", "vsock:2:1234", "@"])
def test_unsupported_address_is_a_clear_error(value: str) -> None:
    with pytest.raises(NotifyError, match="NOTIFY_SOCKET=.*not supported"):
        SystemdNotifier.from_environ({"NOTIFY_SOCKET": value})


def test_missing_socket_is_a_clear_error(notify_dir: Path) -> None:
    missing = str(notify_dir / "nobody-listens")
    with pytest.raises(NotifyError, match=f"NOTIFY_SOCKET='{missing}' is unusable: No such file or directory"):
        SystemdNotifier.from_environ({"NOTIFY_SOCKET": missing})


def test_path_that_is_not_a_socket_is_a_clear_error(notify_dir: Path) -> None:
    plain = notify_dir / "plain-file"
    plain.write_text("")
    with pytest.raises(NotifyError, match="is unusable: Connection refused"):
        SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(plain)})


def test_bad_watchdog_usec_is_a_clear_error(systemd: tuple[FakeSystemd, str]) -> None:
    _, path = systemd
    with pytest.raises(NotifyError, match="WATCHDOG_USEC='soon'"):
        SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "soon"})


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_socket_vanishing_later_is_logged_not_silent(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    handler = Records()
    logger = logging.getLogger("openinfer.supervisor")
    logger.addHandler(handler)
    try:
        with SystemdNotifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
            fake.close()
            os.unlink(path)
            assert notifier.status("one") is False
            assert notifier.status("two") is False  # a run of failures is logged once
            errors = [r for r in handler.records if r.levelno == logging.ERROR]
            assert len(errors) == 1
            assert errors[0].getMessage() == "cannot notify systemd"
            entry = json.loads(JsonFormatter().format(errors[0]))  # as journald receives it
            assert entry["logger"] == "openinfer.supervisor" and entry["notify_socket"] == path
            assert entry["notification"] == "STATUS=one" and entry["reason"]
            revived = FakeSystemd(path)
            try:
                assert notifier.status("three") is True
                assert revived.receive() == {"STATUS": "three"}
            finally:
                revived.close()
    finally:
        logger.removeHandler(handler)
