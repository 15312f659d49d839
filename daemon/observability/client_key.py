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
# Labels (`client` names) one identity gets a key of its own for; its further ones share
# "(other labels)@<identity>". Labels are the client's own choice: one uid naming 1,100 of them once took
# every row of the books, and every later identity was booked under "(other)" for the rest of the
# daemon's life - in the supervisor's books, and (round 16) in a worker's ledger, whose 1,024 client
# slots one uid filled with labels of refusals that cost it nothing.
LABELS_PER_IDENTITY = 32
OTHER_LABELS = "(other labels)"


def client_key(label: object, identity: str) -> str:
    if not label or not isinstance(label, str):
        return identity
    while len(label.encode()) > LABEL_BYTES:
        label = label[:-1]
    return f"{label}@{identity}"


class LabelBudget:
    """Gives each identity LABELS_PER_IDENTITY labelled keys; asked once per new key."""

    def __init__(self) -> None:
        self._labels: dict[str, int] = {}  # identity -> its labelled keys so far

    def key(self, client: str) -> str:
        """`client` as it is kept: itself, or "(other labels)@<identity>" past the identity's budget. The
        identity is what follows the last "@"; a CURVE key may hold "@" itself: its labels are then
        counted under the key's tail, the same tail every time."""
        label, at, identity = client.rpartition("@")
        if not at or label == OTHER_LABELS:
            return client
        labels = self._labels.get(identity, 0)
        if labels >= LABELS_PER_IDENTITY:
            return f"{OTHER_LABELS}@{identity}"
        self._labels[identity] = labels + 1
        return client
