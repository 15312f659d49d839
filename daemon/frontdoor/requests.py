"""Each message a client connection delivers to the daemon's socket: checked where it arrives, then an
`infer` queued for a worker (scheduling/), or an administrative operation answered (control/admin.py),
a lease issued (direct/), a queued request cancelled. Every request read gets exactly one reply,
whatever goes wrong in here. The supervisor owns the parts this uses (connections, replies, queues,
access policy, accounting); this module decides what a request becomes."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from openinfer.wire.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound, OpenInferError, ResourceExhausted, Unavailable
from openinfer.wire.protocol import MAX_FRAMES, MAX_HEADER_BYTES, PROTOCOL_VERSION
from openinfer.wire.zmtp import Event, Oversized

from openinfer.daemon.observability.log_throttle import LogThrottle
from openinfer.daemon.control import admin, scoped_views
from openinfer.daemon.modelstore.models import ModelState, ServedModel
from openinfer.daemon.observability.client_key import client_key
from openinfer.daemon.scheduling.tasks import Task
from openinfer.daemon.workerpool.crash_blame import WINDOW_NS

from .connections import Connection, Route
from .validation import OverLimit, check_envelope, check_infer, decode_header, request_id_of

if TYPE_CHECKING:
    from openinfer.daemon.supervisor import Supervisor

log = logging.getLogger("openinfer.supervisor")


class FrontDoorRequests:
    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor
        self.malformed = LogThrottle()

    def on_client_event(self, conn: Connection, event: Event) -> None:
        """One complete message (or an Oversized report) from a client connection. Every request the
        daemon reads gets exactly one reply, whatever goes wrong in here."""
        received_ns = time.monotonic_ns()
        self.supervisor.timers.run_due()  # a batch's delay must not wait for a burst to be read
        if isinstance(event, Oversized):
            self._on_oversized(conn, event, received_ns)
            return
        frames = event
        # A REQ peer puts an empty delimiter before the header; answer it the same way.
        delimited = len(frames) > 1 and len(frames[0]) == 0
        route = Route(conn, delimited)
        body = frames[1:] if delimited else frames
        client = conn.identity
        request_id: int | None = None
        model: ServedModel | None = None
        op = "(malformed)"
        try:
            if not body:
                raise InvalidArgument("empty message: expected a header frame")
            header = decode_header(body[0])
            request_id = request_id_of(header)
            op = check_envelope(header, len(body))
            if op == "attach":  # a client's mistake, not a missing grant: say where it goes
                raise InvalidArgument("`attach` is sent to a worker's endpoint, with the lease `lease` returned (PROTOCOL.md 17.3); the daemon's socket does not serve it")
            client = client_key(header.get("client"), conn.identity)
            model_name = header.get("model")
            # A lease is for infer (and cancel) on the model's workers: the infer grant covers it.
            self.supervisor.access.authorize(conn.peer, "infer" if op == "lease" else op, model_name if isinstance(model_name, str) else None)
            if op == "infer":
                model = self.lookup_for_infer(header, conn.identity)
                self._accept_infer(route, request_id, client, model, header, body, received_ns)  # type: ignore[arg-type]
            else:
                self._reply_admin(route, request_id, op, header, client)  # type: ignore[arg-type]
        except Exception as exc:  # every accepted request gets exactly one answer, even on a daemon bug
            if not isinstance(exc, OpenInferError):
                log.exception("internal error while handling a request", extra={"client": client})
                exc = Internal(f"internal error: {type(exc).__name__}")
            if request_id is None and (times := self.malformed.due("malformed request", conn.log_source)):  # (1st, 2nd, 4th ... per peer)
                log.warning("malformed request", extra={"client": client, "connection": conn.conn_id, "code": exc.code, "reason": exc.message, "times": times})
            timing = {"total_us": (time.monotonic_ns() - received_ns) / 1000}
            exc = self._as_seen_by(conn, exc)
            self.supervisor.replies.error(route, request_id, exc, timing)
            if request_id is None or isinstance(exc, OverLimit):  # no conforming client sends this
                self.supervisor.connections.strike(conn, exc.message)
            self.supervisor.accountant.record(model.name if model else None, model.version if model else None, client, exc.code, timing)
            self.supervisor.accountant.count_operation(op, exc.code)

    def _as_seen_by(self, conn: Connection, exc: OpenInferError) -> OpenInferError:
        """An unknown model's NOT_FOUND lists the models served: those this peer's grants of `models`
        show it (round 40: a peer granted some models read every model's name from it)."""
        names = exc.details.get("models") if isinstance(exc, NotFound) else None
        if not isinstance(names, list):
            return exc
        scope = self.supervisor.access.scope(conn.peer, "models")
        return exc if scope is None else NotFound(exc.message, {"models": [name for name in names if scoped_views.covered(name, scope)]})

    def _reply_admin(self, route: Route, request_id: int, op: str, header: dict[str, Any], client: str) -> None:
        try:
            result = self._admin(op, header, route)
        except OpenInferError as exc:
            exc = self._as_seen_by(route.conn, exc)
            self.supervisor.replies.error(route, request_id, exc)
            self.supervisor.accountant.count_operation(op, exc.code)
            if op == "lease" and exc.code != Unavailable.code:
                # The client library answers its infer with this refusal (NOT_FOUND ...): counted as the
                # failed request it is. UNAVAILABLE sends the infer to this socket, where it is counted.
                self.supervisor.accountant.record(None, None, client, exc.code, {})
            return
        self.supervisor.replies.send(route, {"v": PROTOCOL_VERSION, "id": request_id, "result": result})
        self.supervisor.accountant.count_operation(op, None)

    def _on_oversized(self, conn: Connection, event: Oversized, received_ns: int) -> None:
        """A message over a size limit: its bytes were skipped as they arrived, never stored. Answered
        RESOURCE_EXHAUSTED with its id when the header frame came before the limit was hit."""
        frames = event.frames
        delimited = bool(frames) and len(frames[0]) == 0
        body = frames[1:] if delimited else frames
        request_id = None
        if body:
            try:
                request_id = request_id_of(decode_header(body[0]))
            except OpenInferError:
                pass
        if event.limit == "first_frame":
            message = f"header is {event.size} bytes; the limit is {MAX_HEADER_BYTES} (protocol section 9)"
        elif event.limit == "frames":
            message = f"more than {MAX_FRAMES} frames; the limit is {MAX_FRAMES} (a header and at most {MAX_FRAMES - 1} tensors)"
        else:
            limit = self.supervisor.settings.server.max_request_bytes
            message = f"request carries more than {limit} bytes of tensors (at least {event.size - MAX_HEADER_BYTES}); the limit is server.max_request_bytes = {limit}: split the request or raise the setting"
        exc = OverLimit(message, {"limit": event.limit, "max_request_bytes": self.supervisor.settings.server.max_request_bytes})
        timing = {"total_us": (time.monotonic_ns() - received_ns) / 1000}
        self.supervisor.replies.error(Route(conn, delimited), request_id, exc, timing)
        self.supervisor.connections.strike(conn, exc.message)
        self.supervisor.accountant.record(None, None, conn.identity, exc.code, timing)
        self.supervisor.accountant.count_operation("(oversized)", exc.code)

    def lookup_for_infer(self, header: dict[str, Any], identity: str) -> ServedModel:
        """The model version an `infer` or a `lease` of `identity` goes to (checks 12-17a of PROTOCOL.md 8.2)."""
        if self.supervisor.draining:
            raise Unavailable("daemon is shutting down; not accepting new requests")
        version = header.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise InvalidArgument("`version` must be an integer")
        name = header.get("model")
        if not isinstance(name, str):
            raise InvalidArgument("`model` must be a string (the name of a served model)")
        model = self.serving(name, version)
        refused = self.barred(identity, model)
        if refused is not None:
            raise refused
        return model

    def barred(self, identity: str, model: ServedModel) -> ResourceExhausted | None:
        """The refusal of a client whose requests crashed the model's workers too often (workerpool/crash_blame.py)."""
        strikes = self.supervisor.pool.strikes
        if not strikes:  # (every request asks: mostly no client has crashed anything)
            return None
        limit = self.supervisor.settings.pool.crash_strikes
        left_ns = strikes.barred_for_ns(model.name, identity, time.monotonic_ns(), limit)
        if not left_ns:
            return None
        seconds = -(-left_ns // 1_000_000_000)
        return ResourceExhausted(
            f"requests of {identity} crashed the workers of {model.name} {limit} times within {WINDOW_NS // 60_000_000_000} minutes: "
            f"its requests to this model are refused for {seconds} s more (the daemon's log names the crashes)",
            {"retry_after_s": seconds},
        )

    def serving(self, name: str, version: int | None) -> ServedModel:
        """The model version that serves `name` (at `version`, if given), ready: else NOT_FOUND or UNAVAILABLE."""
        model = self.supervisor.registry.lookup(name, version)
        if model.state is not ModelState.READY:
            raise Unavailable(f"model {model.key} is {model.state.value}" + (f": {model.reason}" if model.reason else ""))
        return model

    def _accept_infer(self, route: Route, request_id: int, client: str, model: ServedModel, header: dict[str, Any], body: list[Any], received_ns: int) -> None:
        data = body[1:]
        limit = model.config.max_request_bytes or self.supervisor.settings.server.max_request_bytes
        nbytes, signature = check_infer(header, data, model, limit, walk_bytes=False)  # BYTES frames: the worker's (check_infer)
        decoded_ns = time.monotonic_ns()
        timeout_ms = header.get("timeout_ms") or model.config.timeout_ms
        conn = route.conn
        task = Task(  # positional: half the cost of keywords, on every request
            self.supervisor.new_task_id(),  # task_id
            request_id,
            route,
            conn.identity,
            client,
            model,
            body[0],  # header_frame
            data,  # data_frames
            nbytes,
            received_ns,
            decoded_ns,
            received_ns + timeout_ms * 1_000_000,  # deadline_ns
            header.get("priority") or 0,
            signature,
        )
        outputs = header.get("outputs")
        task.wanted = tuple(outputs) if outputs else model.output_order
        open_ids = conn.open_ids
        if request_id in open_ids:
            raise InvalidArgument(f"id {request_id} is already in flight on this connection; ids must be unique among a connection's outstanding requests")
        self.supervisor.limiter.admit(conn.identity, decoded_ns, task.priority)
        # Open before admit: admit may answer it at once (a deadline passed while it was read), and the
        # answer closes the id - added after, it stayed "in flight" for good (round 32: 50 of 50 ids).
        open_ids.add(request_id)
        try:
            self.supervisor.dispatcher.admit(task, header)
        except BaseException:
            open_ids.discard(request_id)  # refused: never open
            raise

    def _admin(self, op: str, header: dict[str, Any], route: Route) -> dict[str, Any]:
        # A grant of a read operation on some models only shows those (scoped_views.py).
        scope = self.supervisor.access.scope(route.conn.peer, op) if op in ("models", "status", "stats", "health") else None
        if op == "models":
            result = admin.models_result(self.supervisor)
            return result if scope is None else scoped_views.scoped_models(result, scope)
        if op == "metadata":
            return admin.metadata_result(self.supervisor, header)
        if op == "health":
            return admin.health_result(self.supervisor, scope)
        if op == "status":
            self.supervisor.read_ledgers()  # its workers' tasks_served count every direct request answered before it
            result = admin.status_result(self.supervisor)
            return result if scope is None else scoped_views.scoped_status(result, scope)
        if op == "stats":
            self.supervisor.read_ledgers()  # every direct request answered before this one is counted
            result = admin.stats_result(self.supervisor)
            return result if scope is None else scoped_views.scoped_stats(result, scope, route.conn.identity)
        if op == "cancel":
            return self._cancel(route, header.get("target"))
        if op == "lease":
            return self._lease(route, header)
        if op == "reload":
            if self.supervisor.draining:
                raise Unavailable("daemon is shutting down; nothing is reloaded")
            result = self.supervisor.reload()
            if "error" in result:  # the old configuration keeps serving
                raise InvalidArgument(result["error"])
            return result
        raise InvalidArgument(f"operation {op!r} is not supported by this daemon yet")

    def _lease(self, route: Route, header: dict[str, Any]) -> dict[str, Any]:
        """A lease for the direct path: `infer` straight to the model's workers (PROTOCOL.md 17).
        Local peers only (the kernel must be able to tell the worker who connects)."""
        conn = route.conn
        if conn.peer.uid is None:
            raise Unavailable("the direct path is for local clients over ipc://: send infer to this socket", {"direct": "off"})  # stop asking (PROTOCOL.md 17.1)
        model = self.lookup_for_infer(header, conn.identity)
        server = self.supervisor.settings.server
        limit = self.supervisor.limiter.policy.limit_for(conn.identity)
        if limit.rate_per_s > 0:  # a rate is kept in one place, here: such a client is served at this socket
            raise Unavailable(f"{conn.identity} has a rate limit (rate_per_s = {limit.rate_per_s:g}, policies/clients.toml): its requests are served through the front door, which keeps the rate", {"direct": "off"})
        limits = {
            "max_request_bytes": model.config.max_request_bytes or server.max_request_bytes, "max_header_bytes": MAX_HEADER_BYTES, "max_frames": MAX_FRAMES,
            "max_compute_ms": model.config.max_compute_ms, "max_in_flight": limit.max_in_flight, "max_reply_bytes": server.max_worker_message_bytes,
            "max_priority": limit.max_priority,
        }
        return self.supervisor.direct.lease(conn.identity, model, limit, limits, self.supervisor.access.required_gids(conn.peer, "infer", model.name))

    def _cancel(self, route: Route, target: Any) -> dict[str, Any]:
        task = self.supervisor.dispatcher.queued_for(route.conn.conn_id, target) if isinstance(target, int) else None
        if task is None or task.done:
            return {"cancelled": False}
        self.supervisor.dispatcher.remove_queued(task)
        self.supervisor.replies.fail(task, DeadlineExceeded("cancelled by the client before it ran"))
        return {"cancelled": True}
