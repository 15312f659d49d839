"""What bench/peers.py makes of its figures: the issue's ratios and verdicts, the printed summary, the plot.

Every ratio is OpenInfer / FastAPI+uvicorn for one generator family (`c`: wrk / cwire; `python`: aiohttp
/ AsyncClient) and one OpenInfer path (`direct`, `frontdoor`). When cwire has no direct mode, the `c`
family's `direct` entry is the front door's figure, with `path: "frontdoor"` and a `note` saying so.

A ratio's `value` is paired: the median over rounds of (this round's A / this round's B), A and B measured
back to back in the same round, so a burst of another tenant's load moves both sides of each ratio; the
ratio of the two medians is kept beside it (`of_medians`), with each round's ratio (`rounds`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common import median_of, pyplot, ratio

TARGETS = {
    "p50_c1_ratio_max": 0.6,  # OpenInfer p50 / FastAPI p50 at c = 1
    "throughput_ratio_min": 1.5,  # OpenInfer / FastAPI unbatched req/s at c = 8 and c = 32
    "batching_ratio_min": 3.0,  # OpenInfer batched / unbatched req/s at c >= 16
    "sandbox_cost_max": 0.05,  # sandboxed vs --insecure-no-sandbox
    "client_cpu_us_max": 50.0,  # the Python client's CPU per request on the direct path (its process, all of it)
}
GROUPS = {"c": "C generators (wrk / cwire)", "python": "Python clients (aiohttp / AsyncClient)"}
PATHS = ("direct", "frontdoor")
SERIES_LABELS = {
    "fastapi": "FastAPI+uvicorn",
    "openinfer_direct": "OpenInfer direct",
    "openinfer_frontdoor": "OpenInfer front door",
    "openinfer_no_sandbox": "OpenInfer no sandbox",
    "unix_echo": "floor: unix echo",
}
COLORS = {"fastapi": "tab:purple", "openinfer_direct": "tab:green", "openinfer_frontdoor": "tab:blue", "openinfer_no_sandbox": "tab:olive", "unix_echo": "grey"}


# -- figures and ratios ------------------------------------------------------------------------------
def figure(results: dict[str, Any], group: str, name: str, level: int, key: str) -> Any:
    return results.get("figures", {}).get(group, {}).get(name, {}).get("levels", {}).get(str(level), {}).get(key)


def openinfer_name(results: dict[str, Any], group: str, path: str) -> tuple[str, str | None]:
    """The series standing for `path` in `group`, and a note when the front door stands in for direct."""
    name = f"openinfer_{path}"
    if name in results.get("figures", {}).get(group, {}):
        return name, None
    return "openinfer_frontdoor", results["config"]["cwire_direct"].get("note")


def per_round(numerators: list[float | None], denominators: list[float | None]) -> list[float | None]:
    return [ratio(a, b) for a, b in zip(numerators, denominators)]


def paired(results: dict[str, Any], group: str, a: str, b: str, level: int, key: str) -> dict[str, Any]:
    """A / B for one figure: `value` = median of the per-round ratios, `of_medians` beside it."""
    runs_a, runs_b = figure(results, group, a, level, "runs") or [], figure(results, group, b, level, "runs") or []
    rounds = per_round([r.get(key) for r in runs_a], [r.get(key) for r in runs_b])
    of_medians = ratio(figure(results, group, a, level, key), figure(results, group, b, level, key))
    return {"value": None if not rounds else median_of(rounds), "of_medians": of_medians, "rounds": rounds}


def observed_path(direct_share: float | None, asked: str) -> str:
    """The path the replies came by (direct_share from their timing), else the one asked for."""
    if direct_share is None:
        return asked
    return "direct" if direct_share >= 0.99 else "frontdoor" if direct_share <= 0.01 else "mixed"


def versus_fastapi(results: dict[str, Any], group: str, path: str, level: int, key: str) -> dict[str, Any]:
    name, note = openinfer_name(results, group, path)
    share = figure(results, group, name, level, "direct_share")
    served = observed_path(share, "frontdoor" if note else path)
    if note is None and served != path:
        note = f"asked for the {path} path, {share:.0%} of the replies came by the direct path"
    entry = paired(results, group, name, "fastapi", level, key) | {
        "openinfer": figure(results, group, name, level, key), "fastapi": figure(results, group, "fastapi", level, key), "series": name,
        "path": served, "direct_share": share}
    return entry | ({"note": note} if note else {})


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, level, figure_key in (("p50_c1", 1, "p50_us"), ("throughput_c8", 8, "throughput_rps"), ("throughput_c32", 32, "throughput_rps")):
        out[key] = {group: {path: versus_fastapi(results, group, path, level, figure_key) for path in PATHS} for group in GROUPS}
    out["vs_floor"] = floor_distance(results)
    out["sandbox"] = sandbox_cost(results)
    out["batching"] = {c: batching_ratio(f) for c, f in results.get("batching", {}).get("levels", {}).items()}
    return out


def batching_ratio(f: dict[str, Any]) -> dict[str, Any]:
    """Batched / unbatched req/s, paired by repeat (bench/batching.py runs both daemons in each repeat)."""
    rounds = per_round(f["runs_on_rps"], f["runs_off_rps"])
    return {"value": median_of(rounds), "of_medians": ratio(f["on_rps"], f["off_rps"]), "rounds": rounds, "on_rps": f["on_rps"], "off_rps": f["off_rps"]}


def floor_distance(results: dict[str, Any]) -> dict[str, Any]:
    """How far each figure is from the floor: p50 / floor p50 and floor req/s / req/s (both >= 1)."""
    out: dict[str, Any] = {}
    for group in GROUPS:
        for name, data in results.get("figures", {}).get(group, {}).items():
            for level, figures in data["levels"].items():
                floor = results["figures"].get("floor", {}).get("unix_echo", {}).get("levels", {}).get(level, {})
                out.setdefault(group, {}).setdefault(name, {})[level] = {
                    "p50_x_floor": ratio(figures.get("p50_us"), floor.get("p50_us")),
                    "floor_rps_x": ratio(floor.get("throughput_rps"), figures.get("throughput_rps")),
                }
    return out


def sandbox_cost(results: dict[str, Any]) -> dict[str, Any]:
    """Sandboxed / --insecure-no-sandbox on the C generator's path, per level (p50 and req/s)."""
    name, note = openinfer_name(results, "c", "direct")
    out: dict[str, Any] = {}
    for level in results.get("figures", {}).get("c", {}).get("openinfer_no_sandbox", {}).get("levels", {}):
        p50 = paired(results, "c", name, "openinfer_no_sandbox", int(level), "p50_us")
        rps = paired(results, "c", name, "openinfer_no_sandbox", int(level), "throughput_rps")
        out[level] = {"p50": p50["value"], "throughput": rps["value"], "p50_rounds": p50["rounds"], "throughput_rounds": rps["rounds"], "series": name}
    return out


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    r = results["ratios"]
    out: list[dict[str, Any]] = []

    def add(target: str, group: str | None, path: str | None, value: float | None, limit: float, ok: bool | None, note: str | None = None, rounds: list[Any] | None = None) -> None:
        out.append({"target": target, "generator": group, "path": path, "value": value, "limit": limit, "pass": ok, "rounds": rounds or []} | ({"note": note} if note else {}))

    for group in GROUPS:
        for path in PATHS:
            p50 = r["p50_c1"][group][path]
            add("p50 at c=1, OpenInfer / FastAPI <=", group, p50["path"], p50["value"], TARGETS["p50_c1_ratio_max"], None if p50["value"] is None else p50["value"] <= TARGETS["p50_c1_ratio_max"], p50.get("note"), p50["rounds"])
            for key in ("throughput_c8", "throughput_c32"):
                t = r[key][group][path]
                add(f"req/s at c={key[len('throughput_c'):]}, OpenInfer / FastAPI >=", group, t["path"], t["value"], TARGETS["throughput_ratio_min"],
                    None if t["value"] is None else t["value"] >= TARGETS["throughput_ratio_min"], t.get("note"), t["rounds"])
    batching_path = {"auto": "direct", "front-door": "frontdoor"}.get(results.get("batching", {}).get("config", {}).get("path", "front-door"), "direct")
    for c, b in r["batching"].items():
        add(f"req/s at c={c}, batched / unbatched >=", "c", batching_path, b["value"], TARGETS["batching_ratio_min"], None if b["value"] is None else b["value"] >= TARGETS["batching_ratio_min"], rounds=b["rounds"])
    floor_cpu = (figure(results, "floor", "unix_echo", 1, "cpu_us_per_req") or {}).get("generator")
    for level in results.get("config", {}).get("levels", []):
        runs = figure(results, "python", "openinfer_direct", level, "runs") or []
        per_run = [(run.get("cpu_us_per_req") or {}).get("generator") for run in runs]
        cpu = median_of(per_run)  # (None when no run has the figure)
        add(f"Python client CPU per request (µs) at c={level} <=", "python", "direct", cpu, TARGETS["client_cpu_us_max"], None if cpu is None else cpu <= TARGETS["client_cpu_us_max"],
            f"the floor's Python echo client costs {floor_cpu} µs per round trip at c=1" if floor_cpu is not None else None, per_run)
    for level, s in r["sandbox"].items():
        cost = None if s["p50"] is None else round(s["p50"] - 1, 3)
        add(f"sandbox cost, p50 at c={level} <", "c", s["series"][len("openinfer_"):], cost, TARGETS["sandbox_cost_max"], None if cost is None else cost < TARGETS["sandbox_cost_max"],
            rounds=[None if x is None else round(x - 1, 3) for x in s["p50_rounds"]])
        cost = None if s["throughput"] is None else round(1 - s["throughput"], 3)
        add(f"sandbox cost, req/s at c={level} <", "c", s["series"][len("openinfer_"):], cost, TARGETS["sandbox_cost_max"], None if cost is None else cost < TARGETS["sandbox_cost_max"],
            rounds=[None if x is None else round(1 - x, 3) for x in s["throughput_rounds"]])
    return out


# -- summary -----------------------------------------------------------------------------------------
def _num(value: float | None, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width},.{digits}f}"


def print_summary(results: dict[str, Any]) -> None:
    cfg = results["config"]
    levels = cfg["levels"]
    print(f"\nOpenInfer vs FastAPI+uvicorn — tiny model, {cfg['workers']} workers each, median of {cfg['repeats']} round(s) x {cfg['duration_s']} s"
          f"; machine: {results['machine']['cpu_count']} cpus, load {results['machine']['loadavg_at_start'][0]:.2f} at start")
    if not cfg["cwire_direct"]["available"]:
        print(f"note: {cfg['cwire_direct']['note']}")
    head = f"{'':8s} {'series':22s} {'generator':26s}" + "".join(f" | c={c:<3} p50 {'p99':>6} {'req/s':>7}" for c in levels) + " | direct"
    print(head)
    print("-" * len(head))
    for group in ("c", "python", "floor"):
        for name, data in results.get("figures", {}).get(group, {}).items():
            cells = ""
            for c in levels:
                f = data["levels"].get(str(c), {})
                cells += f" | {_num(f.get('p50_us'), 9)} {_num(f.get('p99_us'), 6)} {_num(f.get('throughput_rps'), 7)}"
            share = data["levels"].get(str(levels[0]), {}).get("direct_share")
            print(f"{group:8s} {name:22s} {data['generator']:26s}{cells} | {'' if share is None else f'{share:.0%}'}")
    print("(us, req/s; direct = share of replies served by the direct path)")
    batching = results.get("batching", {})
    for c, f in batching.get("levels", {}).items():
        print(f"batching (bench/batching.py, cwire, path {batching.get('config', {}).get('path', 'auto')}) c={c}: off {_num(f['off_rps'], 0)} req/s, on {_num(f['on_rps'], 0)} req/s, mean batch {f['mean_batch']}")
    if batching.get("skipped"):
        print(f"batching phase skipped ({batching['skipped']})")
    print("\nTargets (reported, never asserted):")
    for v in results.get("verdicts", []):
        state = "n/a " if v["pass"] is None else ("PASS" if v["pass"] else "FAIL")
        spread = f" (rounds {', '.join('-' if x is None else f'{x:g}' for x in v['rounds'])})" if v.get("rounds") else ""
        print(f"  [{state}] {v['target']} {v['limit']:g}: {v['value']}{spread}  ({v['generator']}, {v['path']})" + (f"  [{v['note']}]" if v.get("note") else ""))


# -- plot --------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> bool:
    """Draw `path`; False when matplotlib is missing (common.pyplot says so)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_p50, ax_rps, ax_ratio) = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [1, 1.6, 1.3]})
    _bars(ax_p50, results, [("c", 1), ("python", 1)], "p50_us", "p50 at c = 1 (µs)")
    _bars(ax_rps, results, [("c", 8), ("c", 32), ("python", 8), ("python", 32)], "throughput_rps", "throughput, unbatched (req/s)")
    _ratio_rows(ax_ratio, results)
    handles, labels = ax_rps.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    cfg = results["config"]
    fig.suptitle(f"OpenInfer vs FastAPI+uvicorn — tiny model, {cfg['workers']} workers each, median of {cfg['repeats']} round(s) x {cfg['duration_s']} s — "
                 f"{results['machine']['cpu_count']} cores, {results['machine']['date'][:10]}", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax: Any, results: dict[str, Any], slots: list[tuple[str, int]], key: str, title: str) -> None:
    """Grouped bars: one group per (generator family, level), one bar per server; the floor as a line."""
    names = [n for n in SERIES_LABELS if n != "unix_echo"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, (group, level) in enumerate(slots):
            value = figure(results, group, name, level, key)
            if value is not None:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(value)
        if xs:
            bars = ax.bar(xs, ys, width, color=COLORS[name], label=SERIES_LABELS[name])
            ax.bar_label(bars, fmt="{:,.0f}", fontsize=7, rotation=90, padding=2)
    for j, (_, level) in enumerate(slots):
        floor = figure(results, "floor", "unix_echo", level, key)
        if floor is not None:
            ax.hlines(floor, j - 0.45, j + 0.45, colors="grey", linestyles="dashed", label="floor: unix echo, Python both ends" if j == 0 else None)
    ax.set_xticks(range(len(slots)), [f"{'C gen.' if g == 'c' else 'Python'}\nc = {c}" for g, c in slots])
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)


def _ratio_rows(ax: Any, results: dict[str, Any]) -> None:
    """Each verdict as a bar (value) with its limit (red tick): green passes, red fails (log x)."""
    rows = [v for v in results.get("verdicts", []) if v["value"] is not None and not v["target"].startswith("sandbox") and not v.get("note")]
    sandbox = [v for v in results.get("verdicts", []) if v["target"].startswith("sandbox") and v["value"] is not None]
    labels = [f"{v['target'].split(',')[0]} [{v['generator']}, {v['path']}]" for v in rows]
    values = [v["value"] for v in rows]
    ys = list(range(len(rows)))
    ax.barh(ys, values, color=["tab:green" if v["pass"] else "tab:red" for v in rows], alpha=0.7)
    ax.plot([v["limit"] for v in rows], ys, "k|", ms=14, mew=2, label="target")
    for y, v in zip(ys, values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_title("ratios vs targets (OpenInfer / FastAPI; batched / unbatched)")
    costs = [f"{v['target'].split(', ')[1].rstrip(' <')} {v['value']:+.1%}" for v in sandbox]
    text = "sandbox cost (sandboxed vs not, C gen.): " + ("; ".join(costs) if costs else "not measured")
    ax.set_xlabel(text, fontsize=7, wrap=True)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
