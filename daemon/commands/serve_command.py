"""`openinfer serve`: build the settings, run the supervisor in the foreground, exit with its status."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from openinfer.daemon.frontdoor.listener import EndpointBusy
from openinfer.daemon.observability.jsonlog import configure_logging
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.config.path_settings import resolve_paths
from openinfer.daemon.config.settings import Settings, load_settings

log = logging.getLogger("openinfer.supervisor")


def run_serve(config_file: Path | None, overrides: dict[str, Any]) -> int:
    start_dir = Path.cwd()  # relative paths in settings mean this directory, at start and on reload
    if config_file is not None:
        config_file = start_dir / config_file

    def load() -> Settings:
        return resolve_paths(load_settings(config_file, overrides=overrides), start_dir)

    try:
        settings = load()
    except ConfigError as exc:
        configure_logging("info")
        log.error("invalid configuration", extra={"reason": str(exc)})
        return 2
    try:
        configure_logging(settings.log.level)
    except ValueError:
        configure_logging("info")
        log.error("invalid configuration", extra={"reason": f"log.level {settings.log.level!r} is not one of debug, info, warning, error"})
        return 2
    if not settings.server.models:
        log.error("no model repository: pass --models DIR or set server.models")
        return 2
    if not settings.sandbox.enabled:
        log.warning("SANDBOX DISABLED (--insecure-no-sandbox): workers run with the daemon's full privileges")
    # Before any secret is read: no other process of our uid may ptrace us or read /proc/PID/mem, environ
    # or fd (the lease master key, the CURVE secret key, clients' tensors). Under the shipped unit the
    # workers ARE our uid: one without Landlock read the supervisor's memory (round 42).
    from openinfer.sandbox.process_flags import set_not_dumpable

    set_not_dumpable()
    from openinfer.daemon.control.sdnotify import NotifyError, SystemdNotifier
    from openinfer.daemon.supervisor import Supervisor

    try:
        notifier = SystemdNotifier.from_environ()
    except NotifyError as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        return 1
    try:
        supervisor = Supervisor(settings, reload_settings=load, notifier=notifier)
    except (ConfigError, EndpointBusy, OSError) as exc:
        notifier.close()
        log.error("cannot start", extra={"reason": str(exc)})
        return 1
    try:
        supervisor.load_repository()
        return supervisor.run()
    except ConfigError as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        return 1
    finally:
        supervisor.close()
