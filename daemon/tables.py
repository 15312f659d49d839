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


def _usage_row(label: str, snap: dict[str, Any]) -> list[str]:
    lat = snap.get("latency") or {}
    failures = ", ".join(f"{k}={v}" for k, v in sorted((snap.get("failures") or {}).items())) or "-"
    return [label, str(snap.get("requests", 0)), str(snap.get("success", 0)), failures, _ms(lat.get("p50_us")), _ms(lat.get("p90_us")), _ms(lat.get("p99_us")), _ms(lat.get("p99.9_us")), f"{snap.get('cpu_seconds', 0):.3f}"]


def _usage_table(title: str, first: str) -> Table:
    table = Table(title=title)
    for col in (first, "requests", "ok", "failures", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "cpu s"):
        table.add_column(col)
    return table


def stats_tables(result: dict[str, Any]) -> list[Table]:
    models = _usage_table("per model", "model:version")
    for name, entry in sorted(result.get("models", {}).items()):
        for version, snap in sorted(entry.get("versions", {}).items()):
            models.add_row(*_usage_row(f"{name}:{version}", snap))
    clients = _usage_table("per client", "client")
    for client, snap in sorted(result.get("clients", {}).items()):
        clients.add_row(*_usage_row(client, snap))
    return [models, clients]


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
