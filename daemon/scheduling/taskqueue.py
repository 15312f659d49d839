"""A model's queue of tasks not yet sent to a worker.

Order, written down because clients depend on it (docs/PROTOCOL.md, `priority`):
- higher `priority` first (0..9, default 0);
- within one priority, clients take turns (round robin by the kernel-proven identity: uid, CURVE key;
  never the self-chosen `client` name, which a flooder could rotate to take extra turns), so one
  identity flooding a model delays only itself; each identity's own requests stay in arrival order;
- aging: a task that has waited longer than `starvation_ms` is taken before any higher-priority task,
  so low priorities are delayed, never starved; among such aged tasks (the top priority's included),
  identities take turns too (the one whose last aged turn is least recent first). Taken oldest-first, aging once let one identity
  keep 240 requests at priority 1 behind a few at 9: all older than another identity's priority-0
  request, which waited the whole backlog (25 s with 125 ms runs) instead of starvation_ms (round 11).

One implementation for both queues: the supervisor's (tasks from the front door) and each worker's own
(requests sent to it on the direct path, worker/direct_queue.py); both hold `Queued` items.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Container
from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar


class Queued(Protocol):
    priority: int
    identity: str  # whose turn it is: the kernel-proven identity
    enqueued_ns: int
    batch_key: Any  # items with equal keys (not None) may run as one batch
    rows: int


Task = TypeVar("Task", bound=Queued)


class TaskQueue(Generic[Task]):
    def __init__(self, starvation_ms: int = 1000) -> None:
        self._levels: dict[int, OrderedDict[str, deque[Task]]] = {}
        self._len = 0
        self._starvation_ns = starvation_ms * 1_000_000
        self._aged_turns: dict[str, int] = {}  # identity -> the number of its last aged turn
        self._aged_count = 0

    @property
    def starvation_ms(self) -> int:
        return self._starvation_ns // 1_000_000

    @starvation_ms.setter
    def starvation_ms(self, value: int) -> None:
        self._starvation_ns = value * 1_000_000

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Task]:
        for level in self._levels.values():
            for tasks in level.values():
                yield from tasks

    def take_first(self, wanted: Callable[[Task], bool]) -> Task | None:
        """The first queued item `wanted` accepts, looked for as popleft chooses (highest priority first,
        identities in their turn order, each one's items in arrival order; no aging), and its identity's
        turn is spent on it as popleft spends it: taken without, one identity that kept such items queued
        was first every time (round 90). None when there is none."""
        levels = self._levels
        for priority in sorted(levels, reverse=True):
            level = levels[priority]
            found = next(((identity, task) for identity, tasks in level.items() for task in tasks if wanted(task)), None)
            if found is None:
                continue
            identity, task = found
            self.remove(task)
            if identity in level:  # (more of its items queued: its turn is spent, as popleft spends it)
                level.move_to_end(identity)
            return task
        return None

    def identities(self) -> set[str]:
        """Every identity with something queued."""
        return {identity for level in self._levels.values() for identity in level}

    def queued_by(self, identity: str) -> Iterator[Task]:
        """One identity's queued items (each level's, in arrival order): what a cancel looks through,
        never the others' (round 14: a scan of every queue let one uid's cancels cost in proportion to
        everyone's backlog)."""
        for level in list(self._levels.values()):
            tasks = level.get(identity)
            if tasks is not None:
                yield from tasks

    def append(self, task: Task) -> None:
        level = self._levels.get(task.priority)
        if level is None:
            level = self._levels[task.priority] = OrderedDict()
        tasks = level.get(task.identity)
        if tasks is None:
            tasks = level[task.identity] = deque()
        tasks.append(task)
        self._len += 1

    def appendleft(self, task: Task) -> None:
        """Put back a task that was taken but never ran: it goes first again."""
        level = self._levels.setdefault(task.priority, OrderedDict())
        level.setdefault(task.identity, deque()).appendleft(task)
        level.move_to_end(task.identity, last=False)
        self._len += 1

    def put_back(self, task: Task) -> None:
        """Put back a task whose turn was spent (a member of a batch that failed, to run alone): first of
        its identity's again, but its identity keeps its place in the turns - appendleft gave it the next
        turn too (round 19's attacker)."""
        level = self._levels.setdefault(task.priority, OrderedDict())
        level.setdefault(task.identity, deque()).appendleft(task)
        self._len += 1

    def popleft(self) -> Task:
        if not self._len:
            raise IndexError("pop from an empty TaskQueue")
        levels = self._levels
        top = max(levels)
        chosen = top
        client = None
        if len(levels) > 1:  # aging: a task that waited past starvation_ms may jump the queue
            aged = self._aged(time.monotonic_ns() - self._starvation_ns)
            if aged is not None:
                chosen, client = aged
        level = levels[chosen]
        if client is None:
            client = next(iter(level))
        tasks = level[client]
        task = tasks.popleft()
        if tasks:
            level.move_to_end(client)  # next turn goes to the next client
        else:
            del level[client]
            if not level:
                del levels[chosen]
        self._len -= 1
        return task

    def _aged(self, cutoff_ns: int) -> tuple[int, str] | None:
        """(priority, identity) of the aged task to take next, or None. Every identity's oldest task at
        each level counts, the top level's included, if it was queued before `cutoff_ns`; of those, the
        identity whose last aged turn is least recent (never: first) wins, then the oldest. Looking only
        at each level's turn (round 12's cheaper look) let an identity that held the turn at a victim's
        level hide it behind its own older requests elsewhere (round 13: 10 s); leaving the top level out
        let an aged backlog below hold a top-priority request (round 12). Only with mixed priorities:
        one look per queued identity and level."""
        best: tuple[int, str] | None = None
        best_turn = best_age = 0
        turns = self._aged_turns
        for priority, level in self._levels.items():
            for identity, tasks in level.items():
                enqueued = tasks[0].enqueued_ns
                if enqueued >= cutoff_ns:
                    continue
                turn = turns.get(identity, -1)
                if best is None or (turn, enqueued) < (best_turn, best_age):
                    best, best_turn, best_age = (priority, identity), turn, enqueued
        if best is not None:
            if len(turns) >= 4096:  # identities long gone: forgetting them only gives them an early turn
                turns.clear()
            turns[best[1]] = self._aged_count
            self._aged_count += 1
        return best

    def take_batch(self, max_rows: int, apart: Container[str] | None = None) -> list[Task]:
        """The next task (as `popleft` chooses it) and, after it, queued tasks with its batch key while
        the batch stays within `max_rows` rows and tasks: highest priority first, then by client turn,
        each client's in arrival order. An identity in `apart` is batched with its own tasks only: the
        first one's alone when it is, else no one's in it (direct/batch_apart.py). Tasks passed
        over keep their places. One pass over the queue, no per-task `remove` (that made taking a batch
        of 16 quadratic)."""
        first = self.popleft()
        batch = [first]
        key = first.batch_key
        if key is None:
            return batch
        rows = first.rows
        levels = self._levels
        for priority in sorted(levels, reverse=True):
            level = levels[priority]
            if apart is None:
                clients = list(level)
            elif first.identity in apart:
                clients = [first.identity] if first.identity in level else []
            else:
                clients = [client for client in level if client not in apart]
            for client in clients:
                tasks = level[client]
                passed: list[Task] = []
                while tasks and len(batch) < max_rows:
                    task = tasks.popleft()
                    if task.batch_key == key and rows + task.rows <= max_rows:
                        batch.append(task)
                        rows += task.rows
                    else:
                        passed.append(task)
                if passed:
                    tasks.extendleft(reversed(passed))
                if not tasks:
                    del level[client]
                if len(batch) >= max_rows:
                    break
            if not level:
                del levels[priority]
            if len(batch) >= max_rows:
                break
        self._len -= len(batch) - 1
        return batch

    def remove(self, task: Task) -> None:
        level = self._levels.get(task.priority)
        tasks = level.get(task.identity) if level is not None else None
        if tasks is None:
            raise ValueError("task not queued")
        tasks.remove(task)
        self._len -= 1
        if not tasks:
            assert level is not None
            del level[task.identity]
            if not level:
                del self._levels[task.priority]

    def oldest_enqueued_ns(self) -> int:
        """When the longest-waiting item was queued (each identity's items are in arrival order)."""
        return min(tasks[0].enqueued_ns for level in self._levels.values() for tasks in level.values())

    def depth_by_priority(self) -> dict[str, int]:
        return {str(p): sum(len(t) for t in level.values()) for p, level in sorted(self._levels.items())}

