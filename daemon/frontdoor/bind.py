"""Which listener the configured address gets: a Unix socket, or tcp:// with CURVE, or (only with
--insecure-tcp) plain tcp://."""
from __future__ import annotations

import logging

from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.settings import Settings

from .listener import BoundListener, bind_tcp, bind_unix

log = logging.getLogger("openinfer.supervisor")


def bind_public(settings: Settings, address: str) -> BoundListener:
    server = settings.server
    if address.startswith("ipc://"):
        return bind_unix(address, mode=server.socket_mode, group=server.socket_group)
    if address.startswith("tcp://"):
        if server.curve_secret_key_file:
            from .curve import load_server_keys

            return bind_tcp(address, curve=load_server_keys(server.curve_secret_key_file))  # a bad key file fails the start, named
        if not server.insecure_tcp:
            raise ConfigError(
                f"refusing to serve {address} without authentication: tcp:// needs CURVE keys "
                "(server.curve_secret_key_file), or --insecure-tcp to accept anyone who can reach the port"
            )
        log.warning("SERVING PLAIN TCP WITHOUT AUTHENTICATION OR ENCRYPTION", extra={"address": address})
        return bind_tcp(address)
    raise ConfigError(f"unsupported address {address!r}: use ipc://PATH or tcp://HOST:PORT")
