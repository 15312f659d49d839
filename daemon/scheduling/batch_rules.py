"""When a batch leaves before its delay is up: the rule the supervisor's dispatcher and a worker's own
queue (the direct path) share."""
from __future__ import annotations


def batch_size_now(queued: int, max_batch_size: int, preferred: tuple[int, ...]) -> int:
    """How many tasks to send before the delay is up: a full batch, else the largest preferred size the
    queue can fill (Triton's rule), else none (wait for more)."""
    if queued >= max_batch_size:
        return max_batch_size
    fitting = [size for size in preferred if size <= queued]
    return max(fitting) if fitting else 0
