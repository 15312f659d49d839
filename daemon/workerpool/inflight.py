"""What one worker was sent and has not answered: the one owner of that state.

A worker runs one unit at a time — a single task or a batch — and may hold one more unit behind it
(pipelining: it starts the moment the running one is answered). Everything that adds to or takes from
a worker's in-flight tasks goes through these methods, so the rules live in one place: units leave in
the order they were sent, a batch leaves whole, and the running unit's deadline (the earliest of its
tasks' deadlines, and at most the model's max_compute_ms from when it started) is kept with them.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from openinfer.daemon.scheduling.tasks import Task


class Inflight:
    __slots__ = ("_tasks", "deadline_ns")

    def __init__(self) -> None:
        self._tasks: deque[Task] = deque()
        self.deadline_ns = 0  # when what runs now must be answered by (past it the worker is killed)

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    @property
    def head(self) -> "Task | None":
        """The first task of the running unit."""
        return self._tasks[0] if self._tasks else None

    def one_unit(self) -> bool:
        """It holds exactly one unit (a single task, or the members of one batch) and nothing behind it."""
        tasks = self._tasks
        return bool(tasks) and tasks[0].dispatched_ns == tasks[-1].dispatched_ns

    def overdue(self, now_ns: int) -> bool:
        return bool(self._tasks) and now_ns >= self.deadline_ns

    def _started(self, now_ns: int, max_compute_ns: int) -> None:
        """What is at the front now starts running (the tasks behind it wait: their deadlines count later)."""
        self.deadline_ns = min(min(task.deadline_ns for task in self._tasks), now_ns + max_compute_ns)

    # -- sending -------------------------------------------------------------------------------------
    def add(self, task: Task, now_ns: int, max_compute_ns: int) -> None:
        if not self._tasks:
            self.deadline_ns = min(task.deadline_ns, now_ns + max_compute_ns)
        self._tasks.append(task)

    def add_batch(self, batch: list[Task], now_ns: int, max_compute_ns: int) -> None:
        """A batch behind a running unit gets its deadline when that one is answered."""
        if not self._tasks:
            self.deadline_ns = min(min(task.deadline_ns for task in batch), now_ns + max_compute_ns)
        self._tasks.extend(batch)

    def withdraw(self, task: Task) -> bool:
        """A task that never reached the worker (its channel closed under the send)."""
        try:
            self._tasks.remove(task)
        except ValueError:
            return False
        return True

    # -- answers -------------------------------------------------------------------------------------
    def running_batch(self) -> list[Task]:
        """The members of the batch that runs now (empty unless the head is a batch member)."""
        tasks = self._tasks
        if not tasks or not tasks[0].batched:
            return []
        head = tasks[0]
        return [task for task in tasks if task.batched and task.dispatched_ns == head.dispatched_ns]

    def finish_head(self, now_ns: int, max_compute_ns: int) -> Task:
        """The running single task was answered; the next unit started when the answer was sent."""
        task = self._tasks.popleft()
        if self._tasks:
            self._started(now_ns, max_compute_ns)
        return task

    def finish_batch(self, size: int, now_ns: int, max_compute_ns: int) -> None:
        """The running batch (its first `size` tasks) was answered."""
        for _ in range(size):
            self._tasks.popleft()
        if self._tasks:
            self._started(now_ns, max_compute_ns)

    def take_running(self) -> list[Task]:
        """Remove and return the running unit (the worker is being killed under it)."""
        tasks = self._tasks
        if not tasks:
            return []
        running = [tasks.popleft()]
        if running[0].batched:
            while tasks and tasks[0].batched and tasks[0].dispatched_ns == running[0].dispatched_ns:
                running.append(tasks.popleft())
        return running

    def put_back(self, tasks: Iterable[Task]) -> None:
        """Return tasks to the front, keeping their order (they did not run after all)."""
        self._tasks.extendleft(reversed(list(tasks)))

    def take_all(self) -> list[Task]:
        """Remove and return everything, in the order sent (the worker is gone)."""
        tasks = list(self._tasks)
        self._tasks.clear()
        return tasks
