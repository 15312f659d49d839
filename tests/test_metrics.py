"""Prometheus exposition: parsed with prometheus_client's own parser, it agrees with the stats; the HTTP
endpoint and the textfile serve the last published snapshot only; end to end against a live daemon."""
from __future__ import annotations

import os
import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from openinfer.client import InvalidArgument, NotFound
from openinfer.daemon.accounting import DURATION_BUCKETS_US, Accountant
from openinfer.daemon.metrics import MetricsExporter, parse_listen
from openinfer.daemon.modelconfig import ConfigError
from openinfer.daemon.settings import MetricsSettings
from openinfer.daemon.workers import WorkerState

STAGE_KEYS = ("decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us")


def parse(text: bytes | str) -> dict[str, list[Any]]:
    """family name -> samples, through the official parser (it rejects malformed exposition)."""
    families = text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text)
    return {family.name: list(family.samples) for family in families}


def value(samples: dict[str, list[Any]], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in samples[family] if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, sample, labels, found)
    return float(found[0])


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


def workers_rows() -> list[dict[str, Any]]:
    return [{"model": "tiny", "version": 1, "state": "ready"}, {"model": "tiny", "version": 1, "state": "busy"}, {"model": "magika", "version": 2, "state": "spawned"}]


def assert_agrees(samples: dict[str, list[Any]], stats: dict[str, Any]) -> None:
    """Every counter and histogram in the exposition equals the matching stats figure."""
    bounds = [b / 1e6 for b in stats["duration_buckets_us"]]
    for name, entry in stats["models"].items():
        for version, snap in entry["versions"].items():
            labels = {"model": name, "version": version}
            if snap.get("success"):
                assert value(samples, "openinfer_requests", "openinfer_requests_total", code="OK", **labels) == snap["success"]
            for code, count in snap["failures"].items():
                assert value(samples, "openinfer_requests", "openinfer_requests_total", code=code, **labels) == count
            assert value(samples, "openinfer_request_bytes", "openinfer_request_bytes_total", direction="in", **labels) == snap.get("bytes_in", 0)
            assert value(samples, "openinfer_request_bytes", "openinfer_request_bytes_total", direction="out", **labels) == snap.get("bytes_out", 0)
            assert value(samples, "openinfer_worker_cpu_seconds", "openinfer_worker_cpu_seconds_total", **labels) == pytest.approx(snap.get("cpu_seconds", 0.0))
            assert value(samples, "openinfer_worker_restarts", "openinfer_worker_restarts_total", **labels) == snap.get("worker_restarts", 0)
            for code, by_stage in snap.get("durations", {}).items():
                for stage, row in by_stage.items():
                    where = {**labels, "stage": stage, "code": code}
                    assert value(samples, "openinfer_request_duration_seconds", "openinfer_request_duration_seconds_count", **where) == row["count"]
                    assert value(samples, "openinfer_request_duration_seconds", "openinfer_request_duration_seconds_sum", **where) == pytest.approx(row["ns"] / 1e9)
                    got = [value(samples, "openinfer_request_duration_seconds", "openinfer_request_duration_seconds_bucket", le=le, **where) for le in _les(samples, where)]
                    assert got == [*row["le"], row["count"]]
            # The histogram's `total` stage over every code counts each request once.
            totals = [s.value for s in samples["openinfer_request_duration_seconds"] if s.name.endswith("_count") and s.labels["stage"] == "total" and s.labels["model"] == name and s.labels["version"] == version]
            assert sum(totals) == snap["requests"]
    les = sorted({float(s.labels["le"]) for s in samples["openinfer_request_duration_seconds"] if "le" in s.labels})
    assert les == [*bounds, float("inf")]
    for code, count in stats.get("rejected", {}).items():
        assert value(samples, "openinfer_requests", "openinfer_requests_total", model="", version="", code=code) == count
    for client, snap in stats["clients"].items():
        if snap["success"]:
            assert value(samples, "openinfer_client_requests", "openinfer_client_requests_total", client=client, code="OK") == snap["success"]
        for code, count in snap["failures"].items():
            assert value(samples, "openinfer_client_requests", "openinfer_client_requests_total", client=client, code=code) == count


def _les(samples: dict[str, list[Any]], where: dict[str, str]) -> list[str]:
    found = [s.labels["le"] for s in samples["openinfer_request_duration_seconds"] if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in where.items())]
    return sorted(found, key=float)


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


def test_http_endpoint_serves_the_text_format_and_stops_on_close() -> None:
    exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0"))
    try:
        assert exporter.port
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        acc = busy_accountant()
        stats = acc.snapshot()
        exporter.publish(stats, workers_rows(), {})
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = response.read()
        assert_agrees(parse(body), stats)
    finally:
        exporter.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    exporter.close()  # idempotent


def wait_for_textfile(path: Path, requests: int, timeout: float = 10.0) -> dict[str, list[Any]]:
    """The textfile is written by the exporter's own thread: wait until it shows `requests` in all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            samples = parse(path.read_bytes())
            if sum(s.value for s in samples.get("openinfer_requests", [])) == requests:
                return samples
        time.sleep(0.02)
    raise AssertionError(f"{path} never showed {requests} requests")


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


def test_textfile_waits_for_its_interval_and_survives_write_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.prom"
    exporter = MetricsExporter(MetricsSettings(textfile=str(path), textfile_interval_s=3600.0))
    acc = busy_accountant()
    exporter.publish(acc.snapshot(), [], {})
    wait_for_textfile(path, 304)
    acc.record("tiny", 1, "x", None, {"total_us": 5.0})
    exporter.publish(acc.snapshot(), [], {})
    time.sleep(0.3)
    assert sum(s.value for s in parse(path.read_bytes())["openinfer_requests"]) == 304  # not yet: the interval has not passed
    exporter.close()
    assert sum(s.value for s in parse(path.read_bytes())["openinfer_requests"]) == 305  # the last word, at close
    target = tmp_path / "gone" / "n.prom"
    target.parent.mkdir()
    failing = MetricsExporter(MetricsSettings(textfile=str(target), textfile_interval_s=0.0))
    target.parent.rmdir()  # the directory vanished under a running daemon
    failing.publish(acc.snapshot(), [], {})  # logged by the writer thread, never raised into the loop
    time.sleep(0.3)
    failing.close()
    assert not target.parent.exists()
    with pytest.raises(ConfigError, match="does not exist"):
        MetricsExporter(MetricsSettings(textfile=str(tmp_path / "missing" / "m.prom")))


def test_due_at_most_once_per_second_and_only_when_configured(tmp_path: Path) -> None:
    assert not MetricsExporter(MetricsSettings()).due(time.monotonic_ns())
    exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0"))
    try:
        now = time.monotonic_ns()
        assert exporter.due(now)
        assert not exporter.due(now + 999_000_000)
        assert exporter.due(now + 1_000_000_000)
    finally:
        exporter.close()
    textfile_only = MetricsExporter(MetricsSettings(textfile=str(tmp_path / "t.prom"), textfile_interval_s=15.0))
    now = time.monotonic_ns()
    assert textfile_only.due(now) and not textfile_only.due(now + 14_000_000_000) and textfile_only.due(now + 15_000_000_000)


def test_listen_address_is_checked() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "127.0.0.1", "127.0.0.1:port", ":9464", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="metrics.listen"):
            parse_listen(bad)


# -- end to end: a live daemon (needs MetricsExporter wired into the supervisor) -----------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_live_daemon_metrics_endpoint_agrees_with_stats(daemon_factory: Any, model_repo: Path) -> None:
    port = free_port()
    daemon = daemon_factory(model_repo, env={"OPENINFER_METRICS_LISTEN": f"127.0.0.1:{port}"})
    url = f"http://127.0.0.1:{port}/metrics"
    alice = daemon.client(client_name="alice")
    bob = daemon.client(client_name="bob")
    x = {"x": np.ones((1, 64), np.float32)}
    for _ in range(12):
        alice.infer("tiny", x)
    for _ in range(5):
        bob.infer("tiny", x)
    for _ in range(3):
        with pytest.raises(InvalidArgument):
            bob.infer("tiny", {"nope": x["x"]})
    with pytest.raises(NotFound):
        bob.infer("no_such_model", x)

    # The loop publishes about once a second: wait for a scrape that has seen every request above.
    deadline = time.monotonic() + 15
    text, last_error = "", None
    while time.monotonic() < deadline:
        try:
            text = scrape(url)
        except (urllib.error.URLError, OSError) as exc:
            last_error = exc
        else:
            samples = parse(text)
            if "openinfer_requests" in samples and sum(s.value for s in samples["openinfer_requests"]) >= 21:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"no complete Prometheus exposition at {url} within 15 s (is MetricsExporter wired into the supervisor?): {last_error or text[-500:]}")
    stats = alice.stats()
    samples = parse(scrape(url))
    assert_agrees(samples, stats)
    assert value(samples, "openinfer_requests", "openinfer_requests_total", model="tiny", version="1", code="OK") == 17
    assert value(samples, "openinfer_requests", "openinfer_requests_total", model="tiny", version="1", code="INVALID_ARGUMENT") == 3
    assert value(samples, "openinfer_requests", "openinfer_requests_total", model="", version="", code="NOT_FOUND") == 1
    clients = {s.labels["client"].split("@")[0]: s.value for s in samples["openinfer_client_requests"] if s.labels["code"] == "OK"}
    assert clients["alice"] == 12 and clients["bob"] == 5
    assert value(samples, "openinfer_up", "openinfer_up") == 1
    status = alice.status()
    for model in ("tiny", "magika"):
        running = sum(1 for w in status["workers"] if w["model"] == model)
        exposed = sum(s.value for s in samples["openinfer_workers"] if s.labels["model"] == model and s.labels["version"] == "1")
        assert exposed == running > 0, model
    assert value(samples, "openinfer_queue_depth", "openinfer_queue_depth", model="tiny", version="1") == 0
