"""What one worker was sent and has not answered: the one owner of that state.

A worker runs one unit at a time — a single task or a batch — and may hold one more unit behind it
(pipelining: it starts the moment the running one is answered). Everything that adds to or takes from
a worker's in-flight tasks goes through these methods, so the rules live in one place: units leave in
the order they were sent, a batch leaves whole, and two bounds are kept with them: `deadline_ns`, when
the next unanswered task is due (the earliest of their deadlines, and at most the model's max_compute_ms
from when the running unit started), and `limit_ns`, the max_compute_ms bound alone.

A run that cannot be stopped at its deadline (one kernel that never checks onnxruntime's flag, a step's
own loop) has its overdue tasks answered by the supervisor while it goes on: the worker is then `stalled`.
Answered tasks stay here until the worker answers them too - its late answer is matched and dropped (a
task that waited behind the run is skipped by the worker: its deadline has passed) - and nothing more is
pipelined behind it. Only the operator's bound, `limit_ns`, gets the worker killed.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from openinfer.daemon.scheduling.tasks import Task


class Inflight:
    __slots__ = ("_tasks", "deadline_ns", "limit_ns", "stalled")

    def __init__(self) -> None:
        self._tasks: deque[Task] = deque()
        self.deadline_ns = 0  # when the next unanswered task must be answered by
        self.limit_ns = 0  # when the running unit passes its model's max_compute_ms (past it the worker is killed)
        self.stalled = False  # tasks it holds were answered overdue while the running unit goes on

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
        """What is at the front now starts running."""
        self.stalled = False
        self.limit_ns = now_ns + max_compute_ns
        self._next_deadline()

    def _next_deadline(self) -> None:
        """Every unanswered task counts, a pipelined one too: one that cannot start before its deadline
        (behind a long run) is answered then, not when the run ends."""
        deadline = self.limit_ns
        for task in self._tasks:  # (a loop, no list: this runs for every dispatch and answer)
            if task.deadline_ns < deadline and not task.done:
                deadline = task.deadline_ns
        self.deadline_ns = deadline

    # -- sending -------------------------------------------------------------------------------------
    def add(self, task: Task, now_ns: int, max_compute_ns: int) -> None:
        self._tasks.append(task)
        if len(self._tasks) == 1:
            self._started(now_ns, max_compute_ns)
        elif task.deadline_ns < self.deadline_ns:
            self.deadline_ns = task.deadline_ns

    def add_batch(self, batch: list[Task], now_ns: int, max_compute_ns: int) -> None:
        idle = not self._tasks
        self._tasks.extend(batch)
        if idle:
            self._started(now_ns, max_compute_ns)
        else:
            self.deadline_ns = min(self.deadline_ns, min(task.deadline_ns for task in batch))

    def withdraw(self, task: Task) -> bool:
        """A task that never reached the worker (its channel closed under the send)."""
        try:
            self._tasks.remove(task)
        except ValueError:
            return False
        return True

    # -- answers -------------------------------------------------------------------------------------
    def running_unit(self) -> list[Task]:
        """The tasks of the unit that runs now: the single task at the head, or its batch's members."""
        tasks = self._tasks
        if not tasks:
            return []
        head = tasks[0]
        if not head.batched:
            return [head]
        return [task for task in tasks if task.batched and task.dispatched_ns == head.dispatched_ns]

    def running_batch(self) -> list[Task]:
        """The members of the batch that runs now (empty unless the head is a batch member)."""
        tasks = self._tasks
        if not tasks or not tasks[0].batched:
            return []
        return self.running_unit()

    def stall(self) -> None:
        """Tasks were just answered overdue while the running unit goes on: the next unanswered one is due
        next, and nothing more is pipelined here (behind a run no one can tell the end of)."""
        self.stalled = True
        self._next_deadline()

    def finish_head(self, now_ns: int, max_compute_ns: int) -> Task:
        """The running single task was answered; the next unit started when the answer was sent."""
        task = self._tasks.popleft()
        self.stalled = False
        if self._tasks:
            self._started(now_ns, max_compute_ns)
        return task

    def finish_batch(self, size: int, now_ns: int, max_compute_ns: int) -> None:
        """The running batch (its first `size` tasks) was answered."""
        for _ in range(size):
            self._tasks.popleft()
        self.stalled = False
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
        self.stalled = False
        return tasks
