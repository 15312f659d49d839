"""Whose request crashed a worker, and the clients whose requests keep doing it.

A worker that dies by its own hand (an abort, a segfault, a forbidden system call) while it runs the
requests of one client only was, as far as anyone can tell, crashed by that client's input: onnxruntime
aborts the process on some inputs some models cannot take (attacker round 79: silero_vad on a tensor of no
elements). Counted toward the model's crash loop, five such requests from any client granted the model
made it UNAVAILABLE for everyone; with an honest client's answers between them resetting the count, they
had its workers killed and booted again for as long as the attacker liked (53 in 40 s).

Such a crash is the client's strike instead: it does not count toward the crash loop, and a client with
pool.crash_strikes of them within WINDOW_NS is refused that model (RESOURCE_EXHAUSTED, with when to come
back) until its oldest strike in the window is older than the window. A crash no single client can be held
to (a batch of several clients' requests, an idle worker, a SIGKILL from outside) counts toward the crash
loop as before.

Whose requests a worker was running is, for a direct run, what its deadline page says (the run's own
clients, not those waiting behind it: round 80 queued another uid's requests behind a long run of its own,
and its crash was no one's; the page is the worker's word, and a hostile model's steps can only have a
client refused by that model itself), else the front door's running unit (the supervisor's own books). A
run of several clients' requests that crashed its worker has those clients' requests batched only with
their own for the window, on both paths (direct/batch_apart.py), so that the next crash is someone's (round
81: a poison batched with another uid's requests on the direct path was no one's strike, 16 crashes of 19;
round 83: on the front door, where a crashed batch's members run again alone to find the poison, a poison
whose deadline passed before its turn never ran alone - 40 crashes, no strike).

Strikes are off while the workers' uid is shared with other processes (`sandbox.worker_user = "nobody"` as
root): a death by a signal does not say who sent it, and any process of that uid could send a worker
SIGABRT while another uid's request runs and have that client refused (round 82).
"""
from __future__ import annotations

import ipaddress
import signal
import socket
import time
from collections.abc import Set as AbstractSet

from openinfer.daemon.frontdoor.handshakes import LOOPBACK, source_host

WINDOW_NS = 600 * 1_000_000_000
MAX_KEPT = 4096  # (model, identity) pairs remembered; the oldest go first (bounded by what crashed a worker)

# How a worker ends itself: an abort (a C++ exception nobody caught, an assertion), a fault, a system
# call its seccomp policy forbids, a CPU or file-size limit. A SIGKILL or SIGTERM comes from outside (the
# operator, the memory rule, the kernel's OOM killer): nobody's request is blamed for it.
SELF_INFLICTED = frozenset(-int(sig) for sig in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGSYS, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGTRAP))


def ended_itself(exit_status: int | None) -> bool:
    return exit_status is not None and (exit_status in SELF_INFLICTED or exit_status > 0)  # (an exit code: it ended itself too)


def blamed(exit_status: int | None, identities: AbstractSet[str]) -> str | None:
    """The one client a worker's exit is held against, or None."""
    if len(identities) != 1 or not ended_itself(exit_status):
        return None
    return next(iter(identities))


def striker(identity: str) -> str:
    """Whom a strike is counted to: the identity, but a plain tcp:// peer's (`tcp=<host>:<port>`, one per
    connection) by its source as handshakes count it (one IPv4 address, one IPv6 /64, every loopback
    address as one), and every address of this host as loopback - a client reconnecting for each crash
    stayed clear of strikes (round 80, low), one binding another of 127/8's addresses each time did too
    (round 81, low), and one connecting from each of the host's own addresses took three strikes per
    address (round 84, low; `--insecure-tcp` only)."""
    if not identity.startswith("tcp="):
        return identity
    host = identity[4:].rpartition(":")[0].strip("[]")
    return "tcp=" + (LOOPBACK if _of_this_host(host) else source_host(host))


_HOST_ADDRESSES_TTL_NS = 30 * 1_000_000_000  # how long one reading of the host's addresses is used (DHCP, SLAAC change them)
_host_addresses: tuple[int, frozenset[str]] = (0, frozenset())


def _of_this_host(host: str) -> bool:
    """Whether `host` is an address of one of this host's interfaces (psutil, read again every 30 s)."""
    global _host_addresses
    now = time.monotonic_ns()
    read_ns, addresses = _host_addresses
    if not read_ns or now - read_ns >= _HOST_ADDRESSES_TTL_NS:
        import psutil  # (the supervisor only: a worker's identities are all uid=N)

        found = set()
        for entries in psutil.net_if_addrs().values():
            for entry in entries:
                if entry.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(_canonical(entry.address.split("%", 1)[0]))
        addresses = frozenset(found)
        _host_addresses = (now, addresses)
    return _canonical(host.split("%", 1)[0]) in addresses


def _canonical(address: str) -> str:
    """An address in one spelling (an IPv4 peer of a dual-stack listener, ::ffff:a.b.c.d, as a.b.c.d)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class CrashStrikes:
    def __init__(self) -> None:
        self._times: dict[tuple[str, str], list[int]] = {}  # (model name, identity): every version of a model counts together (round 87) -> its crash times, oldest first

    def __bool__(self) -> bool:
        return bool(self._times)

    def strike(self, model_key: str, identity: str, now_ns: int, limit: int) -> bool:
        """Count a crash; True when it is the one that bars the client (its `limit`-th in the window)."""
        key = (model_key, striker(identity))
        times = [t for t in self._times.pop(key, []) if now_ns - t < WINDOW_NS]
        times.append(now_ns)
        self._times[key] = times[-limit:]  # (re-inserted: the most recent last)
        if len(self._times) > MAX_KEPT:
            del self._times[self._to_forget(key, now_ns, limit)]
        return len(times) == limit

    def _to_forget(self, added: tuple[str, str], now_ns: int, limit: int) -> tuple[str, str]:
        """Which pair makes room for `added`: the oldest when its strikes are all out of the window, else
        the model's own oldest short of a refusal, else anyone's oldest short of one, else the oldest - not
        simply the oldest: a hostile model naming a new uid on its page for every crash would push other
        models' strikes and refusals out (round 86's suspicion). Pairs are kept in the order of their last
        strike: none is out of the window if the oldest is not."""
        oldest = next(held for held in self._times if held != added)
        if now_ns - self._times[oldest][-1] >= WINDOW_NS:
            return oldest
        anyones = None
        for held, times in self._times.items():
            if held != added and len(times) < limit:
                if held[0] == added[0]:
                    return held
                if anyones is None:
                    anyones = held
        return anyones or oldest

    def barred_for_ns(self, model_key: str, identity: str, now_ns: int, limit: int) -> int:
        """How much longer the client is refused the model (0: it is not)."""
        times = self._times.get((model_key, striker(identity)))
        if limit <= 0 or times is None or len(times) < limit:
            return 0
        return max(0, times[-limit] + WINDOW_NS - now_ns)
