"""The operator's `openinfer` CLI reads what a daemon sends as untrusted (attacker round 5, findings 6
and 8, and a suspected crash).

- Terminal escapes: a request's `client` label, chosen by any uid that may send one, was printed raw by
  `openinfer stats` (rich escapes only its markup and drops only BEL, BS, VT, FF and CR): the attacker's
  OSC 2 retitled the operator's window, CSI 2J cleared the screen, OSC 8 planted a hyperlink. A fake
  daemon reached the terminal the same way through any field of `status`. The daemon now refuses such a
  label (test_front_door.py); here, the CLI's side: every string it prints of a reply shows control
  characters escaped, whatever sent it.
- Malformed replies: `status_tables` indexed the reply's fields, so a reply without `pid`, `uptime_s` or
  `address` (or with a string where a number goes) ended the command in a traceback.
- Size: the CLI's front-door socket had no ZMQ_MAXMSGSIZE, so a fake daemon's 1 GiB `status` reply took
  it to 4.1 GiB of memory. Its admin commands now take frames of at most 64 MiB, and an oversized reply
  is an error naming the limit.

- Undecodable and non-JSON replies (attacker round 6, finding 7): a fake daemon's reply with a bytes
  map key ended `openinfer health --json` / `status --json` in a traceback (`TypeError: keys must be
  str`), and one whose header has an int map key ended `openinfer stats` in msgpack's `ValueError: int
  is not allowed for map key when strict_map_key=True`, raised by the Python Client itself (not an
  OpenInferError; the AsyncClient dropped such a reply and waited out its timeout). A reply header that
  does not decode is now `INTERNAL` naming what was wrong, and `--json` prints any decoded reply.

Before the fix, the table tests found ESC in the rendered text or raised KeyError/TypeError, and the
fake-daemon tests saw the escapes on the CLI's stdout, a traceback, and exit 0 after an 80 MiB reply.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from daemon_harness import world_readable_dir
from peak_memory import run_with_peak
from test_c_client import c_example, c_example_asan  # noqa: F401  (fixtures: build client/c)
from openinfer.client import AsyncClient, Client, Internal
from openinfer.daemon.commands.tables import models_table, stats_tables, status_tables

ESC = "\x1b"
# What the attacker sent as its label: OSC 2 (window title), CSI 2J + CUP (clear, home), SGR, OSC 8 (hyperlink);
# then the C1 form of CSI, a bidi override and a bare newline: all acted on by some terminal.
HOSTILE = "\x1b]2;PWNED-TITLE\x1b\\\x1b[2J\x1b[H\x1b[31mALL OK\x1b[0m\x1b]8;;http://evil/\x1b\\x\x9b2J\u202e\n[bold]"


def rendered(tables: list[Table]) -> str:
    """As the operator's terminal would get it, minus rich's own styling (color_system=None): any ESC
    left in the text came from the reply."""
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=True, soft_wrap=False)
    for table in tables:
        console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]


def assert_inert(text: str) -> None:
    for char in (ESC, "\x9b", "\u202e"):
        assert char not in text, f"{char!r} reaches the terminal: {text[max(0, text.find(char) - 40):text.find(char) + 40]!r}"


def labelled_stats() -> dict[str, Any]:
    """`stats` as the daemon sent it after the attack: well formed, the attacker's label a client key."""
    snap = {"requests": 1, "success": 1, "failures": {"DEADLINE_EXCEEDED": 1}, "latency": {"p50_us": 120.0, "mean_us": 130.0}}
    return {"models": {"tiny": {"versions": {"1": snap}}}, "clients": {f"{HOSTILE}@uid=65534": snap, "ops@uid=0": snap}, "rejected": {}}


def escaping_status() -> dict[str, Any]:
    """A fake daemon's `status`, well formed, a hostile string in every text field."""
    worker = {"id": 1, "pid": 2, "model": HOSTILE, "version": 1, "state": HOSTILE, "tasks_served": 0, "restarts": 0, "uptime_s": 1.0,
              "sandbox": {"enabled": True, "seccomp_mode": 2, "policy": HOSTILE, "uid": [HOSTILE], "namespaces_entered": [HOSTILE], "landlock_abi": HOSTILE, "memory_limit_bytes": 1 << 30},
              "memory": {"rss": 1 << 20, "uss": 1 << 20, "pss": 1 << 20}}
    return {"pid": 1, "uptime_s": 5.0, "draining": False, "address": HOSTILE, "workers": [worker],
            "models": [{"name": HOSTILE, "version": 1, "state": HOSTILE, "workers": 1, "ready_workers": 1, "queued": 0, "reason": HOSTILE}]}


def hostile_stats() -> dict[str, Any]:
    snap = {"requests": 1, "success": 0, "failures": {HOSTILE: 1}, "latency": {"p50_us": HOSTILE}, "stages": {"queue": {"count": HOSTILE, "ns": 5}}, "bytes_in": HOSTILE, "cpu_seconds": HOSTILE}
    return {
        "models": {HOSTILE: {"versions": {HOSTILE: snap, "2": "not a map"}, "cache": {HOSTILE: {"lookups": HOSTILE, "hit_ratio": HOSTILE, "bytes": HOSTILE}}, "chain": {HOSTILE: {HOSTILE: {"mean_compute_us": HOSTILE}}}}, "m": "not a map"},
        "clients": {f"{HOSTILE}@uid=65534": snap, "b": [1]},
        "rejected": {HOSTILE: HOSTILE},
    }


def hostile_status() -> dict[str, Any]:
    worker = {"id": HOSTILE, "model": HOSTILE, "version": HOSTILE, "state": HOSTILE, "sandbox": {"enabled": True, "seccomp_mode": 2, "policy": HOSTILE, "uid": [HOSTILE], "namespaces_entered": [HOSTILE, 1], "landlock_abi": HOSTILE, "memory_limit_bytes": HOSTILE}, "memory": {"pss": HOSTILE}}
    return {  # no pid, no uptime_s, no draining; the rest hostile or of the wrong type
        "address": HOSTILE,
        "models": [{"name": HOSTILE, "version": HOSTILE, "state": HOSTILE, "workers": HOSTILE, "reason": HOSTILE}, "not a map"],
        "workers": [worker, {"sandbox": {"enabled": True, "seccomp_mode": HOSTILE}}, 7],
    }


def test_stats_tables_show_a_hostile_label_escaped() -> None:
    text = rendered(stats_tables(labelled_stats()))
    assert_inert(text)
    assert "\\x1b[2J" in text  # the operator sees what was sent, as text


@pytest.mark.parametrize("wide", [False, True])
def test_status_tables_show_hostile_strings_escaped(wide: bool) -> None:
    text = rendered(status_tables(escaping_status(), wide=wide))
    assert_inert(text)
    assert "\\x1b]2;PWNED-TITLE" in text


def test_stats_tables_take_missing_and_mistyped_fields() -> None:
    assert_inert(rendered(stats_tables(hostile_stats())))


@pytest.mark.parametrize("wide", [False, True])
def test_status_tables_show_missing_and_mistyped_fields_as_a_dash(wide: bool) -> None:
    text = rendered(status_tables(hostile_status(), wide=wide))
    assert_inert(text)
    assert "\\x1b]2;PWNED-TITLE" in text
    if not wide:  # (wider than the console, rich leaves a table's title blank)
        assert "daemon pid -, up -" in text


def test_a_reply_with_nothing_in_it_renders_empty_tables() -> None:
    for result in ({}, {"models": None, "workers": None, "clients": 3}, {"models": [], "workers": {}, "pid": "1", "uptime_s": "5", "draining": "yes", "address": None}):
        rendered(status_tables(result))
        rendered(stats_tables(result))
    rendered([models_table(None), models_table([None, {}, {"name": 1}])])


_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True), st.text(max_size=12), st.binary(max_size=8), st.just(HOSTILE))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(["1", "10", "versions", "cache", "chain", "failures", "latency", "stages"]), st.binary(max_size=4)), inner, max_size=3)), max_leaves=10)
_status_keys = st.sampled_from(["pid", "uptime_s", "draining", "address", "models", "workers", "name", "version", "state", "id", "sandbox", "memory", "tasks_served", "restarts", "enabled", "seccomp_mode", "policy", "uid", "pss"])
_stats_keys = st.sampled_from(["models", "clients", "rejected", "versions", "cache", "chain", "failures", "latency", "stages", "requests", "hit_ratio", "mean_compute_us", "count", "ns", "1", "2"])


def _tree(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Replies shaped like the real ones (their keys) with anything where a value goes."""
    return st.recursive(_values, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)


@settings(max_examples=200, deadline=None)
@given(status=_tree(_status_keys), stats=_tree(_stats_keys), wide=st.booleans())
def test_any_reply_renders_without_an_exception_or_an_escape(status: Any, stats: Any, wide: bool) -> None:
    assert_inert(rendered(status_tables(status, wide=wide)))
    assert_inert(rendered(stats_tables(stats)))
    assert_inert(rendered([models_table(status)]))


# -- a fake daemon: a ROUTER on a socket the operator's CLI was pointed at ----------------------------------
@pytest.fixture
def fake_daemon() -> Iterator[Callable[[Callable[[dict[str, Any]], list[bytes]]], str]]:
    """Serve `answer(request header) -> reply frames` on an ipc:// address until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    context = zmq.Context()
    path = world_readable_dir("oi-fake-daemon-") / "openinfer.sock"

    def start(answer: Callable[[dict[str, Any]], list[bytes]]) -> str:
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"ipc://{path}")

        def serve() -> None:
            try:
                while not stop.is_set():
                    if router.poll(50):
                        routing_id, header = router.recv_multipart()[:2]
                        router.send_multipart([routing_id, *answer(msgpack.unpackb(header))])
            finally:
                router.close(0)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return f"ipc://{path}"

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)
    context.term()


def result_reply(result: Any) -> Callable[[dict[str, Any]], list[bytes]]:
    return lambda header: [msgpack.packb({"v": 1, "id": header["id"], "result": result})]


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    # The operator's command as it runs in a terminal; stdout is a pipe here, which changes only rich's
    # colours: what a reply holds reaches stdout either way (the attacker's run used a pty: script(1)).
    return subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", *args], capture_output=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("reply", [escaping_status, hostile_status], ids=["escapes", "missing-fields"])
def test_a_fake_daemons_status_reaches_no_terminal(fake_daemon: Any, reply: Callable[[], dict[str, Any]]) -> None:
    address = fake_daemon(result_reply(reply()))
    done = run_cli("status", "--wide", "--socket", address)
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert ESC.encode() not in done.stdout, f"an escape sequence reaches the terminal: {done.stdout[:300]!r}"
    assert done.returncode == 0 and b"\\x1b]2;PWNED-TITLE" in done.stdout, done.stdout


def test_a_fake_daemons_error_message_and_health_reach_no_terminal(fake_daemon: Any) -> None:
    def answer(header: dict[str, Any]) -> list[bytes]:
        if header["op"] == "health":
            return [msgpack.packb({"v": 1, "id": header["id"], "result": {"ready": HOSTILE, "not_ready": [{"model": HOSTILE, "state": HOSTILE, "reason": HOSTILE}, 3], "failed": [{"model": HOSTILE}]}})]
        return [msgpack.packb({"v": 1, "id": header["id"], "error": {"code": HOSTILE, "message": HOSTILE}})]

    address = fake_daemon(answer)
    health = run_cli("health", "--socket", address)
    assert b"Traceback" not in health.stderr, health.stderr.decode()
    assert health.returncode == 1 and ESC.encode() not in health.stdout + health.stderr, health.stdout
    for command in ("stats", "models"):
        done = run_cli(command, "--socket", address)
        assert done.returncode == 1 and done.stderr.startswith(b"error: "), done.stderr.decode()
        assert ESC.encode() not in done.stdout + done.stderr, done.stderr


def test_an_oversized_status_reply_fails_the_cli_naming_the_limit(fake_daemon: Any) -> None:
    """80 MiB of `status` (over the admin commands' 64 MiB; the attacker sent 1 GiB, and the CLI took
    4.1 GiB): libzmq reads the frame's length and closes the connection instead of taking it."""
    blob = b"A" * (80 << 20)
    status = {"pid": 1, "uptime_s": 5.0, "draining": False, "address": "ipc:///run/openinfer/openinfer.sock", "models": [], "workers": [], "x": blob}
    address = fake_daemon(lambda header: [msgpack.packb({"v": 1, "id": header["id"], "result": status})])
    done = run_cli("status", "--socket", address, "--timeout", "30")
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert done.returncode == 1, f"the CLI took the whole 80 MiB reply: exit {done.returncode}, {done.stdout[-200:]!r}"
    assert done.stderr.startswith(b"error: ") and b"max_reply_bytes (67108864 bytes)" in done.stderr, done.stderr.decode()


def test_the_c_client_takes_no_front_door_reply_over_its_max_reply_bytes(fake_daemon: Any, c_example: Path) -> None:
    """client/c's front-door socket had no ZMQ_MAXMSGSIZE: a fake daemon's 80 MiB `status` was taken
    whole (no option bounded it). With `oi_set_max_reply_bytes` (64 MiB here; 1 GiB by default) libzmq
    closes the connection on the frame's length and the call fails at once, TRANSPORT, naming the limit."""
    blob = b"A" * (80 << 20)
    address = fake_daemon(lambda header: [msgpack.packb({"v": 1, "id": header["id"], "result": {"x": blob}})])
    outcome = run_with_peak([str(c_example), "--timeout", "20000", "--max-reply-bytes", str(64 << 20), "op", address, "status"])
    assert outcome["stdout"].startswith("error UNAVAILABLE rc=TRANSPORT"), outcome
    assert "max_reply_bytes, 67108864 bytes" in outcome["stdout"], outcome
    assert outcome["peak"] < 64 << 20, f"the C client's peak memory was {outcome['peak'] >> 20} MiB"


def nils_header(header: dict[str, Any], count: int, **fields: Any) -> bytes:
    """A valid reply header with one key more: "pad", an array32 of `count` nils (msgpack-c makes 16
    bytes of each)."""
    head = msgpack.packb({"v": 1, "id": header["id"], **fields})
    return bytes((head[0] + 1,)) + head[1:] + msgpack.packb("pad") + b"\xdd" + count.to_bytes(4, "big") + b"\xc0" * count


def no_lease(answer: Callable[[dict[str, Any]], list[bytes]]) -> Callable[[dict[str, Any]], list[bytes]]:
    """An older daemon's answer to `lease` (the C client then sends every infer to the front door)."""
    error = {"code": "INVALID_ARGUMENT", "message": "unknown operation 'lease'"}
    return lambda header: [msgpack.packb({"v": 1, "id": header["id"], "error": error})] if header["op"] == "lease" else answer(header)


@pytest.mark.parametrize("command, limit", [(("op", "ADDRESS", "status"), 8 << 20), (("ADDRESS", "m"), 1 << 20)], ids=["status", "infer"])
def test_the_c_client_refuses_a_front_door_reply_header_over_its_bound(fake_daemon: Any, c_example: Path, command: tuple[str, ...], limit: int) -> None:
    """Attacker round 7: a reply header was decoded whatever its size under max_reply_bytes (1 GiB), at
    ~25 times its size (128 MiB of nils: 3.2 GiB). Now a header over 8 MiB (`status`, any operation but
    infer) or 1 MiB (`infer`) fails the call, RESOURCE_EXHAUSTED naming the limit, undecoded. Before,
    these 9 and 2 MiB headers were decoded: ~150 and ~35 MiB of peak memory, `status` printed OK."""
    count = limit + (1 << 20)
    address = fake_daemon(no_lease(lambda header: [nils_header(header, count, result={})] if header["op"] == "status" else
                                   [nils_header(header, count, error={"code": "INTERNAL", "message": "x"})]))
    outcome = run_with_peak([str(c_example), "--timeout", "20000", *(address if arg == "ADDRESS" else arg for arg in command)])
    assert outcome["stdout"].startswith("error RESOURCE_EXHAUSTED rc=RESOURCE_EXHAUSTED local=1"), outcome
    assert f"over this client's limit of {limit} bytes for a reply header" in outcome["stdout"], outcome
    assert outcome["peak"] < limit + (32 << 20), f"the C client's peak memory was {outcome['peak'] >> 20} MiB"


def test_the_c_client_decodes_no_header_claiming_more_than_it_holds(fake_daemon: Any, c_example_asan: Path) -> None:
    """Attacker round 7 (its fuzzer, one flipped bit): a header of 90 bytes whose map32 head claims
    2^32 - 1 pairs made msgpack-c ask for 128 GiB before reading one (ASan: "allocator is out of memory
    trying to allocate 0x4000000008 bytes"; without ASan that malloc fails, or with overcommit succeeds).
    Now a header whose arrays and maps claim more elements than it has bytes left is not decoded: the
    client built with ASan drops it as a reply it cannot read (whose it is cannot be known) and its call
    ends at its timeout. Before, ASan aborted it."""

    def claims(header: dict[str, Any]) -> list[bytes]:
        head = msgpack.packb({"v": 1, "id": header["id"]})
        return [bytes((head[0] + 1,)) + head[1:] + msgpack.packb("pad") + b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64]

    done = subprocess.run([str(c_example_asan), "--timeout", "500", "op", fake_daemon(claims), "status"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert "AddressSanitizer" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.startswith("error DEADLINE_EXCEEDED rc=TIMEOUT"), done.stdout


# The Python client's own hang-up on a reply that does not decode, and --json on one that is not JSON
NOT_JSON_REPLIES = {
    "health-bytes-keys": (("health", "--json"), {b"ready": True, "x": 1, b"\x1b[2J": b"\x1b]2;PWNED\x07\xff"}),
    "status-bytes-key": (("status", "--json"), {b"\x1b[2J": 1, "nested": [{b"k": [b"v", None, 2.5]}]}),
}


@pytest.mark.parametrize("command, result", NOT_JSON_REPLIES.values(), ids=NOT_JSON_REPLIES.keys())
def test_a_fake_daemons_reply_with_bytes_keys_prints_as_json(fake_daemon: Any, command: tuple[str, ...], result: Any) -> None:
    address = fake_daemon(lambda header: [msgpack.packb({"v": 1, "id": header["id"], "result": result}, use_bin_type=True)])
    done = run_cli(*command, "--socket", address)
    assert b"Traceback" not in done.stdout + done.stderr, done.stderr.decode()
    assert ESC.encode() not in done.stdout + done.stderr, done.stdout
    printed = json.loads(done.stdout)  # every key a str: a bytes key is its repr, told apart from a str key
    assert printed["b'\\x1b[2J'"] in (1, "\x1b]2;PWNED\x07\\xff"), printed


def int_key_header(header: dict[str, Any]) -> list[bytes]:
    """A reply whose header decodes to no protocol header: msgpack takes only str and bin map keys."""
    return [msgpack.packb({"v": 1, "id": header["id"], 7: "int key", "result": {}})]


def test_a_reply_header_with_an_int_key_fails_the_cli_cleanly(fake_daemon: Any) -> None:
    done = run_cli("stats", "--socket", fake_daemon(int_key_header))
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert done.returncode == 1 and done.stderr.startswith(b"error: INTERNAL: "), done.stderr.decode()
    assert b"is not a valid protocol header" in done.stderr and b"int is not allowed for map key" in done.stderr, done.stderr.decode()


def test_a_reply_header_that_does_not_decode_is_an_openinfer_error(fake_daemon: Any) -> None:
    with Client(fake_daemon(int_key_header), timeout=5) as client, pytest.raises(Internal, match="is not a valid protocol header"):
        client.status()  # before: msgpack's ValueError


def test_a_reply_header_that_does_not_decode_fails_the_async_clients_requests(fake_daemon: Any) -> None:
    address = fake_daemon(int_key_header)

    async def ask() -> None:
        async with AsyncClient(address, timeout=2) as client:
            await client.status()

    with pytest.raises(Internal, match="is not a valid protocol header"):  # before: dropped, DEADLINE_EXCEEDED at the timeout
        asyncio.run(ask())
