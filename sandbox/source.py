"""Point policy errors at lines of the TOML file.

tomllib returns plain dicts without positions, so we find lines ourselves: first the span of the table an
error belongs to (`[policy]`, the N-th `[[rule]]`), then the first line inside it that mentions the
offending key or value. Good enough to land on the right line for hand-written policies.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import PolicyError

_HEADER = re.compile(r"""^\s*\[\[?\s*([A-Za-z0-9_.\-"' ]+?)\s*\]\]?\s*(#.*)?$""")

Span = tuple[int, int]  # 0-based [first, last) line indexes


class PolicySource:
    """The raw text of one policy file plus helpers that turn a problem into a PolicyError with a line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self._headers = [(i, m.group(1)) for i, line in enumerate(self.lines) if (m := _HEADER.match(line))]
        self._table_spans: set[Span] = set()  # spans table_span found a header for

    def error(self, line: int | None, message: str) -> PolicyError:
        return PolicyError(self.path, line, message)

    @property
    def whole(self) -> Span:
        return 0, len(self.lines)

    def table_span(self, name: str, occurrence: int = 0) -> Span:
        """Lines of the `occurrence`-th table called `name` (`[name]` or `[[name]]`); the whole file if absent."""
        starts = [i for i, header in self._headers if header == name]
        if occurrence >= len(starts):
            return self.whole
        start = starts[occurrence]
        following = [i for i, _ in self._headers if i > start]
        span = (start, following[0] if following else len(self.lines))
        self._table_spans.add(span)
        return span

    def header_line(self, span: Span) -> int | None:
        """The line of the table header opening `span`, None when the span is not a table's."""
        return span[0] + 1 if span in self._table_spans else None

    def line_of_key(self, key: str, span: Span) -> int | None:
        """The line assigning `key` (`key =`, inline `{ key = ...}`) or the table header `[key]`, else the span's header."""
        quoted = re.escape(key)
        pattern = rf"""(^|[{{,\s])["']?{quoted}["']?\s*=|^\s*\[\[?\s*{quoted}\s*\]\]?"""
        return self._find(pattern, span) or self.header_line(span)

    def line_of_string(self, value: str, span: Span) -> int | None:
        """The line where `value` appears as a quoted TOML string, else the span's header."""
        quoted = re.escape(value)
        return self._find(rf"""["']{quoted}["']""", span) or self.header_line(span)

    def line_of_word(self, word: str, span: Span) -> int | None:
        """The line where `word` appears as a whole word (e.g. a constant name inside "A|B"), else the span's header."""
        return self._find(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", span) or self.header_line(span)

    def _find(self, pattern: str, span: Span) -> int | None:
        regex = re.compile(pattern)
        for index in range(*span):
            code = self._strip_comment(self.lines[index])
            if regex.search(code):
                return index + 1
        return None

    @staticmethod
    def _strip_comment(line: str) -> str:
        """Drop a trailing `# comment` that is not inside a string, so comments never match."""
        quote: str | None = None
        for position, char in enumerate(line):
            if quote:
                if char == quote:
                    quote = None
            elif char in "\"'":
                quote = char
            elif char == "#":
                return line[:position]
        return line
