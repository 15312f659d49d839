"""The `openinfer` command: `serve` runs the daemon; the others are clients of a running daemon."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from openinfer.wire.protocol import ENV_SOCKET

socket_option = click.option(
    "--socket", "socket_address", envvar=ENV_SOCKET, default=None, help=f"Daemon address (default: ${ENV_SOCKET}, else the daemon's default)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
timeout_option = click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the daemon.")
# The largest reply frame an admin command (status, stats, models, health) takes: far above what a daemon
# sends (a `stats` of thousands of clients is a few MiB), far below what would hurt the operator's
# machine. A fake daemon's 1 GiB `status` took this CLI to 4.1 GiB of memory before it was bounded.
ADMIN_MAX_REPLY_BYTES = 64 << 20


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """OpenInfer: sandboxed multi-process ONNX inference daemon."""


@main.command()
@click.option("--models", type=click.Path(file_okay=False, path_type=Path), help="Model repository: DIR/<model>/<version>/model.onnx.")
@click.option("--socket", "socket_address", default=None, help="ipc://PATH or tcp://HOST:PORT to serve on.")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Worker processes per model version.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Config file (default /etc/openinfer/openinfer.toml if present).")
@click.option("--insecure-no-sandbox", is_flag=True, default=None, help="Run workers without seccomp/rlimits (development only; logged loudly).")
@click.option("--insecure-tcp", is_flag=True, default=None, help="Allow tcp:// without CURVE authentication.")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--metrics", "metrics_listen", default=None, metavar="HOST:PORT", help="Serve Prometheus metrics over HTTP here (loopback recommended).")
@click.option("--metrics-textfile", default=None, metavar="PATH", help="Write Prometheus metrics to PATH for node_exporter's textfile collector.")
def serve(models: Path | None, socket_address: str | None, workers: int | None, config_file: Path | None, insecure_no_sandbox: bool | None, insecure_tcp: bool | None, log_level: str | None, metrics_listen: str | None, metrics_textfile: str | None) -> None:
    """Run the daemon in the foreground (as systemd does)."""
    from openinfer.daemon.commands.serve_command import run_serve

    overrides: dict[str, Any] = {
        "server.models": str(models) if models else None,
        "server.socket": socket_address,
        "pool.workers": workers,
        "sandbox.enabled": False if insecure_no_sandbox else None,
        "server.insecure_tcp": True if insecure_tcp else None,
        "log.level": log_level,
        "metrics.listen": metrics_listen,
        "metrics.textfile": metrics_textfile,
    }
    sys.exit(run_serve(config_file, overrides))


def _client(socket_address: str | None, timeout: float, max_reply_bytes: int = ADMIN_MAX_REPLY_BYTES) -> Any:
    """A client for one command; `infer` passes the library's default bound (its outputs may be large)."""
    from openinfer.client import Client

    return Client(socket_address, timeout=timeout, max_reply_bytes=max_reply_bytes)


def _fail(exc: Exception) -> NoReturn:
    from openinfer.daemon.commands.terminal_text import printable

    click.echo(f"error: {printable(str(exc))}", err=True)  # (a daemon's error message: its text, never its control characters)
    sys.exit(1)


def _print_json(data: Any) -> None:
    """A reply as JSON, whatever the daemon (or a fake one) put in it: see json_ready."""
    from openinfer.daemon.commands.terminal_text import json_ready

    click.echo(json.dumps(json_ready(data), indent=2))


@main.command()
@socket_option
@json_option
@timeout_option
def health(socket_address: str | None, as_json: bool, timeout: float) -> None:
    """Exit 0 only when every loaded model has a ready worker."""
    from openinfer.client import OpenInferError

    from openinfer.daemon.commands.terminal_text import entries, printable

    try:
        with _client(socket_address, timeout) as client:
            result = client.health()
    except OpenInferError as exc:
        if as_json:
            _print_json({"ready": False, "error": exc.to_wire()})
        else:
            click.echo(f"not ready: {printable(str(exc))}", err=True)
        sys.exit(1)
    ready = result.get("ready") is True
    if as_json:
        _print_json(result)
    else:
        click.echo("ready" if ready else "not ready")
        for row in entries(result.get("not_ready")):
            click.echo(f"  not ready: {printable(row.get('model'))} ({printable(row.get('state'))}){': ' + printable(row['reason']) if row.get('reason') else ''}")
        for row in entries(result.get("failed")):
            click.echo(f"  failed:    {printable(row.get('model'))}: {printable(row.get('reason'))}")
    sys.exit(0 if ready else 1)


@main.command()
@socket_option
@json_option
@timeout_option
def models(socket_address: str | None, as_json: bool, timeout: float) -> None:
    """List models, versions and their state."""
    from openinfer.client import OpenInferError

    from openinfer.daemon.commands.tables import models_table, render

    try:
        with _client(socket_address, timeout) as client:
            rows = client.models()
    except OpenInferError as exc:
        _fail(exc)
    _print_json(rows) if as_json else render(models_table(rows))


@main.command()
@socket_option
@json_option
@timeout_option
@click.option("--wide", is_flag=True, help="Every sandbox and memory column (needs ~140 columns to read well).")
def status(socket_address: str | None, as_json: bool, timeout: float, wide: bool) -> None:
    """Models, and workers (pid, model, state, tasks, restarts, sandbox policy, PSS; --wide: the rest)."""
    from openinfer.client import OpenInferError

    from openinfer.daemon.commands.tables import render, status_tables

    try:
        with _client(socket_address, timeout) as client:
            result = client.status()
    except OpenInferError as exc:
        _fail(exc)
    if as_json:
        _print_json(result)
    else:
        for table in status_tables(result, wide=wide):
            render(table)


@main.command()
@socket_option
@json_option
@timeout_option
@click.option("--watch", type=float, default=None, metavar="SECONDS", help="Refresh in place every SECONDS.")
def stats(socket_address: str | None, as_json: bool, timeout: float, watch: float | None) -> None:
    """Per-model and per-client request counts, failures and latency percentiles."""
    from openinfer.client import OpenInferError

    from openinfer.daemon.commands.tables import render, stats_tables

    try:
        with _client(socket_address, timeout) as client:
            if watch:
                from openinfer.daemon.commands.tables import watch_stats

                watch_stats(client, watch)
                return
            result = client.stats()
    except OpenInferError as exc:
        _fail(exc)
    if as_json:
        _print_json(result)
    else:
        for table in stats_tables(result):
            render(table)


@main.command()
@click.argument("model")
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=FILE.npy", help="An input tensor from a .npy file (repeatable).")
@click.option("--random", "fill", flag_value="random", help="Fill inputs not given with random values of the model's shape.")
@click.option("--zeros", "fill", flag_value="zeros", help="Fill inputs not given with zeros of the model's shape.")
@click.option("--file", "file_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="A file's bytes as the model's BYTES input (a model with steps that takes data whole, e.g. magika).")
@click.option("--dim", "dynamic_dim", type=int, default=1, show_default=True, help="Size used for dynamic (-1) dimensions with --random/--zeros.")
@click.option("--version", "model_version", type=int, default=None, help="Model version (default: newest).")
@click.option("--save", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write each output to DIR/<name>.npy.")
@socket_option
@json_option
@timeout_option
def infer(model: str, inputs: tuple[str, ...], fill: str | None, file_path: Path | None, dynamic_dim: int, model_version: int | None, save: Path | None, socket_address: str | None, as_json: bool, timeout: float) -> None:
    """Run one inference and print the outputs and where the time went."""
    import numpy as np

    from openinfer.client import OpenInferError

    from openinfer.daemon.commands.infer_command import build_inputs, describe_result

    from openinfer.client.direct import DEFAULT_MAX_REPLY_BYTES

    try:
        with _client(socket_address, timeout, DEFAULT_MAX_REPLY_BYTES) as client:
            feed = build_inputs(client, model, model_version, inputs, fill, dynamic_dim, file_path)
            result = client.infer(model, feed, version=model_version)
    except (OpenInferError, ValueError, OSError) as exc:
        _fail(exc)
    if save:
        save.mkdir(parents=True, exist_ok=True)
        for file_name, output in _save_names(list(result.outputs)).items():
            try:
                np.save(save / file_name, result.outputs[output])
            except OSError as exc:
                _fail(exc)
    if as_json:
        _print_json(describe_result(result, full=True))
    else:
        from openinfer.daemon.commands.tables import infer_tables, render

        for table in infer_tables(result):
            render(table)


def _save_names(outputs: list[str]) -> dict[str, str]:
    """A file name for each output (the model's own names, which it chooses): `/` and NUL made `_`, at
    most 200 characters, and a name two outputs would share numbered (`a/b` and `a_b` once wrote one
    file, the second over the first: round 32)."""
    names: dict[str, str] = {}
    for output in outputs:
        base = output.replace("/", "_").replace("\0", "_")[:200] or "_"
        name, n = f"{base}.npy", 1
        while name in names:
            n += 1
            name = f"{base}-{n}.npy"
        names[name] = output
    return names


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Write a CURVE key pair: PATH (secret, mode 0600) and PATH.pub (public, give it to clients)."""
    import errno
    import os

    import zmq

    public, secret = zmq.curve_keypair()
    public_path = Path(f"{path}.pub")
    # Both new files (O_EXCL: never through a symlink, never into a file someone else made): a .pub planted
    # in a shared directory took the public key - a symlink wrote it over another file of root's, a file of
    # another user's kept that user able to change the key clients are given (attacker round 28).
    written: list[Path] = []
    try:
        for target, text, mode in ((public_path, public, 0o644), (path, secret, 0o600)):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            written.append(target)
            with os.fdopen(fd, "w") as f:
                f.write(text.decode() + "\n")
    except OSError as exc:
        for done in written:
            done.unlink()
        if exc.errno == errno.EEXIST:
            raise click.ClickException(f"{exc.filename} already exists: keygen writes two new files, PATH and PATH.pub. Remove the old pair first, or choose another PATH.") from None
        raise click.ClickException(f"cannot write {exc.filename}: {exc.strerror}") from None
    click.echo(f"secret key: {path}\npublic key: {public_path} ({public.decode()})")


@main.group()
def sandbox() -> None:
    """Inspect the worker sandbox on this kernel."""


@sandbox.command("check")
@click.option("--policy", default="worker", show_default=True, help="Policy name (in policies/) or path.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The daemon's config file (default /etc/openinfer/openinfer.toml if present).")
@click.option("--models", type=click.Path(file_okay=False, path_type=Path), default=None, help="Model repository to check (default: server.models).")
@click.option("--socket", "socket_address", default=None, help="The daemon's address (default: server.socket).")
@click.option("--probes/--no-probes", default=True, show_default=True, help="Attack POLICY from forked children.")
@click.option("--deployment/--no-deployment", default=True, show_default=True, help="Check the runtime dir, cache, socket and repository.")
@json_option
def sandbox_check(policy: str, config_file: Path | None, models: Path | None, socket_address: str | None, probes: bool, deployment: bool, as_json: bool) -> None:
    """Try each forbidden action under POLICY in a child process, and check the deployment around the
    sandbox (ownership and modes of the runtime dir, cache, socket and repository; symlinks in the
    repository; models the worker user cannot read). Exit 0 only if every probe was blocked and nothing
    was found; 2 for a bad policy or configuration."""
    from openinfer.wire.protocol import resolve_address
    from openinfer.sandbox import PolicyError
    from openinfer.sandbox.probes import all_blocked, run_probes

    from openinfer.daemon.commands.deployment_checks import all_ok, run_deployment_checks
    from openinfer.daemon.modelstore.modelconfig import ConfigError
    from openinfer.daemon.config.settings import load_settings
    from openinfer.daemon.commands.tables import deployment_table, probes_table, render

    try:
        results = run_probes(policy) if probes else []
        findings = []
        if deployment:
            settings = load_settings(config_file, overrides={"server.models": str(models) if models else None, "server.socket": socket_address})
            findings = run_deployment_checks(settings, resolve_address(settings.server.socket))
    except (PolicyError, ConfigError) as exc:  # exit 2: a bad policy or config, not a leaky sandbox (exit 1)
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        _print_json({
            "probes": [{"probe": r.name, "blocked": r.blocked, "how": r.how} for r in results],
            "deployment": [{"check": r.check, "ok": r.ok, "detail": r.detail} for r in findings],
        })
    else:
        if probes:
            render(probes_table(policy, results))
        if deployment:
            render(deployment_table(findings))
    sys.exit(0 if (not probes or all_blocked(results)) and all_ok(findings) else 1)


if __name__ == "__main__":
    main()
