"""Work to do before the serve policy, because under it the same work would fail.

The serve policy refuses every file open, so anything a library does lazily (an import, a first-use
helper thread) must have happened already. pyzmq is the one measured here: its first zero-copy send of a
frame above zmq.COPY_THRESHOLD imports zmq.utils.garbage and starts a collector thread with its own
context and PUSH socket. Under the serve policy that import fails mid-send and leaves a half-sent
multipart message on the channel.
"""
from __future__ import annotations

from typing import Any


def prime_zero_copy_sends(context: Any) -> None:
    """Make pyzmq's zero-copy machinery exist now: one zero-copy send over a private inproc pair.

    `context` is the worker's zmq.Context (typed loosely so this module does not import zmq for callers
    that never use it).
    """
    import zmq

    endpoint = f"inproc://openinfer-prime-zero-copy-{id(context)}"
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        sender.bind(endpoint)
        receiver.connect(endpoint)
        sender.send(memoryview(bytearray(2 * zmq.COPY_THRESHOLD)), copy=False)
        receiver.recv(copy=False)
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
