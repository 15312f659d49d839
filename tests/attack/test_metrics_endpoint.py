"""The metrics endpoint and textfile, attacked by another local user (attacker round 17).

`metrics.listen` has no authentication: any local uid reaches a loopback port. prometheus_client's
server gave each connection a thread and a descriptor, with no cap and no timeout: 1,053 idle
connections took the supervisor's descriptors until a /proc read in its loop failed (EMFILE) and the
daemon exited; under the unit's TasksMax they took every thread and the model crash-looped. A flood of
scrapes made the loop build a snapshot for each and slowed the front door ~17x. And the textfile was
written through a fixed temporary name: another uid planted a symlink there, and the daemon (root)
overwrote the file it pointed to.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

import onnx_builders
from daemon_harness import wait_for
from exposition import LoopStandIn, free_port, parse, scrape, value
from openinfer.client import Client
from openinfer.daemon.config.settings import MetricsSettings
from openinfer.daemon.observability.accounting import Accountant
from openinfer.daemon.observability.metrics import MetricsExporter
from openinfer.daemon.observability import metrics_http
from openinfer.daemon.observability.metrics_http import MAX_CONNECTIONS, SCRAPES_BURST, SCRAPES_PER_S
from repo_builder import ModelRepo

pytestmark = pytest.mark.attack

IDLE_CONNECTIONS = 300  # more than the daemon's descriptors below
NOFILE = 256


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    models = ModelRepo("oi-metrics-attack-")
    models.model("tiny", onnx_builders.matmul_model, config="workers = 1\n")
    yield models.ready()
    models.remove()


def _status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:  # closed unanswered (no slot free)
        return 0


def test_idle_connections_to_the_metrics_port_neither_kill_the_daemon_nor_take_its_threads(daemon_factory: Any, repo: Path) -> None:
    """Before: the supervisor (256 descriptors) took every connection - a thread and a descriptor each -
    until its memory check failed with EMFILE and it exited; now it serves MAX_CONNECTIONS at once and
    closes the rest as they come, and an idle one is dropped after its timeout."""
    port = free_port()
    daemon = daemon_factory(repo, env={"OPENINFER_METRICS_LISTEN": f"127.0.0.1:{port}"}, launcher=("prlimit", f"--nofile={NOFILE}:{NOFILE}"))
    supervisor = psutil.Process(daemon.process.pid)
    threads_before = supervisor.num_threads()
    x = np.ones((1, 64), np.float32)
    held: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more: the request never ends
            except OSError:
                pass  # closed by the daemon already: one over its share
        held_since = time.monotonic()
        # The memory check reads /proc every 100 ms: many of them run while every connection is held.
        with Client(daemon.address, timeout=10) as client:
            for _ in range(20):
                assert client.infer("tiny", {"x": x}).outputs["y"].shape == (1, 64)
            wait_for(lambda: len(client.health()) > 0 and time.monotonic() > held_since + 1.0, 10, "a second with every connection held")
        assert daemon.process.poll() is None, daemon.log_text()[-3000:]
        assert supervisor.num_threads() <= threads_before + MAX_CONNECTIONS, supervisor.num_threads()
    finally:
        for sock in held:
            sock.close()
    # The attacker gone, a scrape is answered.
    wait_for(lambda: _status_of(f"http://127.0.0.1:{port}/metrics") == 200, 30, "a scrape to be answered once the attacker left", daemon=daemon)


def test_a_flood_of_scrapes_is_rendered_at_a_bounded_rate() -> None:
    """Before: every scrape made the loop build a snapshot and a thread render it (455 in 10 s took the
    front door from 1.7 ms to 29 ms p50). Now a burst is rendered, then SCRAPES_PER_S; the scrapes over
    the rate get the last text again, so an honest scraper in a flood still gets figures (a 429 for
    them let a flooder starve it: attacker round 18)."""
    exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0"))
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    try:
        with LoopStandIn(exporter, Accountant().snapshot) as loop:
            started = time.monotonic()
            bodies = [scrape(url) for _ in range(3 * SCRAPES_BURST)]
            elapsed = time.monotonic() - started
        assert all("openinfer_up" in body for body in bodies)
        assert SCRAPES_BURST <= loop.published <= SCRAPES_BURST + SCRAPES_PER_S * elapsed + 1, (loop.published, elapsed)
    finally:
        exporter.close()


def test_a_connection_that_trickles_its_request_is_cut_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a byte every 4 s met the 5 s per-read timeout, so 8 such connections held every slot for as
    long as they liked and no scrape was answered (attacker round 18). Now a connection has
    CONNECTION_DEADLINE_S for all of it."""
    monkeypatch.setattr(metrics_http, "CONNECTION_DEADLINE_S", 1.0, raising=False)  # (raising=False: the test also runs against code before the rule)
    exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0"))
    trickling = [socket.create_connection(("127.0.0.1", exporter.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        with LoopStandIn(exporter, Accountant().snapshot):
            cut: set[int] = set()

            def trickle() -> bool:  # a byte each, as the attacker did; True once every one was cut
                for index, sock in enumerate(trickling):
                    try:
                        sock.sendall(b"G")
                        sock.setblocking(False)
                        if sock.recv(1) == b"":
                            cut.add(index)
                    except BlockingIOError:
                        pass
                    except OSError:
                        cut.add(index)
                return len(cut) == len(trickling)

            wait_for(trickle, 10, "the trickling connections to be cut")
            assert "openinfer_up" in scrape(f"http://127.0.0.1:{exporter.port}/metrics")
    finally:
        for sock in trickling:
            sock.close()
        exporter.close()


def test_the_textfile_is_never_written_through_a_planted_symlink(tmp_path: Path) -> None:
    """Before: the temp file was `.NAME.<pid>.<writer thread id>.tmp`, the same every interval, opened
    with O_TRUNC: a symlink planted under that name (the directory shared with other writers) made the
    daemon overwrite the root-only file it pointed to. Now the temp name is random and created with
    O_EXCL; and a symlink at the final name is replaced, never followed."""
    shared = tmp_path / "textfile_collector"
    shared.mkdir()
    shared.chmod(0o1777 & ~0o1000)  # writable by every uid, not sticky: as the attacker found it
    victim = tmp_path / "root-only"
    victim.write_bytes(b"secret\n")
    victim.chmod(0o600)
    path = shared / "openinfer.prom"
    exporter = MetricsExporter(MetricsSettings(textfile=str(path), textfile_interval_s=0.0))
    try:
        writer = exporter._writer
        assert writer is not None and writer.ident is not None
        # The name the old writer used, known to anyone who saw one write: the attacker's symlink.
        os.symlink(victim, shared / f".{path.name}.{os.getpid()}.{writer.ident}.tmp")
        acc = Accountant()
        acc.record("tiny", 1, "c@uid=0", None, {"compute_us": 3.0, "total_us": 9.0})
        exporter.publish(acc.snapshot(), [], {})
        wait_for(lambda: path.exists() and not path.is_symlink() and b"openinfer_up" in path.read_bytes(), 10, "the textfile")
        assert victim.read_bytes() == b"secret\n"
        assert value(parse(path.read_bytes()), "openinfer_requests", "openinfer_requests_total", model="tiny", version="1", code="OK") == 1
        assert oct(path.stat().st_mode & 0o777) == "0o644"  # node_exporter (another user) reads it
        # A symlink planted at the final name is replaced by the next write, not followed.
        path.unlink()
        path.symlink_to(victim)
        exporter.publish(acc.snapshot(), [], {})
        wait_for(lambda: not path.is_symlink(), 10, "the next write to replace the symlink")
        assert victim.read_bytes() == b"secret\n"
    finally:
        exporter.close()


def test_connections_that_end_in_a_reset_are_counted_not_each_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Round 68: every metrics connection that ended in an error (a reset: SO_LINGER 0 after part of a
    request) wrote a log line - 120 KB a second from a local user. Counted with the refusals now, and
    logged as they are, once an interval."""
    exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0"))
    try:
        with LoopStandIn(exporter, Accountant().snapshot), caplog.at_level(logging.INFO, logger="openinfer"):
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", exporter.port), timeout=5)
                sock.sendall(b"GET /metr")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            wait_for(lambda: exporter._server.refused.get("ended", 0) >= 150, 30, "the resets counted")  # (some end before a read)
            assert "openinfer_up" in scrape(f"http://127.0.0.1:{exporter.port}/metrics")
        lines = [r for r in caplog.records if r.name.startswith("openinfer") and ("ended" in r.getMessage() or "refused" in r.getMessage())]
        assert len(lines) <= 3, len(lines)  # before: one a connection
    finally:
        exporter.close()
