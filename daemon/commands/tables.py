"""Human-readable tables (rich) for the client commands; `--json` bypasses all of this.

A reply is read as untrusted: every string goes through `cell` (control characters shown escaped, rich
markup escaped) and every field through the tolerant readers of terminal_text.py, so a hostile label, a
fake daemon or an old one can neither drive the operator's terminal nor make a command fail with a
traceback (tests/attack/test_cli_replies.py)."""
from __future__ import annotations

import time
from typing import Any, Iterable

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .terminal_text import MISSING, by_key, cell, count, entries, fields, formatted, number, printable


def render(table: Table) -> None:
    Console(soft_wrap=False).print(table)


def models_table(rows: object) -> Table:
    table = Table(title="models")
    table.add_column("model", overflow="fold")
    for col in ("version", "state", "workers", "ready", "queued"):
        table.add_column(col, no_wrap=True)
    table.add_column("reason", overflow="fold")  # why a model failed: never cut short
    for row in entries(rows):
        table.add_row(cell(row.get("name")), cell(row.get("version")), cell(row.get("state")), count(row.get("workers")), count(row.get("ready_workers")), count(row.get("queued")), cell(row.get("reason") or ""))
    return table


def _mib(value: object) -> str:
    figure = number(value)
    return f"{figure / 2**20:.1f}" if figure else MISSING


def _policy(sandbox: dict[Any, Any]) -> str:
    """What a worker serves under, in one word: its seccomp policy; OFF (--insecure-no-sandbox); the
    seccomp mode when it is not a filter (something is wrong); - while the worker has not reported."""
    if not sandbox:
        return "-"
    if not sandbox.get("enabled", True):
        return "OFF"
    mode = sandbox.get("seccomp_mode")
    return cell(sandbox.get("policy", MISSING)) if mode == 2 else f"seccomp {cell(mode)}"


# `openinfer status`: the columns that matter, sized for an 80-column terminal; `--wide` adds the rest.
_WORKER_COLUMNS = ("id", "pid", "model", "state", "tasks", "restarts", "sandbox", "PSS MiB")
_WIDE_COLUMNS = ("seccomp", "uid", "netns", "landlock", "mem limit", "RSS MiB", "USS MiB")
_FOLDING = {"sandbox": 10, "model": 24}  # may fold (a policy path, a very long model name): whole up to this width
_NUMERIC = {"id", "pid", "tasks", "restarts", "mem limit", "RSS MiB", "USS MiB", "PSS MiB"}


def status_tables(result: object, wide: bool = False) -> list[Table]:
    """The models, then one row per worker, without vertical rules (like `ps`): at 80 columns nothing
    is cut to an ellipsis; every column but a long policy path or model name keeps its values whole."""
    result = fields(result)
    columns = _WORKER_COLUMNS + (_WIDE_COLUMNS if wide else ())
    rows = [_worker_row(w, wide) for w in entries(result.get("workers"))]
    caption = None if wide else "sandbox: the seccomp policy each worker serves under; --wide adds uid, namespaces, Landlock, limits, RSS/USS"
    uptime = formatted(result.get("uptime_s"), ".0f")
    title = f"workers (daemon pid {count(result.get('pid'))}, up {uptime}{'s' if uptime != MISSING else ''}{', DRAINING' if result.get('draining') is True else ''}) at {cell(result.get('address'))}"
    workers = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for index, col in enumerate(columns):
        widest = max([len(col), *(len(row[index]) for row in rows)])
        workers.add_column(col, overflow="fold", min_width=min(widest, _FOLDING.get(col, widest)), justify="right" if col in _NUMERIC else "left")
    for row in rows:
        workers.add_row(*row)
    return [models_table(result.get("models")), workers]


def _worker_row(w: dict[Any, Any], wide: bool) -> list[str]:
    sb = fields(w.get("sandbox"))
    mem = fields(w.get("memory"))
    row = [count(w.get("id")), count(w.get("pid")), cell(f"{printable(w.get('model'))}:{printable(w.get('version'))}"), cell(w.get("state")), count(w.get("tasks_served")), count(w.get("restarts")), _policy(sb), _mib(mem.get("pss"))]
    if wide:
        uids = sb.get("uid")
        namespaces = sb.get("namespaces_entered")
        row += [
            cell(sb.get("seccomp_mode", "off" if not sb.get("enabled", True) else MISSING)),
            cell(uids[0] if isinstance(uids, list) and uids else MISSING),
            cell(",".join(printable(ns) for ns in namespaces) if isinstance(namespaces, list) and namespaces else MISSING),
            cell(sb.get("landlock_abi", MISSING)),
            _mib(sb.get("memory_limit_bytes")),
            _mib(mem.get("rss")),
            _mib(mem.get("uss")),
        ]
    return row


def _ms(us: object) -> str:
    figure = number(us)
    return MISSING if figure is None else f"{figure / 1000:.3f}"


def _bytes(value: object) -> str:
    n = number(value)
    if not n:
        return "0" if value is None or n == 0 else MISSING
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


_LATENCY_COLUMNS = ("reqs", "ok", "failed", "p50", "p90", "p99", "p99.9", "mean")
_STAGE_COLUMNS = ("decode", "queue", "dispatch", "prep", "compute", "encode", "return")  # total: "mean" above


def _latency_row(label: object, snap: dict[Any, Any]) -> list[str]:
    lat = fields(snap.get("latency"))
    failed = sum(figure for figure in fields(snap.get("failures")).values() if isinstance(number(figure), int))
    return [
        cell(label), count(snap.get("requests", 0)), count(snap.get("success", 0)), str(failed),
        *(_ms(lat.get(key)) for key in ("p50_us", "p90_us", "p99_us", "p99.9_us", "mean_us")),
    ]


def _stage_row(label: object, snap: dict[Any, Any]) -> list[str]:
    stages = fields(snap.get("stages"))
    cells = [cell(label)]
    for stage in _STAGE_COLUMNS:
        entry = fields(stages.get(stage))
        runs, ns = number(entry.get("count", 0)), number(entry.get("ns"))
        mean_us = ns / runs / 1000 if runs and ns is not None else None
        cells.append("-" if mean_us is None else f"{mean_us:.1f}" if mean_us < 1000 else f"{mean_us:.0f}")
    return cells


def _table(title: str, first: str, columns: Iterable[str], caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption)
    table.add_column(first, overflow="fold")
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    return table


def stats_tables(result: object) -> list[Table]:
    """Per model version: counts and server-side latency (HDR percentiles, within 1 %), the mean time
    per stage (the cumulative {count, ns} divided out), bytes, worker CPU and restarts; per client:
    counts and latency; then every failure by code. Sized to stay readable at 80 columns."""
    result = fields(result)
    models = fields(result.get("models"))
    latency = _table("per model: requests and latency (ms)", "model:version", _LATENCY_COLUMNS)
    stages = _table("per model: mean time per stage (µs)", "model:version", _STAGE_COLUMNS)
    usage = _table("per model: traffic and workers", "model:version", ("in", "out", "worker cpu s", "restarts", "resent"))
    failures = Table(title="failures by code")
    for col in ("model:version or client", "code", "count"):
        failures.add_column(col, overflow="fold", justify="right" if col == "count" else "left")
    for name, entry in by_key(models):
        for version, snap in sorted(fields(fields(entry).get("versions")).items(), key=_version_order):
            snap = fields(snap)
            label = f"{printable(name)}:{printable(version)}"
            latency.add_row(*_latency_row(label, snap))
            if snap.get("stages"):
                stages.add_row(*_stage_row(label, snap))
            usage.add_row(cell(label), _bytes(snap.get("bytes_in")), _bytes(snap.get("bytes_out")), formatted(snap.get("cpu_seconds", 0), ".3f"), count(snap.get("worker_restarts", 0)), count(snap.get("resent", 0)))
            for code, figure in by_key(fields(snap.get("failures"))):
                failures.add_row(cell(label), cell(code), count(figure))
    for code, figure in by_key(fields(result.get("rejected"))):
        failures.add_row("(no model: refused before one was known)", cell(code), count(figure))
    clients = _table("per client (name@identity): requests and latency (ms)", "client", _LATENCY_COLUMNS)
    for client, snap in by_key(fields(result.get("clients"))):
        snap = fields(snap)
        clients.add_row(*_latency_row(client, snap))
        for code, figure in by_key(fields(snap.get("failures"))):
            failures.add_row(f"client {cell(client)}", cell(code), count(figure))
    tables = [latency, stages, usage, clients]
    cache = _table("per model: verdict cache ([cache])", "model:version", ("lookups", "hits", "hit ratio", "held"))
    for name, entry in by_key(models):
        for version, figures in by_key(fields(fields(entry).get("cache"))):
            figures = fields(figures)
            ratio = number(figures.get("hit_ratio"))
            cache.add_row(cell(f"{printable(name)}:{printable(version)}"), count(figures.get("lookups", 0)), count(figures.get("hits", 0)), MISSING if ratio is None else f"{100 * ratio:.1f} %", _bytes(figures.get("bytes")))
    if cache.row_count:
        tables.append(cache)
    chains = _table("per chain: its models ([chain])", "chain:version", ("model", "requests", "runs", "mean ms"))
    for name, entry in by_key(models):
        for version, members in by_key(fields(fields(entry).get("chain"))):
            for member, figures in by_key(fields(members)):
                figures = fields(figures)
                mean = number(figures.get("mean_compute_us"))
                chains.add_row(cell(f"{printable(name)}:{printable(version)}"), cell(member), count(figures.get("requests", 0)), count(figures.get("runs", 0)), MISSING if mean is None else f"{mean / 1000:.2f}")
    if chains.row_count:
        tables.append(chains)
    if failures.row_count:
        tables.append(failures)
    return tables


def _version_order(item: tuple[Any, Any]) -> tuple[int, str]:
    """Versions in numeric order ("2" before "10"); a key that is not a number last, by its text."""
    key = printable(item[0])
    return (int(key), "") if key.isdigit() and len(key) < 20 else (2**64, key)


def watch_stats(client: Any, interval: float) -> None:
    from rich.console import Group

    with Live(auto_refresh=False) as live:
        while True:
            live.update(Group(*stats_tables(client.stats())), refresh=True)
            time.sleep(interval)


def infer_tables(result: Any) -> list[Table]:
    from .infer_command import summarize

    outputs = Table(title=f"{cell(result.model)}:{cell(result.version)} outputs")
    for col in ("output", "dtype", "shape", "values"):
        outputs.add_column(col)
    for name, value in result.outputs.items():
        outputs.add_row(cell(name), str(value.dtype), str(list(value.shape)), cell(summarize(value)))  # (a BYTES output's text too)
    timing = Table(title="timing (µs)")
    timing.add_column("stage")
    timing.add_column("µs", justify="right")
    for key, value in fields(result.timing).items():  # the daemon's order: where the time went, stage by stage
        timing.add_row(cell(printable(key).removesuffix("_us")), formatted(value, ".1f"))
    tables = [outputs, timing]
    if getattr(result, "stages", None):  # a chain: where its compute went, model by model
        stages = Table(title="chain: compute per model (µs)")
        for col, justify in (("model", "left"), ("runs", "right"), ("µs", "right")):
            stages.add_column(col, justify=justify)  # type: ignore[arg-type]
        for name, stage in fields(result.stages).items():
            stage = fields(stage)
            stages.add_row(cell(name), count(stage.get("runs", 0)), formatted(stage.get("compute_us", 0.0), ".1f"))
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
        table.add_row(r.check, "ok" if r.ok else "[bold red]FINDING[/]", cell(r.detail))  # (names from the repository)
    return table
