"""Requests clients sent straight to this worker: admission, their queue, batching, the run, the reply.

The queue is the supervisor's own (daemon/scheduling/taskqueue.py): higher `priority` first; among
equals, identities take turns; a request that has waited `starvation_ms` goes first whatever its
priority. A request whose deadline passes while it waits is answered DEADLINE_EXCEEDED and never runs.
With `[batching]`, requests of the same shapes (but dimension 0) and outputs run as one batch, which
leaves at once when the queue holds a full batch or a preferred size, else when its oldest request has
waited `max_queue_delay_us` - the supervisor's rules (daemon/scheduling/dispatch.py) - or, sooner, when no
request has arrived for `quiet_us` (a closed loop of fewer requests than a batch per worker would wait
out the whole delay every time: c = 16 over two workers went 13.7 k -> 18-19 k req/s). Everything a
request costs is tallied (daemon/observability/accounting.py) and handed to the supervisor off the
request path: each admission and each answer is a record in the ledger the worker shares with the
supervisor (daemon/direct/ledger.py), written before the reply leaves, so `stats` stays exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from openinfer.daemon.direct.batch_apart import BatchApart
from openinfer.daemon.direct.deadline_page import DeadlinePage
from openinfer.daemon.direct.ledger import CACHE_HIT, CACHE_MISS, MAX_ADMITTED, LedgerWriter, ledger_code
from openinfer.daemon.observability.client_key import client_key
from openinfer.daemon.frontdoor.client_limits import over_max_priority
from openinfer.daemon.frontdoor.validation import InputSignature, check_infer
from openinfer.daemon.modelstore.modelconfig import BatchingConfig
from openinfer.daemon.scheduling.batch_rules import BatchStoppers, after_batch, batch_size_now, latest_hold_ns, usual_batch
from openinfer.daemon.scheduling.taskqueue import TaskQueue
from openinfer.wire.errors import DeadlineExceeded, InvalidArgument, OpenInferError, PermissionDenied, ResourceExhausted
from openinfer.wire.protocol import PROTOCOL_VERSION
from openinfer.wire.tensors import ELEMENTS_DEADLINE_NS
from openinfer.wire.zmtp import Buffer

from .compute import RowCutter, encode_outputs, feed_from, join_members, member_outputs, member_parts, plain
from .direct import DirectConnection, DirectDoor, reject_busy
from .run_watch import RunStopped, RunWatch
from .session import Runner, task_error
from .verdict_cache import Cached, VerdictCache

# With [cache], a request of more tensor bytes than this is hashed for its key when its turn comes, not as
# it arrives (~0.7 ms of SHA-256 here): requests of many connections completed in one read were hashed
# back to back, 42 ms each at 64 MiB, outside any turn of the loop, and a front-door task waiting behind
# them got the worker killed (round 20).
HASH_AT_ADMISSION_BYTES = 1 << 20


NEVER = 1 << 63  # a hold limit later than any clock reading
# A pass over the queue ends after this much running, so that the loop reads its sockets again: a request
# that arrives meanwhile joins the queue and takes its identity's turn, and the replies held for the pass
# leave. Running the whole queue first let one uid's 200 pipelined requests (20 ms each) keep another
# uid's request unread - and every reply of the pass unsent - for 4 s (attacker round 9).
PASS_NS = 1_000_000


@dataclass
class ModelView:
    """What this worker knows of the model it serves: enough to check a request as the supervisor does."""

    name: str
    version: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    timeout_ms: int
    max_compute_ms: int
    max_request_bytes: int
    starvation_ms: int
    batching: BatchingConfig | None
    apart: BatchApart = field(default_factory=BatchApart)  # whose requests batch only with their own (APART)
    input_by_name: dict[str, dict[str, Any]] = field(init=False)
    output_names: frozenset[str] = field(init=False)
    output_order: list[str] = field(init=False)
    input_signatures: list[InputSignature] = field(default_factory=list)
    batchable: bool = field(init=False)
    bytes_inputs: bool = field(init=False)  # only BYTES inputs can fail to decode once admitted

    def __post_init__(self) -> None:
        self.bytes_inputs = any(spec["datatype"] == "BYTES" for spec in self.inputs)
        self.input_by_name = {spec["name"]: spec for spec in self.inputs}
        self.output_names = frozenset(spec["name"] for spec in self.outputs)
        self.output_order = [spec["name"] for spec in self.outputs]
        self.batchable = self.batching is not None and all(len(s["shape"]) >= 1 and s["shape"][0] == -1 for s in [*self.inputs, *self.outputs])


@dataclass(eq=False, slots=True)
class DirectRequest:
    conn: DirectConnection
    delimited: bool
    request_id: int
    identity: str  # the connection's kernel-proven identity: turns and limits
    client: str  # accounting key: the identity, or "<name>@<identity>"
    specs: list[dict[str, Any]]
    data: list[Buffer]
    wanted: list[str]
    nbytes: int
    priority: int
    received_ns: int
    decoded_ns: int
    deadline_ns: int
    enqueued_ns: int
    serial: int = 0  # its number in the ledger
    batch_key: Any = None
    rows: int = 0
    rebatched: bool = False  # its batch was stopped at another member's deadline and it ran again: once
    cache_key: bytes | None = None  # with [cache]: what its answer is kept under (None: not looked up yet)


class DirectQueue:
    def __init__(self, door: DirectDoor, runner: Runner, model: ModelView, page: DeadlinePage | None, ledger: LedgerWriter | None, watch: RunWatch, cache: VerdictCache | None = None) -> None:
        self.door = door
        self.cache = cache
        self.runner = runner
        self.model = model
        self.page = page
        self.watch = watch
        self.ledger = ledger
        self.queue: TaskQueue[DirectRequest] = TaskQueue(model.starvation_ms)
        self.in_flight: dict[str, int] = {}  # by identity: accepted here, not yet answered
        self.admitted = 0  # all of those: at most MAX_ADMITTED (what the supervisor keeps of them)
        # Tensor bytes of those requests (waiting or running), in all and by identity: bounded by the
        # door's soft budget, three quarters of it per identity. max_in_flight alone (256) let one uid
        # queue 256 x 64 MiB: its complete requests filled the worker's address space and killed it.
        self.held_bytes = 0
        self.held_by: dict[str, int] = {}
        self.held_budget = door.held_budget
        self.identity_held_budget = door.held_budget * 3 // 4
        self._serial = 0  # numbers admitted requests in the ledger
        self.idle_since_ns = time.monotonic_ns()  # when the last run ended: batch waits count from here
        self.last_request_ns = 0
        # The latest a held batch may leave: the earliest latest_hold_ns of the requests queued since the
        # queue was last empty (one that has left since only makes a batch leave sooner, never later).
        self.hold_until_ns = NEVER
        # How long this worker's batches usually compute (as the supervisor keeps it per model, batch_rules):
        # a request whose deadline falls sooner runs alone (_cannot_last_a_batch). None until a batch ran.
        self.batch_compute_ewma_ns: float | None = None
        self.batch_ended_ns = 0
        self.stoppers = BatchStoppers()  # clients whose request stopped a batch: such requests of theirs run alone a while
        # With batching: how many queued requests wait for no company (no batch key: one that cannot last
        # a batch, batches with no one, or runs alone after its batch failed). They run while a batch is
        # held (_take_alone), and a batch is counted without them: a held batch of three and one such
        # request were a "full" batch of four, and the three left without their fourth.
        self.alone_queued = 0

    # -- admission ------------------------------------------------------------------------------------
    def admit(self, conn: DirectConnection, delimited: bool, request_id: int, header: dict[str, Any], data: list[Buffer], received_ns: int) -> None:
        """Check an `infer` (the lease was checked by the door) and queue it; raises the typed error."""
        if conn.draining:  # read after its GOAWAY, which did not list it: never run here (DirectDoor._say_goaway)
            raise PermissionDenied("this worker is retiring and takes no new request: take a new lease and send it again", {"lease": "expired"})
        model = self.model
        for key, mine in (("model", model.name), ("version", model.version)):
            given = header.get(key)
            if given is not None and given != mine:
                raise InvalidArgument(f"this worker serves {model.name}:{model.version}; the request names {key} {given!r}")
        # BYTES frames are walked when the request runs (decode_array checks each holds exactly its
        # elements, under the run's deadline), not here: walks of many connections' requests completed in
        # one read ran back to back, seconds outside any turn of the loop (round 19: 16 requests of a
        # million strings got the worker killed with a front-door task waiting behind them).
        nbytes, signature = check_infer(header, data, model, model.max_request_bytes, walk_bytes=False)
        if request_id in conn.open_ids:
            raise InvalidArgument(f"id {request_id} is already in flight on this connection; ids must be unique among a connection's outstanding requests")
        lease = conn.lease
        assert lease is not None
        held = self.in_flight.get(conn.identity, 0)
        if held >= lease.max_in_flight:
            raise reject_busy(conn.identity, held, lease.max_in_flight)
        priority = header.get("priority") or 0
        if priority > lease.max_priority:
            raise over_max_priority(conn.identity, priority, lease.max_priority, "policies/clients.toml, in the lease")
        if self.admitted >= MAX_ADMITTED:
            raise ResourceExhausted(f"this worker has {self.admitted} requests waiting or running, all it takes: send it again once some are answered", {"limit": MAX_ADMITTED})
        mine = self.held_by.get(conn.identity, 0)
        if nbytes and (self.held_bytes + nbytes > self.held_budget or mine + nbytes > self.identity_held_budget):
            raise ResourceExhausted(f"this worker holds {self.held_bytes} bytes of requests waiting or running ({mine} of them {conn.identity}'s); it takes at most {self.held_budget}, {self.identity_held_budget} per identity: send it again once some are answered", {"limit": self.held_budget})
        decoded_ns = time.monotonic_ns()
        timeout_ms = header.get("timeout_ms") or model.timeout_ms
        # The timeout runs from when the client sent the request (same host, same clock), not from when
        # this worker got round to reading it: a request that waited out its deadline in the socket
        # never runs. A client can only make its own deadline earlier (at most a minute back).
        sent_ns = header.get("sent_ns")
        starts_ns = sent_ns if type(sent_ns) is int and received_ns - 60_000_000_000 <= sent_ns < received_ns else received_ns
        name = header.get("client")
        outputs = header.get("outputs")
        request = DirectRequest(
            conn, delimited, request_id, conn.identity, client_key(name, conn.identity), signature.inputs, data,
            list(outputs) if outputs else model.output_order, nbytes, priority, received_ns, decoded_ns,
            starts_ns + timeout_ms * 1_000_000, decoded_ns,
        )
        if model.batchable and signature.rows is not None and model.batching is not None and signature.rows <= model.batching.max_batch_size and not self._cannot_last_a_batch(request, decoded_ns) and not self.stoppers.alone(conn.identity, request.deadline_ns - received_ns, decoded_ns):
            request.batch_key = (signature.batch_specs, tuple(request.wanted))
            request.rows = signature.rows
        conn.open_ids.add(request_id)
        self.in_flight[conn.identity] = held + 1
        self.admitted += 1
        self.held_bytes += nbytes
        self.held_by[conn.identity] = mine + nbytes
        self._serial += 1
        request.serial = self._serial
        if self.ledger is not None:
            self.ledger.admitted(request.serial, request_id, request.client, nbytes, request.deadline_ns, starts_ns)
        # after every check and limit: a hit bypasses none of them (a larger request: when its turn comes)
        if self.cache is not None and nbytes <= HASH_AT_ADMISSION_BYTES and self._answered_from_cache(request, decoded_ns):
            return
        self.queue.append(request)
        self.last_request_ns = received_ns
        if model.batchable:  # (only a batch holds requests back: the rest of this worker's requests skip it)
            if request.batch_key is None:  # it waits for no one, and holds no batch back nor sends one out early
                self.alone_queued += 1
            else:
                self.hold_until_ns = min(self.hold_until_ns, latest_hold_ns(decoded_ns, request.deadline_ns))

    def _cannot_last_a_batch(self, request: DirectRequest, now_ns: int) -> bool:
        """Whether the request's deadline falls before a batch leaving at `now_ns` would usually end: it
        runs alone, as the front door runs such a task (scheduling/dispatch.py). In a batch, the run was
        stopped at its deadline and the others ran again; waiting for company, it cut the batch's hold
        and sent it out half empty (rounds 27-28 at the front door, round 89 here)."""
        ewma = usual_batch(self.batch_compute_ewma_ns, self.batch_ended_ns, now_ns, 1)
        return ewma is not None and request.deadline_ns <= now_ns + ewma

    def _answered_from_cache(self, request: DirectRequest, now_ns: int) -> bool:
        cache = self.cache
        assert cache is not None
        request.cache_key = cache.key(request.specs, request.data, request.wanted, request.identity)
        hit = cache.get(request.cache_key, now_ns)
        if hit is None:
            return False
        self._answer_cached(request, hit)
        return True

    def send_back_queued(self) -> None:
        """Leaving (retired): what was read but never started is answered as the expiry of its lease - the
        one answer on which every client takes a new lease and sends the request again (PROTOCOL.md
        17.4) - instead of run: a queue run in one pass at the end held every reply until the last, and
        the daemon kills a retired worker a model's max_compute_ms after its grace, so runs past that
        lost answers that had been computed (round 10)."""
        while self.queue:
            request = self.queue.popleft()
            self._left_queue(request)
            self._fail(request, PermissionDenied("this worker retired before running the request: take a new lease and send it again", {"lease": "expired"}))

    def cancel(self, conn: DirectConnection, target: int) -> bool:
        if target not in conn.open_ids:  # answered, or never sent: nothing to look for
            return False
        for request in self.queue.queued_by(conn.identity):
            if request.conn is conn and request.request_id == target:
                self.queue.remove(request)
                self._left_queue(request)
                self._fail(request, DeadlineExceeded("cancelled by the client before it ran"))
                return True
        return False

    def refuse_queued(self, identity: str, error: OpenInferError) -> int:
        """A client was refused the model (crash strikes, BAR): its requests queued here are answered
        `error`, not run - a poison it queued before the refusal crashed the worker after it (attacker
        round 87: 4 crashes where the front door, which answers its own queue so, gave 3). What arrives
        later meets its revoked lease."""
        refused = list(self.queue.queued_by(identity))
        for request in refused:
            self.queue.remove(request)
            self._left_queue(request)
            self._fail(request, error)
        return len(refused)

    # -- running ---------------------------------------------------------------------------------------
    def run_ready(self) -> float | None:
        """Run what can run now, for about PASS_NS; returns how long until the next run is due (seconds:
        0 when the pass ended with requests still ready, else a held batch's time), or None. The replies
        of one pass leave together, one write per connection."""
        if len(self.queue) < 2:
            return self._run_ready()
        with self.door.held():
            return self._run_ready()

    def _run_ready(self) -> float | None:
        queue = self.queue
        model = self.model
        batching = model.batching if model.batchable else None
        pass_ends_ns = time.monotonic_ns() + PASS_NS
        while queue:
            now = time.monotonic_ns()
            if now >= pass_ends_ns:
                return 0.0  # more is ready: the loop reads its sockets first, then comes back
            if batching is None:
                taken = [queue.popleft()]
            else:
                waiting = len(queue) - self.alone_queued  # those that wait for company
                size = batch_size_now(waiting, batching.max_batch_size, batching.preferred_batch_sizes)
                taken = []
                if waiting <= 0:  # no batch is held: they all run alone, in their turns (round 90: held for the delay)
                    taken = [queue.popleft()]
                    self._left_queue(taken[0])
                elif size == 0:
                    due_ns = queue.oldest_enqueued_ns() + batching.max_queue_delay_us * 1000
                    if batching.quiet_us:  # its clients have gone quiet: what came is all there is for now
                        due_ns = min(due_ns, self.last_request_ns + batching.quiet_us * 1000)
                    due_ns = min(due_ns, self.hold_until_ns)  # a request that must run soon to make its deadline
                    if now < due_ns:
                        # One that waits for no company runs now, and the batch held goes on waiting. (Only
                        # before the batch is due: once it is, all go in their turns, so that a stream of
                        # such requests cannot hold it back past its delay.)
                        taken = self._take_alone() if self.alone_queued else []
                        if not taken:
                            return (due_ns - now) / 1e9  # held for company, at most max_queue_delay_us
                    size = batching.max_batch_size
                if not taken:
                    taken = queue.take_batch(size, model.apart.now(now))
                    self._left_queue(taken[0])  # (the rest have a batch key)
                    taken = self._able_to_last(taken, now)
            live = []
            for request in taken:
                if request.deadline_ns <= now:
                    self._fail(request, DeadlineExceeded(f"deadline passed after {(now - request.received_ns) / 1e6:.1f} ms waiting in the queue; the request never ran"))
                elif not (request.cache_key is None and self.cache is not None and self._answered_from_cache(request, now)):
                    live.append(request)
            if not live:
                continue
            if len(live) == 1:
                if batching is not None and self.ledger is not None:
                    self.ledger.run(1)
                self._run_one(live[0], now)
            else:
                self._run_batch(live, now)
            self.idle_since_ns = time.monotonic_ns()
        self.hold_until_ns = NEVER
        return None

    def _take_alone(self) -> list[DirectRequest]:
        """While a batch is held for company: the next queued request (in the queue's order and turns)
        that waits for none, to run now. Only while one is queued (alone_queued), and the queue then
        holds less than a batch besides."""
        request = self.queue.take_first(_alone)
        if request is None:
            self.alone_queued = 0  # (a count gone wrong costs a look through the queue, never the worker)
            return []
        self.alone_queued -= 1
        return [request]

    def _left_queue(self, request: DirectRequest) -> None:
        if request.batch_key is None and self.model.batchable:
            self.alone_queued -= 1

    def _put_back_alone(self, request: DirectRequest) -> None:
        """Back to the front of its identity's requests, to run alone (TaskQueue.put_back)."""
        request.batch_key = None
        self.queue.put_back(request)
        self.alone_queued += 1

    def _able_to_last(self, batch: list[DirectRequest], now: int) -> list[DirectRequest]:
        """The batch less its members whose deadline falls before its run would usually end: they go back
        to the front of the queue, to run alone (their deadline, if it passes, is theirs only)."""
        ewma = usual_batch(self.batch_compute_ewma_ns, self.batch_ended_ns, now, 1)
        if ewma is None or len(batch) < 2:
            return batch
        cutoff = now + ewma
        short = [request for request in batch if now < request.deadline_ns <= cutoff]
        if not short or len(short) == len(batch):
            return batch  # (all of them short: they run together, as the front door runs them)
        for request in reversed(short):
            self._put_back_alone(request)
        return [request for request in batch if not now < request.deadline_ns <= cutoff]

    def _batch_wait_us(self, request: DirectRequest, started_ns: int) -> float:
        """The part of its queue time a request waited while this worker was free: for company."""
        return max(0, started_ns - max(request.decoded_ns, self.idle_since_ns)) / 1000

    def _deadline_of(self, requests: list[DirectRequest], now: int) -> int:
        """The earliest of the requests' deadlines and max_compute_ms from now (that alone for none)."""
        deadline_ns = now + self.model.max_compute_ms * 1_000_000
        for request in requests:
            if request.deadline_ns < deadline_ns:
                deadline_ns = request.deadline_ns
        return deadline_ns

    def _begin_run(self, requests: list[DirectRequest]) -> int:
        """The deadline page shows a run from here to _end_run (returns its deadline): the inputs
        prepared (BYTES decoded, a batch's rows joined), session.run, the outputs encoded - work a
        request's size decides - so the supervisor sees a worker busy with them, never an idle one that
        does not answer its PING (round 14: a request of millions of BYTES elements got its worker
        killed as unresponsive; round 15: millions of BYTES outputs took seconds to encode), and kills
        it if it overstays the deadline. The loops over BYTES elements stop at that deadline too."""
        now = time.monotonic_ns()
        deadline_ns = self._deadline_of(requests, now)
        if self.page is not None:
            self.page.running(now, deadline_ns, _run_uids(requests))
        ELEMENTS_DEADLINE_NS.set(deadline_ns)  # (wire/tensors.py)
        return deadline_ns

    def _end_run(self) -> None:
        ELEMENTS_DEADLINE_NS.set(0)
        if self.page is not None:
            self.page.idle()

    def _stoppable_run(self, wanted: list[str], feed: dict[str, Any], deadline_ns: int) -> list[Any]:
        """session.run, stopped by the watch at `deadline_ns` (RunStopped)."""
        started_ns = time.monotonic_ns()
        try:
            return self.watch.run(lambda options: self.runner.run(wanted, feed, options), deadline_ns)
        except RunStopped:
            raise RunStopped(self._stop_reason(started_ns)) from None

    def _stop_reason(self, started_ns: int) -> str:
        return f"stopped after {(time.monotonic_ns() - started_ns) / 1e6:.0f} ms: past its deadline (the request's timeout, or the model's max_compute_ms = {self.model.max_compute_ms})"

    def _run_one(self, request: DirectRequest, started_ns: int) -> None:
        cpu_start = time.process_time_ns()
        try:
            deadline_ns = self._begin_run([request])
            try:
                feed = feed_from({"inputs": request.specs}, request.data, self.runner.raw_inputs)
                prepared_ns = time.monotonic_ns()
                results = self._stoppable_run(request.wanted, feed, deadline_ns)
                computed_ns = time.monotonic_ns()
                specs, payloads = encode_outputs(request.wanted, results)
            finally:
                self._end_run()
        except RunStopped as exc:
            self._answer_error(request, DeadlineExceeded.code, str(exc), started_ns, cpu_start)
            return
        except Exception as exc:
            error = task_error(exc, request.specs, self.runner.dynamic_inputs)
            self._answer_error(request, error["code"], error["message"], started_ns, cpu_start)
            return
        encoded_ns = time.monotonic_ns()
        timing = {
            "decode_us": (request.decoded_ns - request.received_ns) / 1000,
            "queue_us": (started_ns - request.decoded_ns) / 1000,
            "prep_us": (prepared_ns - started_ns) / 1000,
            "compute_us": (computed_ns - prepared_ns) / 1000,
            "encode_us": (encoded_ns - computed_ns) / 1000,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000,
            "total_us": (encoded_ns - request.received_ns) / 1000,
        }
        reply = {"v": PROTOCOL_VERSION, "id": request.request_id, "model": self.model.name, "version": self.model.version, "outputs": specs, "timing": timing}
        stages = self.runner.last_stages
        if stages is not None:  # a chain: how long each of its models ran, in the reply and the books
            reply["stages"] = stages
            if self.ledger is not None and self.ledger.has_room(len(stages) + 1):
                for place, stage in enumerate(stages.values()):
                    self.ledger.stage(place, stage["runs"], stage["compute_us"])
        if self.model.batchable:
            reply["batch_size"] = 1
            timing["batch_wait_us"] = self._batch_wait_us(request, started_ns)
        if self.cache is not None and request.cache_key is not None:
            self.cache.put(request.cache_key, request.identity, specs, payloads, encoded_ns)
            reply["cache"] = "miss"
            self._answer(request, reply, payloads, None, timing, CACHE_MISS)
            return
        self._answer(request, reply, payloads, None, timing)

    def _stopped(self, batch: list[DirectRequest], reason: str) -> None:
        """A batch was stopped at its deadline. When that was a member's own (its timeout has passed), that
        member is answered DEADLINE_EXCEEDED and the others run again as one batch, without new company
        (a request that came meanwhile with a short timeout would stop it again), once: a member whose
        second batch is stopped too runs alone. At max_compute_ms, whose input ran long is unknown: each
        runs alone. Round 89: each ran alone at once, and one client's valid requests with a timeout
        shorter than a batch's run, in batch after batch, turned batching off for everyone (the victims'
        answers/s -86 %); the front door runs the others again together since round 27."""
        now = time.monotonic_ns()
        expired = [member for member in batch if member.deadline_ns <= now]
        rest = [member for member in batch if member.deadline_ns > now]
        if not expired or not rest:
            self._run_alone_later(batch)
            return
        for member in expired:
            self._fail(member, DeadlineExceeded(f"{reason}; its batch's other members ran again without it"))
            # (its time left when read, as admit measures the next: a timeout counted from a `sent_ns` set
            # back 2 s read as 2.25 s there and 0.25 s here, and passed the bar every time - round 93)
            self.stoppers.stopped(member.identity, member.deadline_ns - member.received_ns, now)
        together = object()  # a key no other request has: no new company
        for member in reversed(rest):
            if member.rebatched:
                self._put_back_alone(member)
            else:
                member.batch_key, member.rebatched = together, True
                self.queue.put_back(member)
        self.hold_until_ns = now  # they waited for company once: not held for it again

    def _run_alone_later(self, batch: list[DirectRequest]) -> None:
        """Each member of a batch that failed or was stopped runs alone (only the guilty one fails), as
        the queue's next, one a turn of the worker's loop: run here one after another, they held the
        worker for a max_compute_ms each without a look at its sockets or channel, and a front-door task
        sent meanwhile waited past the one run the supervisor allows for (round 18: it was killed with
        the worker). A member whose deadline has passed is answered now; the others waited for company
        once, and are not held for it again."""
        now = time.monotonic_ns()
        self.hold_until_ns = now
        for member in reversed(batch):
            if member.deadline_ns <= now:
                self._fail(member, DeadlineExceeded(f"its deadline passed after {(now - member.received_ns) / 1e6:.0f} ms, in a batch that failed or was stopped; it is not run again"))
            else:
                self._put_back_alone(member)  # alone from now on

    def _answer_cached(self, request: DirectRequest, hit: Cached) -> None:
        now = time.monotonic_ns()
        timing = {"decode_us": (request.decoded_ns - request.received_ns) / 1000, "cache_us": (now - request.decoded_ns) / 1000, "total_us": (now - request.received_ns) / 1000}
        reply = {"v": PROTOCOL_VERSION, "id": request.request_id, "model": self.model.name, "version": self.model.version, "outputs": hit.specs(), "timing": timing, "cache": "hit"}
        self._answer(request, reply, hit.payloads, None, timing, CACHE_HIT)

    def _run_batch(self, batch: list[DirectRequest], started_ns: int) -> None:
        """The members' rows joined along dimension 0, run once, each member's rows cut out of the
        outputs; if the run fails, each member runs alone (only the guilty one fails). One run on the
        deadline page from the join to the last member's encoding: max_compute_ms covers it all."""
        cpu_start = time.process_time_ns()
        deadline_ns = self._begin_run(batch)
        cap_ns = time.monotonic_ns() + self.model.max_compute_ms * 1_000_000
        try:
            batch, parts = self._member_parts(batch, started_ns, cpu_start)
            if not batch:
                return
            if self.ledger is not None:
                self.ledger.run(len(batch))
            head = batch[0]
            try:
                feed = join_members(head.specs, [m.rows for m in batch], parts)
                prepared_ns = time.monotonic_ns()
                results = [plain(value) for value in self._stoppable_run(head.wanted, feed, deadline_ns)]
                computed_ns = time.monotonic_ns()
                total_rows = sum(m.rows for m in batch)
                cutters = [RowCutter.of(value, total_rows) for value in results]
            except RunStopped as exc:
                self._stopped(batch, str(exc))
                return
            except Exception:  # failed as a whole: which member caused it is unknown
                self._run_alone_later(batch)
                return
            # (the estimate as it stood when this batch began: a batch that runs past the forgetting must
            # not have the estimate forgotten by its own length - one slow batch would set it anew)
            self.batch_compute_ewma_ns = after_batch(usual_batch(self.batch_compute_ewma_ns, self.batch_ended_ns, prepared_ns, 1), computed_ns - prepared_ns)
            self.batch_ended_ns = computed_ns
            self._answer_members(batch, cutters, started_ns, prepared_ns, computed_ns, cpu_start, cap_ns)
        finally:
            self._end_run()

    def _member_parts(self, batch: list[DirectRequest], started_ns: int, cpu_start: int) -> tuple[list[DirectRequest], list[list[Any]]]:
        """The members whose inputs decode, with their parts (compute.member_parts); a member whose do not
        - a malformed BYTES frame, which admission does not walk - is answered with its error alone and
        the batch runs without it (round 20). Stopped at the batch's deadline, as a run is (_stopped).
        Without BYTES inputs every member's frames were held to its rows at admission: they are the
        parts."""
        if not self.model.bytes_inputs:
            return batch, [member.data for member in batch]
        try:
            parts, bad = member_parts(batch[0].specs, [(member.rows, member.data) for member in batch])
        except DeadlineExceeded as stop:
            self._stopped(batch, stop.message)
            return [], []
        if not bad:
            return batch, parts
        for position, exc in bad:
            member = batch[position]
            error = task_error(exc, member.specs, self.runner.dynamic_inputs)
            self._answer_error(member, error["code"], error["message"], started_ns, cpu_start)
        failed = {position for position, _ in bad}
        return [member for position, member in enumerate(batch) if position not in failed], parts

    def _answer_members(self, batch: list[DirectRequest], cutters: list[RowCutter], started_ns: int, prepared_ns: int, computed_ns: int, cpu_start: int, cap_ns: int) -> None:
        """Each member's rows encoded and answered, one write per client connection for the batch. A
        member whose outputs cannot be encoded - its own deadline passed while they were (BYTES), or they
        do not fit - is answered with that error alone: raised out of here, it killed the worker and left
        the rest of the batch unanswered (round 19)."""
        size = len(batch)
        cpu_each = (time.process_time_ns() - cpu_start) / 1000 / size
        prep_us, compute_us = (prepared_ns - started_ns) / 1000, (computed_ns - prepared_ns) / 1000
        name, version = self.model.name, self.model.version
        start = 0
        with self.door.held():
            for member in batch:
                ELEMENTS_DEADLINE_NS.set(min(member.deadline_ns, cap_ns))  # its own deadline, not the batch's earliest
                rows, start = start, start + member.rows
                try:
                    specs, payloads = member_outputs(member.wanted, cutters, rows, member.rows)
                except Exception as exc:
                    error = task_error(exc, member.specs, self.runner.dynamic_inputs)
                    self._answer_error(member, error["code"], error["message"], started_ns, cpu_start)
                    continue
                now = time.monotonic_ns()
                timing = {
                    "decode_us": (member.decoded_ns - member.received_ns) / 1000,
                    "queue_us": (started_ns - member.decoded_ns) / 1000,
                    "batch_wait_us": self._batch_wait_us(member, started_ns),
                    "prep_us": prep_us,
                    "compute_us": compute_us,
                    "encode_us": (now - computed_ns) / 1000,
                    "cpu_us": cpu_each,
                    "total_us": (now - member.received_ns) / 1000,
                }
                reply = {"v": PROTOCOL_VERSION, "id": member.request_id, "model": name, "version": version, "outputs": specs, "timing": timing, "batch_size": size}
                self._answer(member, reply, payloads, None, timing)

    # -- answers ---------------------------------------------------------------------------------------
    def _answer(self, request: DirectRequest, reply: dict[str, Any], payloads: list[Any], code: str | None, timing: dict[str, float], cache: int = 0) -> None:
        """The ledger first, then the reply: whatever a client has been answered is already counted. A
        request looked up in the cache and not answered from it is a miss, whatever its answer (round 24:
        one that then failed was no lookup at all in the hit ratio)."""
        if not cache and request.cache_key is not None:
            cache = CACHE_MISS
        if self.ledger is not None:
            bytes_out = 0
            for payload in payloads:
                bytes_out += len(payload) if not isinstance(payload, memoryview) else payload.nbytes
            self.ledger.answered(request.serial, request.request_id, request.client, code, timing, request.nbytes, bytes_out, cache)
        self.door.reply(request.conn, request.delimited, reply, payloads)
        self._close(request)

    def _answer_error(self, request: DirectRequest, code: str, message: str, started_ns: int, cpu_start: int) -> None:
        timing = {"total_us": (time.monotonic_ns() - request.received_ns) / 1000, "cpu_us": (time.process_time_ns() - cpu_start) / 1000}
        self._answer(request, {"v": PROTOCOL_VERSION, "id": request.request_id, "error": {"code": code, "message": message}, "timing": timing}, [], code, timing)

    def _fail(self, request: DirectRequest, exc: OpenInferError) -> None:
        timing = {"total_us": (time.monotonic_ns() - request.received_ns) / 1000}
        self._answer(request, {"v": PROTOCOL_VERSION, "id": request.request_id, "error": exc.to_wire(), "timing": timing}, [], ledger_code(exc), timing)

    def _close(self, request: DirectRequest) -> None:
        request.conn.open_ids.discard(request.request_id)
        identity = request.conn.identity
        self.admitted -= 1
        left = self.in_flight.get(identity, 0) - 1
        if left > 0:
            self.in_flight[identity] = left
        else:
            self.in_flight.pop(identity, None)
        self.held_bytes -= request.nbytes
        mine = self.held_by.get(identity, 0) - request.nbytes
        if mine > 0:
            self.held_by[identity] = mine
        else:
            self.held_by.pop(identity, None)

    def outcome(self, client: str, op: str, request_id: int | None, exc: OpenInferError | None, received_ns: int) -> None:
        """Count what the door answered itself (attach, cancel, refusals), as the front door counts: every
        request by operation and outcome; a refused one also as a failed request of its client, and of
        this model when it was an `infer`."""
        if self.ledger is None:
            return
        if exc is None:
            self.ledger.counted(client, op)
        else:
            self.ledger.refused(request_id or 0, client, op, ledger_code(exc, op), (time.monotonic_ns() - received_ns) / 1000)


def _alone(request: DirectRequest) -> bool:
    return request.batch_key is None


def _run_uids(requests: list[DirectRequest]) -> list[int] | None:
    """The distinct uids of a run's requests, for the deadline page (direct/deadline_page.py); None for an
    identity that is not a uid's."""
    identity = requests[0].identity if requests else ""
    if len(requests) == 1 or all(request.identity == identity for request in requests):
        return [int(identity[4:])] if identity.startswith("uid=") else None
    identities = {request.identity for request in requests}
    if not all(each.startswith("uid=") for each in identities):
        return None
    return [int(each[4:]) for each in identities]
