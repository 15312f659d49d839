"""Secrets the daemon proves itself with, attacked by another local user.

- The CURVE server's secret key file was read whatever its mode: a key left 0644 (a copy with the
  default umask, a config tool's default) let any local user pose as the daemon to every tcp:// client.
  ssh refuses such a private key; the daemon now refuses to start with it, naming the file and the fix.
- `metrics.listen` had no authentication: any local uid read every model's and every client's figures
  (client labels, uids) from a loopback port, and spent the scrapes the rate allows. `metrics.token_file`
  makes every scrape send a bearer token (401 without it, before any render), the file private too.

Before the fix: the 0644 key served, the token setting did not exist, and uid 65534's scrape got 200.
"""
from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from curve_setup import server_keys
from daemon_harness import world_readable_dir
from exposition import LoopStandIn, free_port, parse, value
from openinfer.daemon.config.settings import MetricsSettings
from openinfer.daemon.files.secret_file import read_secret_file
from openinfer.daemon.frontdoor.curve import load_server_keys
from openinfer.daemon.modelstore.modelconfig import ConfigError
from openinfer.daemon.observability.accounting import Accountant
from openinfer.daemon.observability.metrics import MetricsExporter
from openinfer.daemon.observability.metrics_http import SCRAPES_BURST
from other_uid import NOBODY, run_as

pytestmark = pytest.mark.attack

TOKEN = "s3cret-scrape-token-0123456789abcdef"

# A scrape from another uid (raw HTTP: after the drop to its uid nothing more can be imported): the
# reply's status line and headers, then the body's start.
SCRAPE_AS = """
port, authorization = int(sys.argv[1]), sys.argv[2]
with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /metrics HTTP/1.0\\r\\n" + (f"Authorization: {authorization}\\r\\n".encode() if authorization else b"") + b"\\r\\n")
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
print(json.dumps(reply[:600].decode("latin-1")))
"""


def _private(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def token_exporter(tmp_path: Path) -> Iterator[MetricsExporter]:
    token_file = _private(tmp_path / "metrics.token", TOKEN + "\n", 0o600)
    exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0", token_file=str(token_file)))
    yield exporter
    exporter.close()


@pytest.mark.parametrize("mode, problem", [(0o644, "open to other users (mode 0644)"), (0o604, "open to other users (mode 0604)"), (0o620, "writable by its group (mode 0620)")])
def test_a_secret_file_others_can_read_or_change_is_refused_naming_the_fix(tmp_path: Path, mode: int, problem: str) -> None:
    secret = _private(tmp_path / "secret", TOKEN, mode)
    with pytest.raises(ConfigError) as info:
        read_secret_file(secret, "metrics.token_file")
    assert f"the metrics.token_file {secret} is {problem}: chmod 600 it" in str(info.value)


def test_a_secret_file_of_another_user_or_not_a_file_is_refused(tmp_path: Path) -> None:
    theirs = _private(tmp_path / "theirs", TOKEN, 0o600)
    os.chown(theirs, NOBODY, NOBODY)  # uid 65534 could rewrite the token (or the key) at will
    with pytest.raises(ConfigError, match=r"is owned by uid 65534, which could change it"):
        read_secret_file(theirs, "metrics.token_file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # (opened without blocking: a start must not hang on it)
    with pytest.raises(ConfigError, match=r"is not a regular file"):
        read_secret_file(fifo, "metrics.token_file")


def test_a_secret_file_with_an_acl_or_a_foreign_readable_group_is_refused(tmp_path: Path) -> None:
    """Attacker round 8: the mode bits were all that was looked at. An access ACL granting uid 65534
    read (the file showing 0640) and a root:65534 0640 file (the daemon not in group 65534) were both
    accepted, and uid 65534 read the secret."""
    acl = _private(tmp_path / "acl", TOKEN, 0o640)
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, NOBODY), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]  # user::rw- user:65534:r-- group::r-- mask::r-- other::---
    os.setxattr(acl, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries))
    with pytest.raises(ConfigError, match=r"has an access ACL, which may grant what its mode does not show"):
        read_secret_file(acl, "metrics.token_file")
    foreign = _private(tmp_path / "foreign", TOKEN, 0o640)
    os.chown(foreign, 0, NOBODY)
    with pytest.raises(ConfigError, match=rf"is readable by group {NOBODY}, which is not the daemon's"):
        read_secret_file(foreign, "metrics.token_file")


def test_a_public_key_file_that_is_a_fifo_does_not_block_the_start(tmp_path: Path) -> None:
    """The CURVE .pub was read with read_bytes(): a FIFO there blocked load_server_keys for good (attacker
    round 8: still blocked after 10 s), /dev/zero would have read until memory ran out."""
    key_file, _ = server_keys(tmp_path)
    public = Path(f"{key_file}.pub")
    public.unlink()
    os.mkfifo(public)
    with pytest.raises(ConfigError, match=r"CURVE public key file .* is not a regular file"):
        load_server_keys(str(key_file))


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_a_private_secret_file_is_read(tmp_path: Path, mode: int) -> None:
    assert read_secret_file(_private(tmp_path / "secret", TOKEN, mode), "metrics.token_file") == TOKEN.encode()


def test_another_uid_cannot_scrape_without_the_token(token_exporter: MetricsExporter) -> None:
    port = str(token_exporter.port)
    with LoopStandIn(token_exporter, Accountant().snapshot) as loop:
        for authorization in ("", "Bearer wrong-token-0123456789", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer{TOKEN}", f"Bearer {TOKEN}\r\nAuthorization: Bearer x"):
            reply = _scrape_as(NOBODY, port, authorization)
            assert reply.startswith("HTTP/1.0 401 ") and 'WWW-Authenticate: Bearer realm="openinfer metrics"' in reply, (authorization, reply)
            assert "openinfer_" not in reply
        assert loop.published == 0
        for scheme in ("Bearer", "bearer", "BEARER"):  # (the scheme in any case: RFC 7235; whoever holds the token, any uid)
            reply = _scrape_as(NOBODY, port, f"{scheme} {TOKEN}")
            assert reply.startswith("HTTP/1.0 200 ") and "openinfer_up" in reply, reply


def _scrape_as(uid: int, port: str, authorization: str) -> str:
    done = run_as(uid, SCRAPE_AS, port, authorization)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_unauthorized_scrapes_spend_neither_renders_nor_the_rate(token_exporter: MetricsExporter) -> None:
    """A flood without the token is answered 401 before the rate is consulted: the scraper that holds
    the token still gets a fresh render after it (not the last text again, nor a 429)."""
    port = token_exporter.port
    assert port is not None
    with LoopStandIn(token_exporter, Accountant().snapshot) as loop:
        for _ in range(3 * SCRAPES_BURST):
            assert _raw_scrape(port, None).startswith(b"HTTP/1.0 401 ")
        assert loop.published == 0, "an unauthorized scrape made the loop build a snapshot"
        before = time.monotonic()
        body = _raw_scrape(port, TOKEN)
        assert body.startswith(b"HTTP/1.0 200 "), body[:200]
        assert loop.published == 1 and value(parse(body.split(b"\r\n\r\n", 1)[1]), "openinfer_up", "openinfer_up") == 1.0
        assert time.monotonic() - before < 10


def _raw_scrape(port: int, token: str | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n" + (f"Authorization: Bearer {token}\r\n".encode() if token else b"") + b"\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("token", ["short", "has a space in it, 0123456789", "é" * 20])
def test_a_token_that_is_not_one_is_refused(tmp_path: Path, token: str) -> None:
    token_file = _private(tmp_path / "metrics.token", token, 0o600)
    with pytest.raises(ConfigError, match=r"must hold one token of 16 to 4096 visible ASCII characters"):
        MetricsExporter(MetricsSettings(listen="127.0.0.1:0", token_file=str(token_file)))


def _serve(tmp_path: Path, socket_address: str, env: dict[str, str], launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    (tmp_path / "repo").mkdir(exist_ok=True)
    return subprocess.run([*launcher, sys.executable, "-m", "openinfer.daemon.cli", "serve", "--models", "repo", "--socket", socket_address],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OPENINFER_SERVER_RUNTIME_DIR": str(tmp_path / "run"), **env})


def test_the_daemon_will_not_serve_curve_with_a_secret_key_others_can_read(tmp_path: Path) -> None:
    keys = world_readable_dir("oi-curve-key-")
    key_file, _ = server_keys(keys)
    os.chmod(key_file, 0o644)  # what a copy with the default umask leaves
    done = _serve(tmp_path, f"tcp://127.0.0.1:{free_port()}", {"OPENINFER_SERVER_CURVE_SECRET_KEY_FILE": str(key_file)})
    assert done.returncode == 1 and '"msg":"cannot start"' in done.stderr, f"the daemon served with a world-readable CURVE secret key: exit {done.returncode}\n{done.stderr[-2000:]}"
    assert f"the CURVE secret key file {key_file} is open to other users (mode 0644): chmod 600 it" in done.stderr, done.stderr[-2000:]


def test_the_daemon_will_not_serve_metrics_with_a_token_others_can_read(tmp_path: Path) -> None:
    token_file = _private(tmp_path / "metrics.token", TOKEN, 0o644)
    done = _serve(tmp_path, f"ipc://{tmp_path}/oi.sock",
                  {"OPENINFER_METRICS_LISTEN": f"127.0.0.1:{free_port()}", "OPENINFER_METRICS_TOKEN_FILE": str(token_file)})
    assert done.returncode == 1 and '"msg":"cannot start"' in done.stderr, done.stderr[-2000:]
    assert f"the metrics.token_file {token_file} is open to other users (mode 0644)" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "oi.sock").exists()


def test_the_daemon_will_not_serve_metrics_with_a_token_its_socket_group_may_read(tmp_path: Path) -> None:
    """Attacker round 29: the check above looked at the daemon's own group only. A daemon in the clients'
    group as a supplementary one (server.socket_group: a non-root daemon must be in it to give its socket
    that group) accepted a token root:<that group> 0640, and a client of that group read it and scraped.
    Here root is put in group 65534 (setpriv --groups), the socket given it: the start is refused."""
    token_file = _private(tmp_path / "metrics.token", TOKEN, 0o640)
    os.chown(token_file, 0, NOBODY)
    group = grp.getgrgid(NOBODY).gr_name
    done = _serve(tmp_path, f"ipc://{tmp_path}/oi.sock",
                  {"OPENINFER_METRICS_LISTEN": f"127.0.0.1:{free_port()}", "OPENINFER_METRICS_TOKEN_FILE": str(token_file), "OPENINFER_SERVER_SOCKET_GROUP": group},
                  launcher=("setpriv", f"--groups={NOBODY}", "--"))
    assert done.returncode == 1 and '"msg":"cannot start"' in done.stderr, done.stderr[-2000:]
    assert f"is readable by group {NOBODY}, the group the daemon's socket gives to its clients (server.socket_group)" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "oi.sock").exists()


def test_a_secret_its_daemons_own_group_may_read_is_refused(tmp_path: Path) -> None:
    """Attacker round 28: the daemon's own group is the one its socket and runtime directory carry, its
    clients' (the shipped unit: Group=openinfer-clients). A token root:<that group> 0640 - what the old
    hint "chgrp it to the daemon's group" led to - was accepted, and every client could read it. Here a
    daemon-side process running with that egid (65534 standing in for the clients' group) checks it."""
    secret = _private(tmp_path / "token", TOKEN, 0o640)
    os.chown(secret, 0, NOBODY)
    code = (
        "import os, sys\n"
        "from openinfer.daemon.files.secret_file import read_secret_file\n"
        "from openinfer.daemon.modelstore.modelconfig import ConfigError\n"
        f"os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, {NOBODY})\n"
        "try:\n"
        "    read_secret_file(sys.argv[1], 'metrics.token_file')\n"
        "    print('read')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(secret)], capture_output=True, text=True, timeout=60)
    assert "the daemon's own group, which its socket and runtime directory give to its clients" in done.stdout, done.stdout + done.stderr


def test_keygen_writes_neither_through_a_planted_symlink_nor_into_another_users_file(tmp_path: Path) -> None:
    """Attacker round 28: `openinfer keygen PATH` wrote PATH.pub with write_text. Uid 65534, in a directory
    it may write to, planted PATH.pub as a symlink to a root-only file (overwritten with the public key),
    or as its own file (kept, 0666: the public key clients are given stayed theirs to change). Both
    files are now new ones or nothing is written, with an error naming the file."""
    shared = world_readable_dir("oi-keygen-") / "shared"  # (tmp_path is not reachable by uid 65534)
    shared.mkdir()
    shared.chmod(0o1777)
    victim = _private(tmp_path / "root-only", "root-only file, must not change\n", 0o600)
    try:
        _keygen_in(shared, victim)
    finally:
        shutil.rmtree(shared.parent, ignore_errors=True)


def _keygen_in(shared: Path, victim: Path) -> None:
    planted = run_as(NOBODY, "import sys\nos.symlink(sys.argv[1], sys.argv[2])\nopen(sys.argv[3], 'w').close()\n", str(victim), str(shared / "a.key.pub"), str(shared / "b.key.pub"))
    assert planted.returncode == 0, planted.stderr
    for key in ("a.key", "b.key"):
        done = subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", "keygen", str(shared / key)], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and f"{shared / key}.pub already exists" in done.stderr, done.stdout + done.stderr
        assert not (shared / key).exists()  # no secret key left without its public one
    assert victim.read_text() == "root-only file, must not change\n"
    assert (shared / "b.key.pub").stat().st_uid == NOBODY and (shared / "b.key.pub").read_bytes() == b""
    done = subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", "keygen", str(shared / "c.key")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (shared / "c.key").stat().st_mode & 0o777 == 0o600 and len((shared / "c.key.pub").read_text().strip()) == 40


def test_a_textfile_beside_a_token_is_named_in_the_log_as_readable_by_every_user(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attacker round 28 (low): with metrics.token_file set, the textfile (0644, for node_exporter) still
    gave any local user every client label and uid the token keeps from the HTTP endpoint. It must be
    0644 for node_exporter to read it; the operator is told, at start, where that leaves the token."""
    token_file = _private(tmp_path / "metrics.token", TOKEN + "\n", 0o600)
    with caplog.at_level("WARNING", logger="openinfer.supervisor"):
        exporter = MetricsExporter(MetricsSettings(listen="127.0.0.1:0", token_file=str(token_file), textfile=str(tmp_path / "openinfer.prom")))
        exporter.close()
    assert any("metrics.textfile is readable by every local user" in record.getMessage() for record in caplog.records), caplog.text
