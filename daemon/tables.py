"""Human-readable tables (rich) for the client commands; `--json` bypasses all of this."""
from __future__ import annotations

import time
from typing import Any, Iterable

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table


def render(table: Table) -> None:
    Console(soft_wrap=False).print(table)


def models_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="models")
    for col in ("model", "version", "state", "workers", "ready", "queued", "reason"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], str(row["version"]), row["state"], str(row.get("workers", "")), str(row.get("ready_workers", "")), str(row.get("queued", "")), escape(row.get("reason") or ""))
    return table


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.1f}" if value else "-"


def status_tables(result: dict[str, Any]) -> list[Table]:
    workers = Table(title=f"workers (daemon pid {result['pid']}, {result['address']}, up {result['uptime_s']:.0f}s{', DRAINING' if result['draining'] else ''})")
    for col in ("id", "pid", "model", "state", "tasks", "restarts", "seccomp", "policy", "uid", "netns", "landlock", "mem limit", "RSS MiB", "USS MiB", "PSS MiB"):
        workers.add_column(col)
    for w in result["workers"]:
        sb = w.get("sandbox") or {}
        mem = w.get("memory") or {}
        limit = sb.get("memory_limit_bytes")
        workers.add_row(
            str(w["id"]),
            str(w["pid"]),
            f"{w['model']}:{w['version']}",
            w["state"],
            str(w["tasks_served"]),
            str(w["restarts"]),
            str(sb.get("seccomp_mode", "off" if not sb.get("enabled", True) else "-")),
            str(sb.get("policy", "-")),
            str((sb.get("uid") or ["-"])[0]),
            ",".join(sb.get("namespaces_entered") or []) or "-",
            str(sb.get("landlock_abi", "-")),
            _mib(limit) if limit else "-",
            _mib(mem.get("rss")),
            _mib(mem.get("uss")),
            _mib(mem.get("pss")),
        )
    return [models_table(result["models"]), workers]


def _ms(us: float | int | None) -> str:
    return "-" if us is None else f"{us / 1000:.3f}"


def _bytes(n: int | None) -> str:
    if not n:
        return "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


_LATENCY_COLUMNS = ("reqs", "ok", "failed", "p50", "p90", "p99", "p99.9", "mean")
_STAGE_COLUMNS = ("decode", "queue", "dispatch", "prep", "compute", "encode", "return")  # total: "mean" above


def _latency_row(label: str, snap: dict[str, Any]) -> list[str]:
    lat = snap.get("latency") or {}
    failed = sum((snap.get("failures") or {}).values())
    return [
        escape(label), str(snap.get("requests", 0)), str(snap.get("success", 0)), str(failed),
        *(_ms(lat.get(key)) for key in ("p50_us", "p90_us", "p99_us", "p99.9_us", "mean_us")),
    ]


def _stage_row(label: str, snap: dict[str, Any]) -> list[str]:
    stages = snap.get("stages") or {}
    cells = [escape(label)]
    for stage in _STAGE_COLUMNS:
        entry = stages.get(stage) or {}
        count = entry.get("count", 0)
        mean_us = entry["ns"] / count / 1000 if count else None
        cells.append("-" if mean_us is None else f"{mean_us:.1f}" if mean_us < 1000 else f"{mean_us:.0f}")
    return cells


def _table(title: str, first: str, columns: Iterable[str], caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption)
    table.add_column(first, overflow="fold")
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    return table


def stats_tables(result: dict[str, Any]) -> list[Table]:
    """Per model version: counts and server-side latency (HDR percentiles, within 1 %), the mean time
    per stage (the cumulative {count, ns} divided out), bytes, worker CPU and restarts; per client:
    counts and latency; then every failure by code. Sized to stay readable at 80 columns."""
    latency = _table("per model: requests and latency (ms)", "model:version", _LATENCY_COLUMNS)
    stages = _table("per model: mean time per stage (µs)", "model:version", _STAGE_COLUMNS)
    usage = _table("per model: traffic and workers", "model:version", ("in", "out", "worker cpu s", "restarts"))
    failures = Table(title="failures by code")
    for col in ("model:version or client", "code", "count"):
        failures.add_column(col, overflow="fold", justify="right" if col == "count" else "left")
    for name, entry in sorted(result.get("models", {}).items()):
        for version, snap in sorted(entry.get("versions", {}).items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0):
            label = f"{name}:{version}"
            latency.add_row(*_latency_row(label, snap))
            if snap.get("stages"):
                stages.add_row(*_stage_row(label, snap))
            usage.add_row(escape(label), _bytes(snap.get("bytes_in")), _bytes(snap.get("bytes_out")), f"{snap.get('cpu_seconds', 0):.3f}", str(snap.get("worker_restarts", 0)))
            for code, count in sorted((snap.get("failures") or {}).items()):
                failures.add_row(escape(label), code, str(count))
    for code, count in sorted((result.get("rejected") or {}).items()):
        failures.add_row("(no model: refused before one was known)", code, str(count))
    clients = _table("per client (name@identity): requests and latency (ms)", "client", _LATENCY_COLUMNS)
    for client, snap in sorted(result.get("clients", {}).items()):
        clients.add_row(*_latency_row(client, snap))
        for code, count in sorted((snap.get("failures") or {}).items()):
            failures.add_row(f"client {escape(client)}", code, str(count))
    tables = [latency, stages, usage, clients]
    if failures.row_count:
        tables.append(failures)
    return tables


def watch_stats(client: Any, interval: float) -> None:
    from rich.console import Group

    with Live(auto_refresh=False) as live:
        while True:
            live.update(Group(*stats_tables(client.stats())), refresh=True)
            time.sleep(interval)


def infer_tables(result: Any) -> list[Table]:
    from .infer_command import summarize

    outputs = Table(title=f"{result.model}:{result.version} outputs")
    for col in ("output", "dtype", "shape", "values"):
        outputs.add_column(col)
    for name, value in result.outputs.items():
        outputs.add_row(escape(name), str(value.dtype), str(list(value.shape)), escape(summarize(value)))
    timing = Table(title="timing (µs)")
    timing.add_column("stage")
    timing.add_column("µs", justify="right")
    for key, value in result.timing.items():
        timing.add_row(key.removesuffix("_us"), f"{value:.1f}")
    return [outputs, timing]


def probes_table(policy: str, results: Iterable[Any]) -> Table:
    table = Table(title=f"sandbox check: policy {policy!r}")
    for col in ("probe", "result", "how"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, "blocked" if r.blocked else "[bold red]ALLOWED[/]", r.how)
    return table


def deployment_table(results: Iterable[Any]) -> Table:
    table = Table(title="sandbox check: deployment")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.check, "ok" if r.ok else "[bold red]FINDING[/]", escape(r.detail))
    return table
