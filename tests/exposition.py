"""Reading Prometheus text exposition in the tests: parsed with prometheus_client's own parser (which
rejects malformed text), checked against a stats snapshot, fetched over HTTP."""
from __future__ import annotations

import socket
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families


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
