"""Whose request a worker's exit is held against (daemon/workerpool/crash_blame.py), and the strikes' window."""
from __future__ import annotations

import signal
import socket

import psutil
import pytest

from openinfer.daemon.workerpool.crash_blame import MAX_KEPT, WINDOW_NS, CrashStrikes, blamed

pytestmark = pytest.mark.unit


def test_only_a_worker_that_ended_itself_running_one_clients_requests_is_held_against_that_client() -> None:
    assert blamed(-signal.SIGABRT, {"uid=1000"}) == "uid=1000"
    assert blamed(-signal.SIGSEGV, {"uid=1000"}) == "uid=1000"
    assert blamed(-signal.SIGSYS, {"uid=1000"}) == "uid=1000"  # a forbidden system call
    assert blamed(1, {"uid=1000"}) == "uid=1000"  # an exit code: it ended itself
    assert blamed(-signal.SIGKILL, {"uid=1000"}) is None  # from outside: the operator, the OOM killer
    assert blamed(-signal.SIGTERM, {"uid=1000"}) is None
    assert blamed(0, {"uid=1000"}) is None
    assert blamed(-signal.SIGABRT, {"uid=1000", "uid=1001"}) is None  # a batch of two clients: neither
    assert blamed(-signal.SIGABRT, set()) is None  # idle
    assert blamed(None, {"uid=1000"}) is None


def test_a_client_is_refused_at_its_limit_of_strikes_within_the_window_and_only_until_the_first_is_past_it() -> None:
    strikes = CrashStrikes()
    assert not strikes
    t0 = 10**12
    assert strikes.strike("m:1", "uid=5", t0, 3) is False
    assert strikes.strike("m:1", "uid=5", t0 + 10, 3) is False
    assert strikes.barred_for_ns("m:1", "uid=5", t0 + 20, 3) == 0
    assert strikes.strike("m:1", "uid=5", t0 + 20, 3) is True
    assert strikes.barred_for_ns("m:1", "uid=5", t0 + 20, 3) == WINDOW_NS - 20
    assert strikes.barred_for_ns("m:1", "uid=6", t0 + 20, 3) == 0  # another client
    assert strikes.barred_for_ns("m:2", "uid=5", t0 + 20, 3) == 0  # another model
    assert strikes.barred_for_ns("m:1", "uid=5", t0 + 20, 0) == 0  # strikes off
    assert strikes.barred_for_ns("m:1", "uid=5", t0 + WINDOW_NS, 3) == 0  # the first strike is ten minutes old


def test_strikes_older_than_the_window_do_not_count() -> None:
    strikes = CrashStrikes()
    t0 = 10**12
    strikes.strike("m:1", "uid=5", t0, 3)
    strikes.strike("m:1", "uid=5", t0 + 1, 3)
    assert strikes.strike("m:1", "uid=5", t0 + WINDOW_NS, 3) is False  # the first is out of the window: two, not three


def test_a_plain_tcp_peer_is_struck_by_its_host_not_by_its_connection() -> None:
    """Round 80 (low): `tcp=<host>:<port>` is one identity per connection; reconnecting for each crash kept a
    plain tcp:// client (--insecure-tcp) clear of strikes."""
    strikes = CrashStrikes()
    for port in (40001, 40002, 40003):
        strikes.strike("m:1", f"tcp=10.0.0.7:{port}", 10**12, 3)
    assert strikes.barred_for_ns("m:1", "tcp=10.0.0.7:40004", 10**12, 3) > 0
    assert strikes.barred_for_ns("m:1", "tcp=10.0.0.8:40001", 10**12, 3) == 0


def test_a_local_tcp_peer_is_one_striker_whichever_loopback_address_it_binds() -> None:
    """Round 81 (low): strikes by host were evaded from 127.0.0.0/8's 16M addresses, binding another one
    for each crash. Loopback is one source, as handshakes count it; an IPv6 host by its /64."""
    strikes = CrashStrikes()
    for n, address in enumerate(["127.0.0.1", "127.0.0.2", "127.9.8.7"]):
        strikes.strike("m:1", f"tcp={address}:{40000 + n}", 10**12, 3)
    assert strikes.barred_for_ns("m:1", "tcp=::1:40009", 10**12, 3) > 0
    for n in range(3):
        strikes.strike("m:1", f"tcp=2001:db8::{n + 1}:4000{n}", 10**12, 3)
    assert strikes.barred_for_ns("m:1", "tcp=2001:db8::ff:40009", 10**12, 3) > 0
    assert strikes.barred_for_ns("m:1", "tcp=2001:db8:0:1::1:40009", 10**12, 3) == 0  # another /64


def test_a_local_tcp_peer_is_one_striker_whichever_of_this_hosts_addresses_it_connects_from() -> None:
    """Round 84 (low): loopback was one striker, but each other address of this host's interfaces was a
    host of its own: a local client connecting from 127.0.0.1 and then from the host's LAN address took
    six crashes, refused twice. Every address of this host is loopback's striker (crash_blame.striker)."""
    own = sorted({entry.address.split("%", 1)[0] for entries in psutil.net_if_addrs().values() for entry in entries if entry.family in (socket.AF_INET, socket.AF_INET6)} - {"127.0.0.1", "::1"})
    if not own:
        pytest.skip("this host has no address but loopback")
    strikes = CrashStrikes()
    strikes.strike("m:1", "tcp=127.0.0.1:40001", 10**12, 3)
    for n, address in enumerate(own[:2]):
        strikes.strike("m:1", f"tcp={address}:{40002 + n}", 10**12, 3)
    if len(own) == 1:
        strikes.strike("m:1", "tcp=::1:40009", 10**12, 3)
    assert strikes.barred_for_ns("m:1", f"tcp={own[0]}:50000", 10**12, 3) > 0, own


def test_a_model_striking_new_identities_pushes_out_its_own_strikes_not_another_models() -> None:
    """Round 86 (a suspicion): the table of strikes is bounded (MAX_KEPT) and shared by every model; a hostile
    model naming a new uid on its page for each crash would have pushed the oldest out - another model's
    strikes and refusals. A model's new strike pushes out its own oldest."""
    strikes = CrashStrikes()
    for n in range(3):
        strikes.strike("honest:1", "uid=1000", 10**12 + n, 3)  # uid 1000 refused the honest model
    for n in range(MAX_KEPT - 1):
        strikes.strike("honest:1", f"uid={2000 + n}", 10**12 + 10 + n, 3)
    for n in range(MAX_KEPT + 100):
        strikes.strike("hostile:1", f"uid={100_000 + n}", 10**12 + 10**6 + n, 3)
    assert strikes.barred_for_ns("honest:1", "uid=1000", 10**12 + 2 * 10**6, 3) > 0
