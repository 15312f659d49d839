"""Reading Prometheus text exposition in the tests: parsed with prometheus_client's own parser (which
rejects malformed text), checked against a stats snapshot, fetched over HTTP."""
from __future__ import annotations

import select
import socket
import threading
import time
import urllib.request
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from openinfer.daemon.observability.metrics import MetricsExporter


def parse(text: bytes | str) -> dict[str, list[Any]]:
    """family name -> samples, through the official parser (it rejects malformed exposition)."""
    families = text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text)
    return {family.name: list(family.samples) for family in families}


def value(samples: dict[str, list[Any]], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in samples[family] if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, sample, labels, found)
    return float(found[0])


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def workers_rows() -> list[dict[str, Any]]:
    return [{"model": "tiny", "version": 1, "state": "ready"}, {"model": "tiny", "version": 1, "state": "busy"}, {"model": "magika", "version": 2, "state": "spawned"}]


class LoopStandIn:
    """What the supervisor's loop does for the exporter (metrics.py's docstring), in a thread: poll
    wakeup_fd, on_wakeup(), and publish(snapshot()) whenever due()."""

    def __init__(self, exporter: MetricsExporter, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.exporter = exporter
        self.snapshot = snapshot
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-stand-in", daemon=True)

    def _run(self) -> None:
        assert self.exporter.wakeup_fd is not None
        poller = select.poll()
        poller.register(self.exporter.wakeup_fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(20):
                self.exporter.on_wakeup()
            if self.exporter.due(time.monotonic_ns()):
                self.exporter.publish(self.snapshot(), workers_rows(), {})
                self.published += 1

    def __enter__(self) -> "LoopStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
