"""When a batch leaves before its delay is up: the rules the supervisor's dispatcher and a worker's own
queue (the direct path) share."""
from __future__ import annotations


def batch_size_now(queued: int, max_batch_size: int, preferred: tuple[int, ...]) -> int:
    """How many tasks to send before the delay is up: a full batch, else the largest preferred size the
    queue can fill (Triton's rule), else none (wait for more)."""
    if queued >= max_batch_size:
        return max_batch_size
    fitting = [size for size in preferred if size <= queued]
    return max(fitting) if fitting else 0


def latest_hold_ns(enqueued_ns: int, deadline_ns: int, compute_ns: int = 0) -> int:
    """The latest a request queued at `enqueued_ns` may be held back for company: after half the time it
    had left, or closer to its deadline than the model's recent compute (`compute_ns`, 0 if unknown), it
    would rather run alone. Without this, a batch delay longer than a client's timeout held a lone
    request, a worker free, until it was answered DEADLINE_EXCEEDED without having run."""
    return min(enqueued_ns + (deadline_ns - enqueued_ns) // 2, deadline_ns - compute_ns)


# A usual batch compute that no batch has confirmed for this long (or twice itself, if longer) is forgotten.
FORGET_MIN_NS = 1_000_000_000


def after_batch(estimate: float | None, compute: float) -> float:
    """The usual compute of the model's batches (an EWMA, 0.9 / 0.1) after a batch took `compute`. A
    request whose deadline falls sooner runs alone (dispatch.py, worker/direct_queue.py), so one batch
    made slow on purpose (a row whose value sets the loop count) must not raise it far: each batch counts
    at most twice the estimate. Round 90: one 7 s batch put it at 7 s, and every request with a shorter
    timeout ran alone from then on (the victims' answers/s -75 %, on both paths). `estimate` is what
    usual_batch returns: after a forgotten one, a batch starts it afresh."""
    if estimate is None:
        return compute
    return 0.9 * estimate + 0.1 * min(compute, 2.0 * estimate)


def usual_batch(estimate: float | None, ended_ns: int, now_ns: int, unit_ns: int) -> float | None:
    """The estimate (in units of `unit_ns`) while a batch has ended within max(FORGET_MIN_NS, twice the
    estimate) of `now_ns`, else None: once every request with a shorter deadline is kept out of batches,
    no batch ends to bring a too-high estimate down (round 90: the model's first batch, made slow on
    purpose, kept them out for good); forgotten, they batch again and the next batch says what batches
    take now. What ran alone never lowers it: the input may set the compute (round 91: requests of no
    work, run alone, brought it under their own timeout, and they stopped 600 ms batches)."""
    if estimate is None or now_ns - ended_ns >= max(FORGET_MIN_NS, 2 * estimate * unit_ns):
        return None
    return estimate


STOPPER_ALONE_NS = 10_000_000_000  # how long a client whose request stopped a batch has such requests run alone
MAX_STOPPERS = 4096


class BatchStoppers:
    """Clients (identities) one of whose requests stopped a batch at its own deadline - a timeout shorter
    than the batch's run: for STOPPER_ALONE_NS their requests with a timeout up to twice that one run
    alone. The usual batch compute keeps most such requests out beforehand, but it is one average over
    every batch, whatever the inputs, and a client's own batches of cheap requests pull it down (round
    92); its short-timeout requests then joined another client's slow batches and stopped them again and
    again (the waste of round 27). This holds the client to what its own timeouts showed; its requests
    with longer timeouts - and everyone else's - batch as before (one uid is often several programs: a
    penalty on all its requests cost an honest one with long timeouts its batches too). Longer timeouts
    to come each raise the bar: to stop batches again and again a client must double its timeout each
    time, and it soon outlasts the batch."""

    def __init__(self) -> None:
        self._until: dict[str, tuple[int, int]] = {}  # identity -> (until_ns, the longest timeout that stopped a batch, ns)

    def stopped(self, identity: str, timeout_ns: int, now_ns: int) -> None:
        until = self._until
        kept = until.get(identity)
        if kept is None and len(until) >= MAX_STOPPERS:
            for key in [key for key, (at_ns, _) in until.items() if at_ns <= now_ns]:
                del until[key]
            if len(until) >= MAX_STOPPERS:
                return  # (every entry still counts: this one is not kept, and batches as before)
        if kept is not None and kept[0] > now_ns:
            timeout_ns = max(timeout_ns, kept[1])
        until[identity] = (now_ns + STOPPER_ALONE_NS, timeout_ns)

    def alone(self, identity: str, timeout_ns: int, now_ns: int) -> bool:
        kept = self._until.get(identity)
        return kept is not None and now_ns < kept[0] and timeout_ns <= 2 * kept[1]
