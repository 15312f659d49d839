"""Prometheus exposition of the exporter on its own: it agrees with the stats it was given; an HTTP
scrape gets a snapshot the loop built after it began (exact), the textfile the last published one
(test_metrics_live.py: the same through a live daemon)."""
from __future__ import annotations

import logging
import random
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from daemon_harness import wait_for
from exposition import LoopStandIn, assert_agrees, parse, scrape, value, workers_rows
from openinfer.daemon.observability import metrics
from openinfer.daemon.observability.accounting import DURATION_BUCKETS_US, Accountant
from openinfer.daemon.observability.metrics import MetricsExporter, parse_listen
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.settings import MetricsSettings
from openinfer.daemon.workerpool.workers import WorkerState

pytestmark = pytest.mark.unit

STAGE_KEYS = ("decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us")


def busy_accountant() -> Accountant:
    rng = random.Random(11)
    acc = Accountant()
    for i in range(300):
        timing = {k: rng.uniform(1.0, 2000.0) for k in STAGE_KEYS}
        timing["cpu_us"] = rng.uniform(1.0, 900.0)
        timing["total_us"] = sum(timing[k] for k in STAGE_KEYS) + rng.expovariate(1 / 5e4)
        model = ("tiny", 1) if i % 3 else ("magika", 2)
        acc.record(*model, f"client-{i % 4}@uid=0", None, timing, 256, 512)
    for code in ("INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"):
        acc.record("tiny", 1, "client-0@uid=0", code, {"total_us": rng.uniform(1.0, 9e7)})
    acc.record(None, None, "beef", "NOT_FOUND", {"total_us": 4.0})
    return acc


# -- unit ---------------------------------------------------------------------------------------------
def test_exposition_parses_and_agrees_with_the_snapshot() -> None:
    acc = busy_accountant()
    stats = acc.snapshot({("tiny", 1): 2, ("magika", 2): 0})
    exporter = MetricsExporter(MetricsSettings())
    exporter.publish(stats, workers_rows(), {("tiny", 1): 3, ("magika", 2): 0})
    samples = parse(exporter.render_text())
    assert_agrees(samples, stats)
    assert value(samples, "openinfer_up", "openinfer_up") == 1
    assert value(samples, "openinfer_queue_depth", "openinfer_queue_depth", model="tiny", version="1") == 3
    states = {s.labels["state"]: s.value for s in samples["openinfer_workers"] if s.labels["model"] == "tiny"}
    assert states == {state.value: (1 if state.value in ("ready", "busy") else 0) for state in WorkerState}
    assert value(samples, "openinfer_workers", "openinfer_workers", model="magika", version="2", state="spawned") == 1
    assert len(DURATION_BUCKETS_US) == 19


def test_batch_sizes_and_admission_rejections_are_exposed() -> None:
    stats = busy_accountant().snapshot({("tiny", 1): 2, ("magika", 2): 0})
    stats["models"]["tiny"]["batch_sizes"] = {"1": {"1": 5, "3": 2, "8": 4}}
    stats["admission"] = {"rejected": {"max_queue": 7, "rate_per_s": 2}}
    exporter = MetricsExporter(MetricsSettings())
    exporter.publish(stats, workers_rows(), {("tiny", 1): 0})
    samples = parse(exporter.render_text())
    where = {"model": "tiny", "version": "1"}
    bucket = {le: value(samples, "openinfer_batch_size", "openinfer_batch_size_bucket", le=le, **where) for le in ("1.0", "2.0", "4.0", "8.0", "1024.0", "+Inf")}
    assert bucket == {"1.0": 5, "2.0": 5, "4.0": 7, "8.0": 11, "1024.0": 11, "+Inf": 11}
    assert value(samples, "openinfer_batch_size", "openinfer_batch_size_count", **where) == 11
    assert value(samples, "openinfer_batch_size", "openinfer_batch_size_sum", **where) == 5 + 6 + 32  # tasks
    assert value(samples, "openinfer_rejections", "openinfer_rejections_total", limit="max_queue") == 7
    assert value(samples, "openinfer_rejections", "openinfer_rejections_total", limit="rate_per_s") == 2


def test_nothing_published_yet_exposes_only_up_zero() -> None:
    samples = parse(MetricsExporter(MetricsSettings()).render_text())
    assert list(samples) == ["openinfer_up"] and samples["openinfer_up"][0].value == 0


def test_scrapes_see_the_published_snapshot_never_the_live_counters() -> None:
    acc = busy_accountant()
    exporter = MetricsExporter(MetricsSettings())
    exporter.publish(acc.snapshot(), [], {})
    before = exporter.render_text()
    for _ in range(50):
        acc.record("tiny", 1, "late@uid=0", None, {"compute_us": 3.0, "total_us": 9.0})
    assert exporter.render_text() == before
    exporter.publish(acc.snapshot(), [], {})
    assert value(parse(exporter.render_text()), "openinfer_client_requests", "openinfer_client_requests_total", client="late@uid=0", code="OK") == 50


@pytest.fixture
def http_exporter() -> Iterator[MetricsExporter]:
    exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0"))
    yield exporter
    exporter.close()


def test_http_endpoint_serves_the_text_format_and_stops_on_close(http_exporter: MetricsExporter) -> None:
    assert http_exporter.port
    url = f"http://127.0.0.1:{http_exporter.port}/metrics"
    stats = busy_accountant().snapshot()
    with LoopStandIn(http_exporter, lambda: stats):
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = response.read()
    samples = parse(body)
    assert_agrees(samples, stats)
    assert value(samples, "openinfer_up", "openinfer_up") == 1
    http_exporter.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    http_exporter.close()  # idempotent


def test_every_scrape_reflects_everything_recorded_before_it_began(http_exporter: MetricsExporter) -> None:
    """No snapshot up to a second old: each scrape waits for one the loop built after it asked."""
    acc = Accountant()
    url = f"http://127.0.0.1:{http_exporter.port}/metrics"
    with LoopStandIn(http_exporter, acc.snapshot) as loop:
        for answered in range(1, 8):
            acc.record("tiny", 1, "c@uid=0", None, {"compute_us": 3.0, "total_us": 9.0})  # the loop is idle meanwhile
            samples = parse(scrape(url))
            assert value(samples, "openinfer_requests", "openinfer_requests_total", model="tiny", version="1", code="OK") == answered
            assert value(samples, "openinfer_up", "openinfer_up") == 1
        assert loop.published == 7  # one snapshot per scrape, none in between
    assert not http_exporter.due(time.monotonic_ns())  # nobody waits: no snapshot is built


def test_a_scrape_the_loop_does_not_answer_gets_the_last_snapshot_with_up_0(http_exporter: MetricsExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "SCRAPE_WAIT_S", 0.05)
    stats = busy_accountant().snapshot()
    http_exporter.publish(stats, workers_rows(), {})  # once, then the loop never answers again
    samples = parse(scrape(f"http://127.0.0.1:{http_exporter.port}/metrics"))
    assert value(samples, "openinfer_up", "openinfer_up") == 0
    assert_agrees(samples, stats)
    assert http_exporter.due(time.monotonic_ns())  # the unanswered scrape is still asked for


def textfile_requests(path: Path) -> float | None:
    if not path.exists():
        return None
    return sum(s.value for s in parse(path.read_bytes()).get("openinfer_requests", []))


def wait_for_textfile(path: Path, requests: int) -> dict[str, list[Any]]:
    """The textfile is written by the exporter's own thread: wait until it shows `requests` in all."""
    wait_for(lambda: textfile_requests(path) == requests, 10, f"{path} to show {requests} requests")
    return parse(path.read_bytes())


def test_textfile_is_replaced_atomically_and_says_down_after_close(tmp_path: Path) -> None:
    path = tmp_path / "openinfer.prom"
    exporter = MetricsExporter(MetricsSettings(textfile=str(path), textfile_interval_s=0.0))
    acc = busy_accountant()
    exporter.publish(acc.snapshot(), [], {})
    assert_agrees(wait_for_textfile(path, 304), acc.snapshot())
    first = path.stat().st_ino
    acc.record("tiny", 1, "x", None, {"total_us": 5.0})
    exporter.publish(acc.snapshot(), [], {})
    assert_agrees(wait_for_textfile(path, 305), acc.snapshot())
    assert path.stat().st_ino != first  # a new file renamed over the old one, never rewritten in place
    exporter.close()
    assert value(parse(path.read_bytes()), "openinfer_up", "openinfer_up") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["openinfer.prom"]  # no temp files left
    exporter.close()  # idempotent


def test_textfile_waits_for_its_interval_and_survives_write_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.prom"
    exporter = MetricsExporter(MetricsSettings(textfile=str(path), textfile_interval_s=3600.0))
    acc = busy_accountant()
    exporter.publish(acc.snapshot(), [], {})
    wait_for_textfile(path, 304)
    acc.record("tiny", 1, "x", None, {"total_us": 5.0})
    exporter.publish(acc.snapshot(), [], {})
    assert exporter.textfile_writes_asked == 1  # not yet: the interval has not passed
    exporter.close()
    assert textfile_requests(path) == 305  # the last word, at close
    target = tmp_path / "gone" / "n.prom"
    target.parent.mkdir()
    failing = MetricsExporter(MetricsSettings(textfile=str(target), textfile_interval_s=0.0))
    target.parent.rmdir()  # the directory vanished under a running daemon
    with caplog.at_level(logging.WARNING, logger="openinfer.metrics"):
        failing.publish(acc.snapshot(), [], {})  # logged by the writer thread, never raised into the loop
        wait_for(lambda: any(r.getMessage() == "cannot write the metrics textfile" for r in caplog.records), 10, "the writer's warning")
    failing.close()
    assert not target.parent.exists()
    with pytest.raises(ConfigError, match="does not exist"):
        MetricsExporter(MetricsSettings(textfile=str(tmp_path / "missing" / "m.prom")))


def test_due_when_a_scrape_waits_or_the_textfile_interval_passed(tmp_path: Path, http_exporter: MetricsExporter) -> None:
    assert not MetricsExporter(MetricsSettings()).due(time.monotonic_ns())
    assert http_exporter.wakeup_fd is not None and MetricsExporter(MetricsSettings()).wakeup_fd is None
    assert not http_exporter.due(time.monotonic_ns())  # HTTP only: nothing to do until a scrape asks
    textfile_only = MetricsExporter(MetricsSettings(textfile=str(tmp_path / "t.prom"), textfile_interval_s=15.0))
    now = time.monotonic_ns()
    assert textfile_only.due(now) and not textfile_only.due(now + 14_000_000_000) and textfile_only.due(now + 15_000_000_000)
    textfile_only.close()


def test_listen_address_is_checked() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "127.0.0.1", "127.0.0.1:port", ":9464", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="metrics.listen"):
            parse_listen(bad)
