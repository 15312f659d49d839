"""What the CLI prints of a daemon's reply, made safe for the operator's terminal.

Every string a daemon sends may be chosen by someone else: a request's `client` label by any uid that
may send one, a model's load error by whoever wrote the file, and every field by a fake daemon (a
socket the operator was pointed at) or an old one that let anything through. A control character in
it reaches the terminal as a command: ESC opens escape sequences that retitle the window, clear the
screen or plant a hyperlink (rich drops only BEL, BS, VT, FF and CR). So the CLI prints no string of
a reply but through `printable` (plain lines) or `cell` (rich tables and titles), and reads no field
but through the tolerant readers below: a missing or wrongly typed field shows as "-", never as a
traceback.
"""
from __future__ import annotations

from typing import Any

from rich.markup import escape

MISSING = "-"


def printable(value: object) -> str:
    """`value` as text with every character `str.isprintable` refuses (C0, DEL, C1, bidi overrides,
    line separators, ...) shown as its Python escape (`\\x1b`, `\\n`, `\\u202e`): visible to the
    operator, never acted on by the terminal. None is "-"."""
    if value is None:
        return MISSING
    text = value if isinstance(value, str) else _text_of(value)
    if text.isprintable():  # nearly always: one C-level scan
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def cell(value: object) -> str:
    """`printable`, and rich markup escaped: for a table cell, a title or a caption."""
    return escape(printable(value))


def _text_of(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def fields(value: object) -> dict[Any, Any]:
    """A map of the reply, or an empty one for anything else (a field missing or of another type)."""
    return value if isinstance(value, dict) else {}


def entries(value: object) -> list[dict[Any, Any]]:
    """The maps in a list of the reply; anything else in it, or a non-list, gives none."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def number(value: object) -> int | float | None:
    """An int or float of the reply (not a bool), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def formatted(value: object, spec: str) -> str:
    """A number of the reply in `spec` (e.g. ".3f"), or "-" when it is not one."""
    figure = number(value)
    return MISSING if figure is None else format(figure, spec)


def count(value: object) -> str:
    """An integer of the reply as text, or "-"."""
    figure = number(value)
    return str(figure) if isinstance(figure, int) else MISSING


def by_key(mapping: dict[Any, Any]) -> list[tuple[Any, Any]]:
    """A map's items in a stable order whatever its keys' types (msgpack gives str or bin keys)."""
    return sorted(mapping.items(), key=lambda item: printable(item[0]))


JSON_DEPTH = 100  # of a reply printed as JSON: the daemon's deepest is a handful; json.dumps fails near 1000


def json_ready(value: object, depth: int = 0) -> Any:
    """A decoded reply as json.dumps takes it: msgpack gives bytes (bin) map keys and values, which JSON
    has not, so a non-str key is its repr (b'...': told apart from a str key) and bytes are text with
    undecodable bytes escaped; maps and lists deeper than JSON_DEPTH are their summary. json.dumps then
    escapes every control character, so nothing of it acts on the terminal."""
    if isinstance(value, (dict, list, tuple)) and depth >= JSON_DEPTH:
        return f"<{type(value).__name__} nested deeper than {JSON_DEPTH} levels>"
    if isinstance(value, dict):
        return {key if isinstance(key, str) else repr(key): json_ready(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item, depth + 1) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return _text_of(value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    return printable(value)  # a msgpack ext type, a timestamp: what it shows as
