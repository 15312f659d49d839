"""Prometheus exposition of the accounting, over HTTP (`metrics.listen`) and/or a textfile for
node_exporter's textfile collector (`metrics.textfile`), with the prometheus_client library.

The supervisor's loop is single-threaded and owns the live counters; the HTTP endpoint
(metrics_http.py: bounded connections, timeouts and scrape rate) answers scrapes from its own threads,
and the textfile is written by another. So they never share
mutable state: the loop builds a fresh stats snapshot (`admin.stats_result`) plus worker states and
queue depths and hands them to `publish()`, which only keeps a reference. Rendering the text
(prometheus_client formats every sample: ~5 µs each, ~20 ms for 10 busy model versions) happens in
those threads, never in the loop; nothing here runs per request.

A scrape is exact: it reflects every request answered before it began. Its HTTP thread asks the loop
for a snapshot (a counter, then a write to `wakeup_fd`) and waits for one built after it asked, at most
SCRAPE_WAIT_S; if the loop does not answer in time the scrape gets the last snapshot with
`openinfer_up 0`. The textfile is rewritten from a snapshot the loop publishes every
`metrics.textfile_interval_s` (and once more at close, with `openinfer_up 0`).

What the supervisor's loop must do (and nothing else):
  - poll `exporter.wakeup_fd` for POLLIN when it is not None (the HTTP endpoint is on), and call
    `exporter.on_wakeup()` when it is readable (it only empties the fd, so the poll sleeps again);
  - after every pass over its events, `if exporter.due(now_ns): exporter.publish(stats, workers,
    queue_depths)` with a snapshot built right then: due() is true when a scrape waits or the textfile
    interval has passed, and costs a few attribute reads otherwise;
  - `exporter.close()` when it stops.

Metrics (labels in braces; `code` is the wire code, `OK` for success):
  openinfer_request_duration_seconds{model,version,stage,code}  histogram, buckets 50 µs .. 60 s;
      stage is decode|queue|dispatch|prep|compute|encode|return|batch_wait|total (batch_wait is part
      of queue; only total covers the whole request)
  openinfer_requests_total{model,version,code}           requests refused before a model was known
                                                         have model="" and version=""
  openinfer_request_bytes_total{model,version,direction} direction in|out (tensor bytes)
  openinfer_worker_cpu_seconds_total{model,version}
  openinfer_worker_restarts_total{model,version}
  openinfer_resent_total{model,version}                  direct requests sent back unrun to be sent again
                                                         (lease expired: a reload, a retiring worker)
  openinfer_client_requests_total{client,code}           client as in `openinfer stats` (accounting.py)
  openinfer_queue_depth{model,version}
  openinfer_batch_size{model,version}                    histogram of tasks per dispatch (models with
                                                         [batching]; buckets 1, 2, 4, .. 1024)
  openinfer_rejections_total{limit}                      refusals by admission limit: RESOURCE_EXHAUSTED
                                                         (max_queue, max_queued_bytes, max_in_flight,
                                                         rate_per_s), PERMISSION_DENIED (max_priority)
  openinfer_workers{model,version,state}                 every worker state, 0 included
  openinfer_up                                           1 when the figures are current: for a scrape,
                                                         the loop built them after the scrape began; in
                                                         the textfile, within the last few intervals.
                                                         0 when the loop did not answer in time, and in
                                                         the textfile written at shutdown
"""
from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.settings import MetricsSettings
from openinfer.daemon.workerpool.workers import WorkerState

from .metrics_http import scrape_token, serve_metrics

log = logging.getLogger("openinfer.metrics")

SCRAPE_WAIT_S = 2.0  # how long a scrape waits for the loop's fresh snapshot
_STALE_PUBLISHES = 5  # in the textfile, openinfer_up drops to 0 after this many missed publishes (at least 10 s)
_WORKER_STATES = tuple(state.value for state in WorkerState)


class _Published(NamedTuple):
    stats: dict[str, Any]
    workers: list[dict[str, Any]]
    queue_depths: dict[tuple[str, int], int]
    at_ns: int


def parse_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as "[::1]:PORT") -> (host, port); ConfigError names the setting."""
    host, sep, port_text = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"metrics.listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsExporter:
    """Serves and/or writes the last published snapshot. Create one per supervisor (after everything
    else in its __init__ succeeded: a bad `metrics.listen` raises ConfigError, a taken port OSError)."""

    def __init__(self, settings: MetricsSettings, clients_gid: int | None = None) -> None:
        """`clients_gid`: the group the daemon's socket gives its clients (None: none), which may not read
        metrics.token_file."""
        self.settings = settings
        self.enabled = bool(settings.listen or settings.textfile)
        self.port: int | None = None  # the bound port (useful with port 0)
        self._published: _Published | None = None
        self._publish_interval_ns = int(settings.textfile_interval_s * 1e9)
        self._next_due_ns = 0
        self._next_textfile_ns = 0
        self.textfile_writes_asked = 0  # rewrites publish() has woken the writer for (at most one per interval)
        self._textfile_failing = False
        self._closed = False
        self._up = True
        self._wake_writer = threading.Event()
        self._writer: threading.Thread | None = None
        self._registry = CollectorRegistry(auto_describe=False)  # the last published snapshot (textfile)
        self._registry.register(_SnapshotCollector(self.families))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        # Scrapes waiting for the loop: tickets asked for, the ticket the snapshot being built covers,
        # the ticket the last published one covers (a snapshot built after ticket N was asked covers N).
        self._scrapes = threading.Condition()
        self._asked = 0
        self._covering = 0
        self._answered = 0
        self.wakeup_fd: int | None = None
        if settings.textfile:
            parent = Path(settings.textfile).parent
            if not parent.is_dir():
                raise ConfigError(f"metrics.textfile {settings.textfile!r}: directory {str(parent)!r} does not exist")
            self._writer = threading.Thread(target=self._textfile_writer, name="openinfer-metrics-textfile", daemon=True)
            self._writer.start()
        if settings.listen:
            host, port = parse_listen(settings.listen)
            token = scrape_token(settings.token_file, clients_gid) if settings.token_file else None
            self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            scrapes = CollectorRegistry(auto_describe=False)  # a fresh snapshot per scrape
            scrapes.register(_SnapshotCollector(self.scrape_families))
            self._server, self._thread = serve_metrics(host, port, lambda: generate_latest(scrapes), token)
            self.port = self._server.server_port
            if not _is_loopback(host):
                if token is None:
                    log.warning("metrics endpoint is reachable beyond this host; it has no authentication (metrics.token_file)", extra={"listen": settings.listen})
                else:
                    log.warning("metrics endpoint is reachable beyond this host; its token travels in clear text (plain HTTP): keep it on loopback or behind a TLS proxy", extra={"listen": settings.listen})
            log.info("serving Prometheus metrics", extra={"listen": settings.listen, "port": self.port, "authentication": "bearer token" if token is not None else "none"})
        elif settings.token_file:
            log.warning("metrics.token_file is set but metrics.listen is not: nothing serves metrics over HTTP", extra={"token_file": settings.token_file})
        if settings.token_file and settings.textfile:
            # (attacker round 28) the same figures, client labels and uids among them, for anyone who reads it
            log.warning("metrics.textfile is readable by every local user (0644, for node_exporter): it shows what metrics.token_file keeps from them on metrics.listen; put it in a directory only node_exporter may enter, or turn it off", extra={"textfile": settings.textfile})

    # -- called from the supervisor's loop ------------------------------------------------------------
    def on_wakeup(self) -> None:
        """`wakeup_fd` is readable: empty it. The snapshot itself is asked for by due()."""
        assert self.wakeup_fd is not None
        try:
            os.eventfd_read(self.wakeup_fd)
        except BlockingIOError:
            pass

    def due(self, now_ns: int) -> bool:
        """True when a scrape waits for a snapshot, or the textfile's interval has passed; never when
        no exporter is configured. The caller must then build the snapshot at once and publish() it.
        Cheap enough to call every loop turn."""
        if not self.enabled:
            return False
        asked = self._asked
        if asked > self._answered:
            self._covering = asked  # everything answered so far goes into the snapshot built now
            return True
        if self._writer is None or now_ns < self._next_due_ns:
            return False
        self._next_due_ns = now_ns + self._publish_interval_ns
        return True

    def publish(self, stats: dict[str, Any], workers: list[dict[str, Any]], queue_depths: dict[tuple[str, int], int]) -> None:
        """Keep these (fresh, never again mutated by the caller) for the scrapes that asked for them
        and for the textfile, whose writer thread is woken once per `metrics.textfile_interval_s`.
        `stats` is `admin.stats_result()`, `workers` rows with model, version, state; `queue_depths`
        {(model, version): queued tasks}. Costs a few microseconds."""
        now = time.monotonic_ns()
        self._published = _Published(stats, workers, queue_depths, now)
        if self._covering > self._answered:
            with self._scrapes:
                self._answered = self._covering
                self._scrapes.notify_all()
        if self._writer is not None and now >= self._next_textfile_ns:
            self._next_textfile_ns = now + self._publish_interval_ns
            self.textfile_writes_asked += 1
            self._wake_writer.set()

    def close(self) -> None:
        """Stop the HTTP server; leave a last textfile that says openinfer_up 0. Idempotent."""
        if self._closed:
            return
        with self._scrapes:
            self._closed = True
            self._up = False
            self._scrapes.notify_all()  # a waiting scrape gets the last snapshot, openinfer_up 0
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        with self._scrapes:
            if self.wakeup_fd is not None:
                os.close(self.wakeup_fd)
                self.wakeup_fd = None
        if self._writer is not None:
            self._wake_writer.set()
            self._writer.join(5)
            if self._published is not None:
                self._write_textfile()

    # -- readers: any thread -------------------------------------------------------------------------
    def render_text(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of the last published snapshot."""
        return generate_latest(self._registry)

    def families(self) -> list[Metric]:
        """The last published snapshot (the textfile, render_text)."""
        published = self._published  # one read: a concurrent publish() swaps the whole tuple
        up = 1.0 if self._up and published is not None and self._fresh(published) else 0.0
        return build_families(published, up)

    def scrape_families(self) -> list[Metric]:
        """An HTTP scrape: a snapshot the loop built after this call began (see the module docstring),
        or, if none comes within SCRAPE_WAIT_S, the last one with openinfer_up 0."""
        with self._scrapes:  # held while writing the fd, so close() never closes it under us
            fresh = False
            if not self._closed and self.wakeup_fd is not None:
                self._asked += 1
                ticket = self._asked
                os.eventfd_write(self.wakeup_fd, 1)
                fresh = self._scrapes.wait_for(lambda: self._answered >= ticket or self._closed, SCRAPE_WAIT_S) and not self._closed
        return build_families(self._published, 1.0 if fresh and self._published is not None else 0.0)

    def _fresh(self, published: _Published) -> bool:
        stale_after = max(10_000_000_000, _STALE_PUBLISHES * self._publish_interval_ns)
        return time.monotonic_ns() - published.at_ns <= stale_after

    def _textfile_writer(self) -> None:
        while True:
            self._wake_writer.wait()
            self._wake_writer.clear()
            if self._closed:
                return
            self._write_textfile()

    def _write_textfile(self) -> None:
        """Temp file in the same directory, then rename: node_exporter never reads a partial file
        (it only reads *.prom, so the temp name is ignored). The temp file is new, with a name no one
        can guess, created exclusively (O_EXCL: never through a symlink): the directory may be shared
        with other writers (a textfile collector's), and a fixed temp name once let another uid plant a
        symlink there that the daemon, as root, followed and overwrote a root-only file. The rename
        replaces whatever entry has the final name, a symlink included, never what it points to."""
        path = Path(self.settings.textfile)
        tmp: Path | None = None
        try:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp = Path(name)
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o644)  # what node_exporter (another user) must read
                out.write(self.render_text())
            os.replace(tmp, path)
        except OSError as exc:
            if not self._textfile_failing:  # once per failure streak, not every interval
                log.warning("cannot write the metrics textfile", extra={"path": str(path), "reason": str(exc)})
            self._textfile_failing = True
            try:
                if tmp is not None:
                    tmp.unlink()
            except OSError:
                pass
        else:
            self._textfile_failing = False


class _SnapshotCollector:
    """prometheus_client Collector over one of the exporter's snapshot readers."""

    def __init__(self, families: Callable[[], list[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


def build_families(published: _Published | None, up: float) -> list[Metric]:
    """All metric families for one snapshot (None: nothing published yet, only openinfer_up)."""
    up_family = GaugeMetricFamily("openinfer_up", "1 when these figures are current (built by the daemon's loop after the scrape began; in a textfile, recently), else 0.", value=up)
    if published is None:
        return [up_family]
    stats = published.stats
    duration = HistogramMetricFamily(
        "openinfer_request_duration_seconds",
        "Server-side time per request stage (batch_wait is part of queue; total is the whole request).",
        labels=["model", "version", "stage", "code"],
    )
    requests = CounterMetricFamily("openinfer_requests", "Requests answered, by wire code (OK = success).", labels=["model", "version", "code"])
    request_bytes = CounterMetricFamily("openinfer_request_bytes", "Tensor bytes received (in) and sent (out).", labels=["model", "version", "direction"])
    cpu = CounterMetricFamily("openinfer_worker_cpu_seconds", "CPU time workers spent on requests.", labels=["model", "version"])
    restarts = CounterMetricFamily("openinfer_worker_restarts", "Workers respawned after they died or were killed.", labels=["model", "version"])
    resent = CounterMetricFamily("openinfer_resent", "Direct requests a worker sent back unrun, to be sent again on a new lease (a reload revoked the lease, or the worker retired): not in openinfer_requests.", labels=["model", "version"])
    clients = CounterMetricFamily("openinfer_client_requests", "Requests per client (name@identity), by wire code.", labels=["client", "code"])
    queue = GaugeMetricFamily("openinfer_queue_depth", "Tasks waiting for a worker.", labels=["model", "version"])
    workers = GaugeMetricFamily("openinfer_workers", "Worker processes by state.", labels=["model", "version", "state"])
    batch_size = HistogramMetricFamily("openinfer_batch_size", "Tasks per dispatch to a worker (models with [batching]).", labels=["model", "version"])
    rejections = CounterMetricFamily("openinfer_rejections", "Requests refused by an admission limit (max_priority: PERMISSION_DENIED; the others: RESOURCE_EXHAUSTED).", labels=["limit"])
    cache_lookups = CounterMetricFamily("openinfer_cache_lookups", "Requests looked up in a worker's verdict cache (models with [cache]); hit ratio = hits / lookups.", labels=["model", "version"])
    cache_hits = CounterMetricFamily("openinfer_cache_hits", "Requests answered from a worker's verdict cache, without running anything.", labels=["model", "version"])
    cache_bytes = GaugeMetricFamily("openinfer_cache_bytes", "Bytes the workers' verdict caches hold (as of each worker's last PONG).", labels=["model", "version"])
    chain_runs = CounterMetricFamily("openinfer_chain_model_runs", "Runs of each member of a chain (models with [chain]), over the chain's requests.", labels=["model", "version", "member"])
    chain_compute = CounterMetricFamily("openinfer_chain_model_compute_seconds", "Time each member of a chain ran, over the chain's requests (part of the chain's compute stage).", labels=["model", "version", "member"])

    bounds = [floatToGoString(us / 1e6) for us in stats.get("duration_buckets_us", ())]
    versions: set[tuple[str, str]] = set()
    for name, entry in sorted(stats.get("models", {}).items()):
        for version, snap in sorted(entry.get("versions", {}).items()):
            versions.add((name, version))
            labels = [name, version]
            if snap.get("success"):
                requests.add_metric([*labels, "OK"], snap["success"])
            for code, count in sorted(snap.get("failures", {}).items()):
                requests.add_metric([*labels, code], count)
            request_bytes.add_metric([*labels, "in"], snap.get("bytes_in", 0))
            request_bytes.add_metric([*labels, "out"], snap.get("bytes_out", 0))
            cpu.add_metric(labels, snap.get("cpu_seconds", 0.0))
            restarts.add_metric(labels, snap.get("worker_restarts", 0))
            resent.add_metric(labels, snap.get("resent", 0))
            for code, by_stage in snap.get("durations", {}).items():
                for stage, row in by_stage.items():
                    buckets = [(le, count) for le, count in zip(bounds, row["le"])]
                    buckets.append(("+Inf", row["count"]))
                    duration.add_metric([*labels, stage, code], buckets, row["ns"] / 1e9)
    for code, count in sorted(stats.get("rejected", {}).items()):
        requests.add_metric(["", "", code], count)
    for name, entry in sorted(stats.get("models", {}).items()):
        for version, sizes in sorted(entry.get("batch_sizes", {}).items()):
            buckets, total_tasks = _batch_buckets({int(k): v for k, v in sizes.items()})
            batch_size.add_metric([name, version], buckets, total_tasks)
    for name, entry in sorted(stats.get("models", {}).items()):
        for version, figures in sorted(entry.get("cache", {}).items()):
            cache_lookups.add_metric([name, version], figures.get("lookups", 0))
            cache_hits.add_metric([name, version], figures.get("hits", 0))
            cache_bytes.add_metric([name, version], figures.get("bytes", 0))
    for name, entry in sorted(stats.get("models", {}).items()):
        for version, members in sorted(entry.get("chain", {}).items()):
            for member, figures in members.items():
                chain_runs.add_metric([name, version, member], figures.get("runs", 0))
                chain_compute.add_metric([name, version, member], figures.get("compute_ms", 0.0) / 1000)
    for limit, count in sorted(stats.get("admission", {}).get("rejected", {}).items()):
        rejections.add_metric([limit], count)
    for client, snap in sorted(stats.get("clients", {}).items()):
        if snap.get("success"):
            clients.add_metric([client, "OK"], snap["success"])
        for code, count in sorted(snap.get("failures", {}).items()):
            clients.add_metric([client, code], count)

    depths = {(name, str(version)): depth for (name, version), depth in published.queue_depths.items()}
    states: dict[tuple[str, str], dict[str, int]] = {}
    for row in published.workers:
        key = (str(row["model"]), str(row["version"]))
        by_state = states.setdefault(key, {})
        by_state[row["state"]] = by_state.get(row["state"], 0) + 1
    for key in sorted(versions | set(depths) | set(states)):
        queue.add_metric(list(key), depths.get(key, 0))
        by_state = states.get(key, {})
        for state in _WORKER_STATES:
            workers.add_metric([*key, state], by_state.get(state, 0))
    return [up_family, requests, duration, request_bytes, cpu, restarts, resent, clients, queue, workers, batch_size, rejections, cache_lookups, cache_hits, cache_bytes, chain_runs, chain_compute]


_BATCH_BOUNDS = [2**i for i in range(11)]  # 1 .. 1024 tasks


def _batch_buckets(sizes: dict[int, int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets and the sum (tasks dispatched) from exact {size: dispatches}."""
    buckets = [(floatToGoString(bound), float(sum(n for size, n in sizes.items() if size <= bound))) for bound in _BATCH_BOUNDS]
    buckets.append(("+Inf", float(sum(sizes.values()))))
    return buckets, float(sum(size * n for size, n in sizes.items()))
