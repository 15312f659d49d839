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
