"""The HTTP endpoint of `metrics.listen`: Prometheus scrapes, with bounds on what a scraper may cost.

prometheus_client's own `start_http_server` gives every connection a thread of its own, with no cap and
no read timeout. The endpoint has no authentication (any local user reaches a loopback port), so an
attacker round found that 1,053 idle connections of uid 65534 took the supervisor's descriptors until
a /proc read in its loop failed with EMFILE and the daemon exited, and that under the unit's TasksMax
they took every thread, so replacement workers could not start and the model crash-looped to
UNAVAILABLE. A flood of scrapes (455 in 10 s) made the loop build snapshots and the render threads hold
the GIL until front-door p50 went from 1.7 ms to 29 ms. Here:
  - at most MAX_CONNECTIONS are served at once; one more is accepted and closed at once;
  - each has SOCKET_TIMEOUT_S for every read and write, and CONNECTION_DEADLINE_S for all of it: an
    idle peer, or one that trickles a byte every few seconds, is cut (its socket shut down);
  - scrapes are rendered one at a time, and a token bucket grants SCRAPES_BURST at once and
    SCRAPES_PER_S after that; a scrape over the rate gets the last rendered text again (at most
    1 / SCRAPES_PER_S old), which costs neither the loop nor a render, and 429 if there is none yet.
Prometheus scrapes a target every 15 s or so, a handful of servers at most: none of this touches it.
With `metrics.token_file`, a scrape must send that token (`Authorization: Bearer TOKEN`, compared in
constant time) or get 401, before it takes a render or the rate's budget: without it, any local user
reads every model's and every client's figures (client labels, uids) and spends the scrapes the rate
allows. What no rule here can give is availability against a local user who holds the 8 connections
(before a request's headers arrive nothing tells who sent it), and a flood of scrapes answered 401 still
costs the supervisor's interpreter a little (front-door p50 0.57 -> 1.35 ms, measured). It cannot stop the
serving path; for monitoring that must not be denied, use metrics.textfile (docs/DEPLOY.md).
"""
from __future__ import annotations

import logging
import re
import socket
import threading
import time
from hmac import compare_digest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from openinfer.daemon.files.secret_file import read_secret_file
from openinfer.daemon.modelstore.modelconfig import ConfigError

log = logging.getLogger("openinfer.metrics")

MAX_CONNECTIONS = 8  # scrapes served at once (each holds a thread and a descriptor)
SOCKET_TIMEOUT_S = 5.0  # for each read and write of a connection
CONNECTION_DEADLINE_S = 10.0  # for the whole of a connection: its request, the render, the reply
SCRAPES_BURST = 10  # scrapes rendered back to back before the rate applies
SCRAPES_PER_S = 2.0  # sustained: a scrape costs the loop a snapshot and a render thread the GIL
PATHS = ("/metrics", "/")
REFUSALS_LOGGED_EVERY_S = 10.0
_TOKEN = re.compile(rb"[\x21-\x7e]{16,4096}")  # visible ASCII: what an HTTP header carries as it is


def scrape_token(path: str, clients_gid: int | None = None) -> bytes:
    """The token in `metrics.token_file` (one line; surrounding whitespace dropped), from a private file
    (`clients_gid`: the group the daemon's socket gives its clients, which may not read it)."""
    token = read_secret_file(path, "metrics.token_file", clients_gid).strip()
    if not _TOKEN.fullmatch(token):
        raise ConfigError(f"metrics.token_file {path}: must hold one token of 16 to 4096 visible ASCII characters (no spaces), e.g. `(umask 077; head -c 32 /dev/urandom | base64 > {path})`")
    return token


class ScrapeRate:
    """A token bucket: `take()` is True when a scrape may be rendered now."""

    def __init__(self, burst: int = SCRAPES_BURST, per_s: float = SCRAPES_PER_S) -> None:
        self._burst = float(burst)
        self._per_s = per_s
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


class MetricsHTTPServer(ThreadingHTTPServer):
    """Serves `render()` (the exposition's bytes) at PATHS, within the bounds in the module docstring."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog (socketserver's 5 made a burst of connects wait out SYN retries)

    def __init__(self, host: str, port: int, render: Callable[[], bytes], token: bytes | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.render = render
        self.token = token  # what a scrape must send (Authorization: Bearer TOKEN), or None: no authentication
        self.rate = ScrapeRate()
        self.render_lock = threading.Lock()  # one render at a time
        self.refused = {"connections": 0, "rate": 0, "deadline": 0, "unauthorized": 0, "ended": 0}
        self.last_body: bytes | None = None  # the last text rendered, served again over the rate
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: dict[Any, float] = {}  # connection -> when it must be done (time.monotonic())
        self._open_lock = threading.Lock()
        self._refusals_logged_at = 0.0
        super().__init__((host, port), ScrapeHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a slot, or refuse (socketserver then closes the connection)."""
        if self._slots.acquire(blocking=False):
            return True
        self.note_refusal("connections", "all metrics connections are busy")
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open[request] = time.monotonic() + CONNECTION_DEADLINE_S
        try:
            super().process_request(request, client_address)  # a thread per connection, which frees the slot
        except BaseException:  # no thread could start: the slot must not leak with it
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        self._slots.release()

    def service_actions(self) -> None:
        """serve_forever calls this between polls (every 0.5 s at most): a connection past its deadline is
        shut down, which ends its handler's read or write at once (a peer sending a byte every 4 s never
        met the per-read timeout and held its slot for good)."""
        now = time.monotonic()
        with self._open_lock:
            late = [request for request, deadline in self._open.items() if deadline <= now]
            for request in late:
                del self._open[request]
        for request in late:
            self.note_refusal("deadline", f"a connection still open after {CONNECTION_DEADLINE_S:g} s")
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (a timeout, a reset): no traceback on stderr; counted with the refusals,
        logged as they are, once an interval (round 68: a line each - a local user resetting connections
        wrote 120 KB of log a second)."""
        self.note_refusal("ended", f"a connection from {client_address[0] if client_address else '?'} ended in an error or a timeout")

    def note_refusal(self, kind: str, reason: str) -> None:
        self.refused[kind] += 1
        now = time.monotonic()
        if now - self._refusals_logged_at >= REFUSALS_LOGGED_EVERY_S:  # a flood logs a line per interval, not per refusal
            self._refusals_logged_at = now
            log.warning("metrics scrape refused", extra={"reason": reason, "refused": dict(self.refused)})


class ScrapeHandler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    timeout = SOCKET_TIMEOUT_S  # StreamRequestHandler sets it on the socket: every read and write
    protocol_version = "HTTP/1.0"  # one request per connection: a slot is never held between scrapes

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in PATHS:
            self._answer(404, b"not found: scrape /metrics\n", "text/plain; charset=utf-8")
            return
        server = self.server
        if server.token is not None and not self._authorized(server.token):
            server.note_refusal("unauthorized", "a scrape without the token of metrics.token_file")
            self._answer(401, b"unauthorized: send the token of metrics.token_file (Authorization: Bearer TOKEN)\n", "text/plain; charset=utf-8", {"WWW-Authenticate": 'Bearer realm="openinfer metrics"'})
            return
        if not server.rate.take():
            server.note_refusal("rate", f"more than {SCRAPES_PER_S:g} scrapes a second (after a burst of {SCRAPES_BURST}): the last text rendered is served again")
            again = server.last_body
            if again is None:
                self._answer(429, b"too many scrapes: retry in a second\n", "text/plain; charset=utf-8", {"Retry-After": "1"})
            else:
                self._answer(200, again, CONTENT_TYPE_PLAIN_0_0_4)
            return
        with server.render_lock:
            body = server.last_body = server.render()
        self._answer(200, body, CONTENT_TYPE_PLAIN_0_0_4)

    def _authorized(self, token: bytes) -> bool:
        """`Authorization: Bearer TOKEN`, the scheme in any case (RFC 7235), the token compared in constant
        time. More than one Authorization header is refused: which one a proxy checked cannot be known."""
        values = self.headers.get_all("Authorization") or []
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].strip().partition(" ")
        return scheme.lower() == "bearer" and compare_digest(credentials.strip().encode("latin-1", "replace"), token)

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr (the daemon's log is JSON; a scrape every 15 s is not news)."""


def serve_metrics(host: str, port: int, render: Callable[[], bytes], token: bytes | None = None) -> tuple[MetricsHTTPServer, threading.Thread]:
    """Bind and serve on a thread of its own; the caller shuts it down (server.shutdown, server_close).
    With `token`, only scrapes that send it are answered (401 otherwise)."""
    server = MetricsHTTPServer(host, port, render, token)
    thread = threading.Thread(target=server.serve_forever, name="openinfer-metrics-http", daemon=True)
    thread.start()
    return server, thread
