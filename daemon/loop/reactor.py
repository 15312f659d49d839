"""The supervisor's one event loop primitive: epoll over file descriptors, each with its own handler.

Level-triggered: a handler that leaves data unread is simply called again on the next pass, so no
handler has to drain its fd to exhaustion (a flood on one connection cannot starve the others).
"""
from __future__ import annotations

import select
from typing import Callable

Handler = Callable[[int], object]  # called with the epoll event mask; what it returns is ignored

READABLE = select.EPOLLIN
WRITABLE = select.EPOLLOUT
HANGUP = select.EPOLLERR | select.EPOLLHUP


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}

    def add(self, fd: int, handler: Handler, mask: int = READABLE) -> None:
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler
        self._masks[fd] = mask

    def modify(self, fd: int, mask: int) -> None:
        """Change what `fd` is watched for (e.g. add WRITABLE while a reply waits to be written)."""
        if self._masks.get(fd) != mask:
            self._epoll.modify(fd, mask)
            self._masks[fd] = mask

    def mask_of(self, fd: int) -> int:
        return self._masks.get(fd, 0)

    def remove(self, fd: int) -> None:
        """Forget `fd` (before it is closed: epoll drops closed fds itself, but our tables would not)."""
        if self._handlers.pop(fd, None) is not None:
            self._masks.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def __contains__(self, fd: int) -> bool:
        return fd in self._handlers

    def poll(self, timeout_s: float) -> list[tuple[int, int]]:
        try:
            return self._epoll.poll(timeout_s)
        except InterruptedError:
            return []

    def dispatch(self, events: list[tuple[int, int]]) -> None:
        """Call each ready fd's handler. A handler may remove other fds: those are skipped."""
        handlers = self._handlers
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler(mask)

    def close(self) -> None:
        self._handlers.clear()
        self._masks.clear()
        self._epoll.close()
