"""Per-model and per-client accounting: counts, cumulative per-stage time, latency distributions.

Stage totals use Triton's cumulative `{count, ns}` shape. Latency percentiles come from HDR histograms
(bounded memory, 2 significant digits = at most 1 % relative error), never from a growing list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_HIGHEST_US = 3_600_000_000  # one hour, in microseconds
STAGES = ("decode", "queue", "dispatch", "prep", "compute", "encode", "return", "total")


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, 2)


@dataclass
class UsageStats:
    """What one model version or one client has used."""

    requests: int = 0
    success: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    stage_ns: dict[str, list[int]] = field(default_factory=dict)  # stage -> [count, ns]
    latency_us: HdrHistogram = field(default_factory=_histogram)
    bytes_in: int = 0
    bytes_out: int = 0
    cpu_us: float = 0.0

    def record(self, code: str | None, timing: dict[str, float], bytes_in: int, bytes_out: int) -> None:
        self.requests += 1
        if code is None:
            self.success += 1
        else:
            self.failures[code] = self.failures.get(code, 0) + 1
        stage_ns = self.stage_ns
        for key, value in timing.items():
            if key.endswith("_us") and key != "cpu_us":
                slot = stage_ns.get(key)
                if slot is None:
                    slot = stage_ns[key] = [0, 0]
                slot[0] += 1
                slot[1] += int(value * 1000)
        total = timing.get("total_us")
        if total is not None:
            self.latency_us.record_value(max(1, min(int(total), _HIGHEST_US)))
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.cpu_us += timing.get("cpu_us", 0.0)

    def snapshot(self) -> dict[str, Any]:
        hist = self.latency_us
        latency = {"count": hist.get_total_count()}
        if latency["count"]:
            for p in PERCENTILES:
                latency[f"p{p:g}_us"] = hist.get_value_at_percentile(p)
            latency["mean_us"] = round(hist.get_mean_value(), 1)
            latency["max_us"] = hist.get_max_value()
        return {
            "requests": self.requests,
            "success": self.success,
            "failures": dict(self.failures),
            "stages": {k[: -len("_us")]: {"count": c, "ns": ns} for k, (c, ns) in self.stage_ns.items()},
            "latency": latency,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "cpu_seconds": round(self.cpu_us / 1e6, 6),
        }


class Accountant:
    """Aggregates finished requests. One instance per supervisor; no global state."""

    def __init__(self) -> None:
        self.by_model: dict[tuple[str, int], UsageStats] = {}
        self.by_client: dict[str, UsageStats] = {}
        self.rejected: dict[str, int] = {}  # requests refused before a model was known, by code

    def record(
        self,
        model: str | None,
        version: int | None,
        client: str,
        code: str | None,
        timing: dict[str, float],
        bytes_in: int = 0,
        bytes_out: int = 0,
    ) -> None:
        if model is not None and version is not None:
            stats = self.by_model.get((model, version))
            if stats is None:
                stats = self.by_model[(model, version)] = UsageStats()
            stats.record(code, timing, bytes_in, bytes_out)
        elif code is not None:
            self.rejected[code] = self.rejected.get(code, 0) + 1
        client_stats = self.by_client.get(client)
        if client_stats is None:
            client_stats = self.by_client[client] = UsageStats()
        client_stats.record(code, timing, bytes_in, bytes_out)

    def snapshot(self, restarts: dict[tuple[str, int], int] | None = None) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for (name, version), stats in sorted(self.by_model.items()):
            entry = models.setdefault(name, {"requests": 0, "success": 0, "failures": {}, "versions": {}})
            snap = stats.snapshot()
            if restarts is not None:
                snap["worker_restarts"] = restarts.get((name, version), 0)
            entry["versions"][str(version)] = snap
            entry["requests"] += snap["requests"]
            entry["success"] += snap["success"]
            for code, n in snap["failures"].items():
                entry["failures"][code] = entry["failures"].get(code, 0) + n
        return {
            "models": models,
            "clients": {client: stats.snapshot() for client, stats in sorted(self.by_client.items())},
            "rejected": dict(self.rejected),
        }
