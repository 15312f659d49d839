"""The settings table in docs/CONFIG.md, generated from `describe_settings()` so the docs cannot drift.

    python -m openinfer.daemon.config_docs                        # print the table
    python -m openinfer.daemon.config_docs --write docs/CONFIG.md # replace the table between the markers
    python -m openinfer.daemon.config_docs --check docs/CONFIG.md # exit 1 if the file's table is stale
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from openinfer.daemon.config.settings import describe_settings

BEGIN_MARKER = "<!-- BEGIN GENERATED SETTINGS TABLE: python -m openinfer.daemon.config_docs --write docs/CONFIG.md -->"
END_MARKER = "<!-- END GENERATED SETTINGS TABLE -->"

# `openinfer serve` flags and the setting each one sets (daemon/cli.py builds the same mapping).
CLI_FLAGS: dict[str, str] = {
    "server.models": "--models",
    "server.socket": "--socket",
    "pool.workers": "--workers",
    "sandbox.enabled": "--insecure-no-sandbox",  # sets it to false
    "server.insecure_tcp": "--insecure-tcp",
    "log.level": "--log-level",
    "metrics.listen": "--metrics",
    "metrics.textfile": "--metrics-textfile",
}


def format_default(key: str, value: Any) -> str:
    """A default as it is written in openinfer.toml (octal for permission bits)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and key.endswith("_mode"):
        return f"0o{value:o}"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _text(text: str) -> str:
    """Plain table cell: `<models>` must not be read as an HTML tag, `|` must not end the cell."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """Code-span cell: entities would show literally there; only `|` needs escaping."""
    return "`" + text.replace("|", "\\|").replace("\n", " ") + "`" if text else ""


def render_config_table() -> str:
    """Markdown table: one row per setting, in declaration order; ends with a newline."""
    lines = [
        "| Key | Environment variable | CLI flag | Type | Default | On reload | Description |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, env, kind, default, help_text, reload in describe_settings():
        flag = CLI_FLAGS.get(key, "")
        lines.append(f"| {_code(key)} | {_code(env)} | {_code(flag)} | {kind} | {_code(format_default(key, default))} | {reload} | {_text(help_text)} |")
    return "\n".join(lines) + "\n"


def extract_table(document: str) -> str:
    """The text between the markers (exclusive); ValueError if they are missing or out of order."""
    start = document.find(BEGIN_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError("the generated-table markers are missing")
    return document[start + len(BEGIN_MARKER) : end].strip("\n") + "\n"


def replace_table(document: str, table: str) -> str:
    extract_table(document)  # validates the markers
    head, _, rest = document.partition(BEGIN_MARKER)
    _, _, tail = rest.partition(END_MARKER)
    return f"{head}{BEGIN_MARKER}\n{table}{END_MARKER}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openinfer.daemon.config_docs", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="replace the table between the markers in FILE")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's table differs from the settings")
    args = parser.parse_args(argv)
    table = render_config_table()
    if args.write:
        args.write.write_text(replace_table(args.write.read_text(), table))
        return 0
    if args.check:
        if extract_table(args.check.read_text()) != table:
            print(f"{args.check}: settings table is stale; run python -m openinfer.daemon.config_docs --write {args.check}")
            return 1
        return 0
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
