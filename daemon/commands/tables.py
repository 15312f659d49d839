"""Human-readable tables (rich) for the client commands; `--json` bypasses all of this."""
from __future__ import annotations

import time
from typing import Any, Iterable

from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table


def render(table: Table) -> None:
    Console(soft_wrap=False).print(table)


def models_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="models")
    table.add_column("model", overflow="fold")
    for col in ("version", "state", "workers", "ready", "queued"):
        table.add_column(col, no_wrap=True)
    table.add_column("reason", overflow="fold")  # why a model failed: never cut short
    for row in rows:
        table.add_row(escape(row["name"]), str(row["version"]), row["state"], str(row.get("workers", "")), str(row.get("ready_workers", "")), str(row.get("queued", "")), escape(row.get("reason") or ""))
    return table


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.1f}" if value else "-"


def _policy(sandbox: dict[str, Any]) -> str:
    """What a worker serves under, in one word: its seccomp policy; OFF (--insecure-no-sandbox); the
    seccomp mode when it is not a filter (something is wrong); - while the worker has not reported."""
    if not sandbox:
        return "-"
    if not sandbox.get("enabled", True):
        return "OFF"
    mode = sandbox.get("seccomp_mode")
    return escape(str(sandbox.get("policy", "-"))) if mode == 2 else f"seccomp {mode}"


# `openinfer status`: the columns that matter, sized for an 80-column terminal; `--wide` adds the rest.
_WORKER_COLUMNS = ("id", "pid", "model", "state", "tasks", "restarts", "sandbox", "PSS MiB")
_WIDE_COLUMNS = ("seccomp", "uid", "netns", "landlock", "mem limit", "RSS MiB", "USS MiB")
_FOLDING = {"sandbox": 10, "model": 24}  # may fold (a policy path, a very long model name): whole up to this width
_NUMERIC = {"id", "pid", "tasks", "restarts", "mem limit", "RSS MiB", "USS MiB", "PSS MiB"}


def status_tables(result: dict[str, Any], wide: bool = False) -> list[Table]:
    """The models, then one row per worker, without vertical rules (like `ps`): at 80 columns nothing
    is cut to an ellipsis; every column but a long policy path or model name keeps its values whole."""
    columns = _WORKER_COLUMNS + (_WIDE_COLUMNS if wide else ())
    rows = [_worker_row(w, wide) for w in result["workers"]]
    caption = None if wide else "sandbox: the seccomp policy each worker serves under; --wide adds uid, namespaces, Landlock, limits, RSS/USS"
    title = f"workers (daemon pid {result['pid']}, up {result['uptime_s']:.0f}s{', DRAINING' if result['draining'] else ''}) at {escape(result['address'])}"
    workers = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for index, col in enumerate(columns):
        widest = max([len(col), *(len(row[index]) for row in rows)])
        workers.add_column(col, overflow="fold", min_width=min(widest, _FOLDING.get(col, widest)), justify="right" if col in _NUMERIC else "left")
    for row in rows:
        workers.add_row(*row)
    return [models_table(result["models"]), workers]


def _worker_row(w: dict[str, Any], wide: bool) -> list[str]:
    sb = w.get("sandbox") or {}
    mem = w.get("memory") or {}
    row = [str(w["id"]), str(w["pid"]), escape(f"{w['model']}:{w['version']}"), w["state"], str(w["tasks_served"]), str(w["restarts"]), _policy(sb), _mib(mem.get("pss"))]
    if wide:
        limit = sb.get("memory_limit_bytes")
        row += [
            str(sb.get("seccomp_mode", "off" if not sb.get("enabled", True) else "-")),
            str((sb.get("uid") or ["-"])[0]),
            ",".join(sb.get("namespaces_entered") or []) or "-",
            str(sb.get("landlock_abi", "-")),
            _mib(limit) if limit else "-",
            _mib(mem.get("rss")),
            _mib(mem.get("uss")),
        ]
    return row


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
    cache = _table("per model: verdict cache ([cache])", "model:version", ("lookups", "hits", "hit ratio", "held"))
    for name, entry in sorted(result.get("models", {}).items()):
        for version, figures in sorted((entry.get("cache") or {}).items()):
            ratio = figures.get("hit_ratio")
            cache.add_row(escape(f"{name}:{version}"), str(figures.get("lookups", 0)), str(figures.get("hits", 0)), "-" if ratio is None else f"{100 * ratio:.1f} %", _bytes(figures.get("bytes")))
    if cache.row_count:
        tables.append(cache)
    chains = _table("per chain: its models ([chain])", "chain:version", ("model", "requests", "runs", "mean ms"))
    for name, entry in sorted(result.get("models", {}).items()):
        for version, members in sorted((entry.get("chain") or {}).items()):
            for member, figures in members.items():
                mean = figures.get("mean_compute_us")
                chains.add_row(escape(f"{name}:{version}"), escape(member), str(figures.get("requests", 0)), str(figures.get("runs", 0)), "-" if mean is None else f"{mean / 1000:.2f}")
    if chains.row_count:
        tables.append(chains)
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
    tables = [outputs, timing]
    if getattr(result, "stages", None):  # a chain: where its compute went, model by model
        stages = Table(title="chain: compute per model (µs)")
        for col, justify in (("model", "left"), ("runs", "right"), ("µs", "right")):
            stages.add_column(col, justify=justify)  # type: ignore[arg-type]
        for name, stage in result.stages.items():
            stages.add_row(escape(name), str(stage.get("runs", 0)), f"{stage.get('compute_us', 0.0):.1f}")
        tables.append(stages)
    return tables


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
