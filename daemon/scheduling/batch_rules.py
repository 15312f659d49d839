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


def after_batch(estimate: float | None, compute: float) -> float:
    """The usual compute of the model's batches (an EWMA, 0.9 / 0.1) after a batch took `compute`. A
    request whose deadline falls sooner runs alone (dispatch.py, worker/direct_queue.py), so one batch
    made slow on purpose (a row whose value sets the loop count) must not raise it far: each batch counts
    at most twice the estimate. Round 90: one 7 s batch put it at 7 s, and every request with a shorter
    timeout ran alone from then on (the victims' answers/s -75 %, on both paths)."""
    if estimate is None:
        return compute
    return 0.9 * estimate + 0.1 * min(compute, 2.0 * estimate)


def after_single(estimate: float | None, compute: float) -> float | None:
    """The same after a request ran alone and took `compute`: it only lowers the estimate (or starts it), a
    batch taking at least what one of its members takes alone. Once every request is kept out of batches
    no batch ends to say it came down; what ran alone does (round 90: locked for good)."""
    if estimate is None or compute < estimate:
        return compute if estimate is None else 0.9 * estimate + 0.1 * compute
    return estimate
