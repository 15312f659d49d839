"""Round 50: a local user the default policy grants `status` sent 3,000 of them in one write (~100 KB) on
one connection. The supervisor handled every message of a read before anything else: its loop was held
for ~10 s, other clients waited (leases too: the direct path could not start), the workers' PONGs sat
unread in their channels, and every worker of every model was killed as unresponsive - five times over,
until each model was UNAVAILABLE for good (crash loop), models the attacker had no grant on included.

Now an identity's messages take at most a turn of each pass of the loop (frontdoor/connections.py,
TURN_NS): the rest wait on its connection while everyone else, the worker channels and the timers are
served; and a worker whose PONG is overdue is judged on its channel read at that moment."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from other_uid import NOBODY, start_as

X = np.ones((1, 64), np.float32)
OPEN_TO_ALL = {"OPENINFER_SERVER_SOCKET_MODE": "0o666"}  # other uids may open the socket file
BURST = 1500

# As uid 65534: BURST `status` requests in one go on one connection; says when the first reply is in, then
# the CLOCK_MONOTONIC time (system-wide: comparable with the test's) of each reply as it arrives.
ATTACKER = """
context = zmq.Context()
sock = context.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.SNDHWM, 0)
sock.setsockopt(zmq.RCVHWM, 0)
sock.connect(sys.argv[1])
burst = int(sys.argv[2])
for i in range(burst):
    sock.send(msgpack.packb({"v": 1, "id": i + 1, "op": "status"}))
times = []
while len(times) < burst and sock.poll(120_000):
    reply = msgpack.unpackb(sock.recv_multipart()[0])
    assert "result" in reply, reply
    times.append(time.monotonic())
    if len(times) == 1:
        print("first", flush=True)
print(json.dumps(times), flush=True)
"""


def test_a_burst_of_costly_operations_from_another_user_holds_neither_the_workers_nor_other_clients(daemon_factory: Any, tiny_repo: Path) -> None:
    daemon = daemon_factory(tiny_repo, env={**OPEN_TO_ALL, "OPENINFER_POOL_PING_INTERVAL_S": "0.2", "OPENINFER_POOL_PING_GRACE_S": "1", "OPENINFER_POOL_DIRECT": "0"})
    victim = daemon.client(timeout=120)
    victim.infer("tiny", {"x": X})
    pids = sorted(w["pid"] for w in victim.status()["workers"])
    attacker = start_as(NOBODY, ATTACKER, daemon.address, str(BURST))
    assert attacker.stdout is not None
    try:
        assert attacker.stdout.readline().strip() == "first"  # the daemon is handling the burst now
        victim.infer("tiny", {"x": X})  # through the supervisor, as every lease is
        victim_answered = time.monotonic()
        out, err = attacker.communicate(timeout=300)
    finally:
        if attacker.poll() is None:
            attacker.kill()
    replies = json.loads(out.splitlines()[-1])
    assert len(replies) == BURST, err
    # Served in its turn, between the attacker's: before it had half its burst answered (all of it, before).
    assert victim_answered < replies[BURST // 2], f"the victim was answered after {sum(t < victim_answered for t in replies)} of the attacker's {BURST} replies"
    status = victim.status()
    assert sorted(w["pid"] for w in status["workers"]) == pids, "workers were replaced while the burst was handled"
    assert [(m["name"], m["state"], m["ready_workers"]) for m in status["models"]] == [("tiny", "ready", 2)], status["models"]
    assert "unresponsive" not in daemon.log_text()
