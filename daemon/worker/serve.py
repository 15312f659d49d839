"""The worker's serving loop: one thread, one epoll, a closed set of operations.

From the supervisor, on the channel (messages.py): TASK and BATCH (run at once and answered), PING,
KEY (a new lease key after a reload), QUIT. From clients holding a
lease, on the worker's own endpoint (direct.py, direct_queue.py): attach, infer, cancel. Nothing else is
executed.

Wake-ups are expensive on this kind of VM (~50-80 us for an idle process to be scheduled again): while
requests keep arriving, the loop looks again for `spin_us` before it sleeps, so a request that follows
its predecessor closely is taken without a wake-up. An idle worker sleeps.
"""
from __future__ import annotations

import logging
import select
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from openinfer.daemon.direct.batch_apart import BatchApart
from openinfer.wire.errors import ResourceExhausted
from openinfer.wire.zmtp import FrameStream, Oversized, PeerClosed

from . import messages
from .channel_tasks import run_batch, run_task
from .direct import DirectDoor
from .direct_queue import DirectQueue
from .run_watch import RunWatch
from .session import Runner
from .verdict_cache import VerdictCache

log = logging.getLogger("openinfer.worker")

_READABLE, _WRITABLE = select.EPOLLIN, select.EPOLLOUT
HOUSEKEEPING_NS = 100_000_000  # the door's handshake deadlines and strikes, this often
DRAIN_GRACE_NS = 4_000_000_000  # after QUIT: how long clients told GOAWAY may still send (the supervisor kills at 5 s)
RECENT_NS = 2_000_000  # spin only while the last request is this recent
PRECISE_S = 0.002  # epoll sleeps in whole milliseconds: a held batch due sooner than this is waited for by looking


@dataclass
class DirectServing:
    """The direct path's parts, when this worker has an endpoint (ipc:// front doors only)."""

    door: DirectDoor
    queue: DirectQueue
    spin_us: int


class WorkerLoop:
    def __init__(self, channel: FrameStream, runner: Runner, output_names: list[str], poller: Any, direct: DirectServing | None, watch: RunWatch, cache: VerdictCache | None = None, pending: list[Any] | None = None) -> None:
        self.channel = channel
        self.pending = pending or []  # read with the ACK at boot (a KEY, a QUIT): handled first
        self.watch = watch  # stops the supervisor's tasks at their deadlines (channel_tasks.py)
        self.cache = cache
        self.runner = runner
        self.output_names = output_names
        self.poller = poller
        self.direct = direct
        self.channel_fd = channel.sock.fileno()
        self.quit_at_ns = 0  # QUIT received: leave once the direct clients are gone, or then
        self._watching_out = False
        self._next_housekeeping_ns = 0
        poller.register(self.channel_fd, _READABLE)

    def run(self) -> None:
        direct = self.direct
        door = direct.door if direct is not None else None
        listener_fd = door.listener.fileno() if door is not None else -1
        poll = self.poller.poll
        pending, self.pending = self.pending, []
        try:
            self._handle(pending)
        except PeerClosed:
            self._leave()
            return
        while True:
            # Before anything runs: once its drain is over, a retired worker starts no run (what is queued
            # is sent back, _leave), so it leaves right after the run it was in.
            if self.quit_at_ns and (door is None or door.idle or time.monotonic_ns() >= self.quit_at_ns):
                self._leave()
                return
            timeout = direct.queue.run_ready() if direct is not None else None
            self._watch_channel()
            self._housekeeping()  # on a clock, busy or not: under constant traffic the loop is never idle
            events = poll(0)
            turns = door.turns if door is not None else None
            if not events and timeout != 0.0 and not turns:  # 0: a pass ended with requests ready (run_ready): no wait
                if direct is not None and direct.spin_us and time.monotonic_ns() - direct.queue.last_request_ns < RECENT_NS:
                    events = self._spin(direct.spin_us)
                if not events:
                    sleep_s = self._sleep_s(timeout)
                    if timeout is not None and sleep_s < PRECISE_S:
                        events = self._spin(int(sleep_s * 1_000_000))
                    else:
                        events = poll(sleep_s - PRECISE_S / 2 if timeout is not None else sleep_s)
            for fd, mask in events:
                if fd == self.channel_fd:
                    self._on_channel(mask)
                elif fd == listener_fd:
                    door.on_listener()  # type: ignore[union-attr]
                elif door is not None:
                    door.on_event(fd, mask)
            if turns:
                turns.serve()  # the clients' reads and messages, in fair turns between identities, for a pass at most

    def _spin(self, spin_us: int) -> list[tuple[int, int]]:
        """Look again, without sleeping, for up to spin_us: the next request of a busy client usually
        arrives within tens of microseconds, and a wake-up from sleep costs more than that here."""
        poll = self.poller.poll
        until = time.monotonic_ns() + spin_us * 1000
        while time.monotonic_ns() < until:
            events = poll(0)
            if events:
                return events
        return []

    def _pong_report(self) -> bytes:
        """What a PONG tells (messages.py): its verdict cache's entries and bytes (openinfer status), and the
        bytes it holds for direct requests arriving, queued or running and for replies not yet read - memory
        that goes with those requests, which recycling must not take for memory the worker kept."""
        cache, direct = self.cache, self.direct
        entries, cache_bytes = (len(cache), cache.nbytes) if cache is not None else (0, 0)
        held = direct.door.held_bytes() + direct.queue.held_bytes if direct is not None else 0
        return messages.PONG_REPORT.pack(entries, cache_bytes, held)

    def _sleep_s(self, batch_due_s: float | None) -> float:
        waits = [1.0]
        if batch_due_s is not None:
            waits.append(batch_due_s)
        if self.quit_at_ns:
            waits.append(0.05)
        return max(0.0, min(waits))

    def _housekeeping(self) -> None:
        now = time.monotonic_ns()
        if self.direct is not None and now >= self._next_housekeeping_ns:
            self._next_housekeeping_ns = now + HOUSEKEEPING_NS
            self.direct.door.housekeeping(now)

    def _watch_channel(self) -> None:
        wanted = bool(self.channel.out_bytes)
        if wanted != self._watching_out:
            self._watching_out = wanted
            self.poller.modify(self.channel_fd, _READABLE | (_WRITABLE if wanted else 0))

    def _on_channel(self, mask: int) -> None:
        channel = self.channel
        try:
            if mask & _WRITABLE:
                channel.flush()
            if not mask & _READABLE:
                return
            try:
                events = channel.read()
            except MemoryError:  # no room for a task's tensors now: they stay unread (nothing is consumed) until there is
                log.warning("no memory to read the supervisor's message now; trying again")
                return
            self._handle(events)
        except PeerClosed:
            self._leave()
            raise SystemExit(0) from None  # the supervisor is gone: nothing left to serve

    def _handle(self, events: list[Any]) -> None:
        channel = self.channel
        for frames in events:
            if isinstance(frames, Oversized):  # the supervisor never sends one: nothing to answer
                log.error("oversized message from the supervisor", extra={"reason": frames.reason})
                continue
            kind = bytes(frames[0][:1])
            if kind == messages.TASK:
                self._answers_out()
                run_task(channel, self.runner, self.output_names, frames, self.watch, self.cache)
            elif kind == messages.BATCH:
                self._answers_out()
                run_batch(channel, self.runner, self.output_names, frames, self.watch)
            elif kind == messages.PING:
                channel.send([messages.PONG, bytes(frames[1]), self._pong_report()])
            elif kind == messages.KEY and self.direct is not None:
                self.direct.door.rekey(bytes(frames[1]))
            elif kind == messages.BAR and self.direct is not None:
                try:
                    identity, message, retry_after_s = msgpack.unpackb(bytes(frames[1]))
                    self.direct.queue.refuse_queued(str(identity), ResourceExhausted(str(message), {"retry_after_s": int(retry_after_s)}))
                except (ValueError, TypeError, IndexError) as exc:
                    log.error("malformed BAR message from the supervisor", extra={"reason": str(exc)})
            elif kind == messages.APART and self.direct is not None:
                try:
                    self.direct.queue.model.apart = BatchApart.decode(bytes(frames[1]))
                except (ValueError, TypeError, IndexError) as exc:
                    log.error("malformed APART message from the supervisor", extra={"reason": str(exc)})
            elif kind == messages.QUIT:
                sent_ns = int.from_bytes(bytes(frames[1][:8]), "little") if len(frames) > 1 else time.monotonic_ns()
                drain_ns = int.from_bytes(bytes(frames[2][:8]), "little") if len(frames) > 2 else DRAIN_GRACE_NS
                self._begin_quit(sent_ns, min(drain_ns, DRAIN_GRACE_NS))
            else:
                log.warning("unknown message kind from supervisor", extra={"kind": kind.hex()})

    def _answers_out(self) -> None:
        """Before a task of the supervisor's runs, every answer before it is out of this process: a task
        pipelined behind a large answer started while part of that answer still waited here, and when it
        crashed the worker the answer died with it - its task, answered, passed for the one that was
        running, and its client took the strike for the crash (attacker round 81: another uid had root
        refused a model that way). In the channel, the supervisor reads it as the worker's last words."""
        channel = self.channel
        if not channel.out_bytes:
            return
        poller = select.poll()
        poller.register(self.channel_fd, select.POLLOUT)
        while not channel.flush():
            poller.poll(100)

    def _begin_quit(self, sent_ns: int, drain_ns: int) -> None:
        """The drain counts from when the supervisor sent QUIT (read late, after a long run, it ends as
        many seconds sooner): the supervisor's grace and this drain keep one clock. A second QUIT (a hard
        stop during a drain) can only end it sooner."""
        quit_at_ns = max(1, min(sent_ns, time.monotonic_ns()) + drain_ns)  # (0 means no QUIT yet)
        if self.quit_at_ns:
            self.quit_at_ns = min(self.quit_at_ns, quit_at_ns)
            return
        self.quit_at_ns = quit_at_ns
        if self.direct is not None:
            self.direct.door.goaway("this worker is retiring: take a new lease")

    def _leave(self) -> None:
        """Send back what is still queued (its clients send it again elsewhere), send the replies, flush
        the channel, close."""
        if self.direct is not None:
            with self.direct.door.held():
                self.direct.queue.send_back_queued()
            self.direct.door.flush_all(time.monotonic() + 1)
            self.direct.door.close_all()
        poller = select.poll()
        poller.register(self.channel_fd, select.POLLOUT)
        deadline = time.monotonic() + 1
        while self.channel.out_bytes and time.monotonic() < deadline:
            poller.poll(100)
            try:
                self.channel.flush()
            except PeerClosed:
                return


def serve(channel: FrameStream, runner: Runner, output_names: list[str], poller: Any, direct: DirectServing | None, watch: RunWatch, cache: VerdictCache | None = None, pending: list[Any] | None = None) -> None:
    """Run until QUIT (and its drain) or until the supervisor is gone; `pending`: the supervisor's
    messages read with the ACK, handled before any other."""
    try:
        WorkerLoop(channel, runner, output_names, poller, direct, watch, cache, pending).run()
    except SystemExit:
        return
