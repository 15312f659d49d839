"""What `models`, `status` and `stats` show a peer whose grant of that operation names only some models
(access.py `AccessPolicy.scope`; `health` filters itself: admin.health_result's `scope`): those models'
rows, and of the figures by client only its own.

Such a request names no model, so the access check (per operation and model) let it through - and the
reply was the whole daemon's: a grant of `stats` on `magika` alone read `tiny`'s counts and every other
client's usage, labels and identities (round 36), which the same grant refused when asked for `tiny` by
name. A grant on every model ("*") sees everything, as before; daemon-wide totals that would add up other
models' or clients' activity are left out of a scoped view rather than recomputed."""
from __future__ import annotations

import fnmatch
from typing import Any


def covered(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _own(key: str, identity: str) -> bool:
    """A client key is the identity itself or "label@identity" (client_key.py)."""
    return key == identity or key.endswith("@" + identity)


def scoped_models(result: dict[str, Any], patterns: tuple[str, ...]) -> dict[str, Any]:
    return {"models": [row for row in result["models"] if covered(row["name"], patterns)]}


def scoped_status(result: dict[str, Any], patterns: tuple[str, ...]) -> dict[str, Any]:
    models = [row for row in result["models"] if covered(row["name"], patterns)]
    workers = [row for row in result["workers"] if covered(row["model"], patterns)]
    keep = ("pid", "address", "uptime_s", "draining", "sandbox")
    return {
        **{key: result[key] for key in keep},
        "models": models,
        "workers": workers,
        "queued": sum(row.get("queued", 0) for row in models),
        "reloading": [key for key in result["reloading"] if covered(_name(key), patterns)],
        "retiring": [key for key in result["retiring"] if covered(_name(key), patterns)],
    }


def scoped_stats(result: dict[str, Any], patterns: tuple[str, ...], identity: str) -> dict[str, Any]:
    admission = result["admission"]
    return {
        "models": {name: entry for name, entry in result["models"].items() if covered(name, patterns)},
        "clients": {key: entry for key, entry in result["clients"].items() if _own(key, identity)},
        "duration_buckets_us": result["duration_buckets_us"],
        "admission": {"in_flight_by_client": {key: n for key, n in admission["in_flight_by_client"].items() if _own(key, identity)}, "policy": admission["policy"]},
    }


def _name(key: str) -> str:
    """The model's name in "name:version" or "name" (a model name holds no ":": modelconfig.MODEL_NAME)."""
    return key.split(":", 1)[0]
