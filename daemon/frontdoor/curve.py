"""CurveZMQ (rfc.zeromq.org spec 26) on the daemon's own tcp:// listener: placeholder until the
mechanism lands; tcp:// with keys is refused with a clear error meanwhile."""
from __future__ import annotations

from openinfer.daemon.modelconfig import ConfigError


def load_server_keys(path: str) -> tuple[bytes, bytes]:
    raise ConfigError(f"tcp:// with CURVE ({path}) is not available in this build yet")
