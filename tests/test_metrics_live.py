"""Prometheus metrics of a live daemon: every scrape counts exactly the requests answered before it
began, and agrees with `stats` (test_metrics.py: the exporter on its own)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exposition import assert_agrees, free_port, parse, scrape, value
from openinfer.client import InvalidArgument, NotFound

pytestmark = pytest.mark.live


def test_live_scrape_right_after_a_request_counts_it(daemon_factory: Any, tiny_repo: Path) -> None:
    """The daemon's loop answers each scrape with a snapshot built after it began: no second-old counts."""
    port = free_port()
    daemon = daemon_factory(tiny_repo, env={"OPENINFER_METRICS_LISTEN": f"127.0.0.1:{port}"})
    url = f"http://127.0.0.1:{port}/metrics"
    client = daemon.client()
    for answered in range(1, 11):
        client.infer("tiny", {"x": np.ones((1, 64), np.float32)})
        samples = parse(scrape(url))
        assert value(samples, "openinfer_requests", "openinfer_requests_total", model="tiny", version="1", code="OK") == answered
        assert value(samples, "openinfer_up", "openinfer_up") == 1


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

    samples = parse(scrape(url))  # exact: the scrape waits for a snapshot taken after it began
    assert_agrees(samples, alice.stats())
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
