"""The supervisor's event loop parts: epoll reactor, timers, signals, work off the loop."""
