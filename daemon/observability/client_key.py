"""The key a request is accounted under: its kernel-proven identity, under the client's own label when
the request gives one (`"<label>@uid=1000"`), the same on the front door and on the direct path.

A label is any string of at most 64 characters (PROTOCOL.md 4.1), "@" included: the identity is what
follows the last "@". It is cut, by whole characters, to LABEL_BYTES of UTF-8, so that every key fits a
ledger slot whole (daemon/direct/ledger.py) and a cut can never reach into the identity."""
from __future__ import annotations

import re

LABEL_BYTES = 80  # + "@uid=4294967295" (15 bytes) = 95: one ledger slot, less its length byte
# What a worker's ledger may name as a client: an identity, optionally under a label (1-64 characters).
CLIENT_KEY = re.compile(r"(?s:.{1,64})@uid=\d{1,10}|uid=\d{1,10}")


def client_key(label: object, identity: str) -> str:
    if not label or not isinstance(label, str):
        return identity
    while len(label.encode()) > LABEL_BYTES:
        label = label[:-1]
    return f"{label}@{identity}"
