"""TaskQueue order (docs/PROTOCOL.md, `priority`) and how a batch is taken from it."""
from __future__ import annotations

import random
import time
from typing import Any

import pytest

from openinfer.daemon.scheduling.taskqueue import TaskQueue
from openinfer.daemon.scheduling.tasks import Task

pytestmark = pytest.mark.unit

KEY_A = ((("x", "FP32", (64,)),), ())
KEY_B = ((("x", "FP32", (32,)),), ())


def make_task(task_id: int, client: str = "c", priority: int = 0, key: Any = KEY_A, rows: int = 1) -> Task:
    task = Task(
        task_id=task_id, request_id=task_id, route=None, identity=client, client=client, model=None,  # type: ignore[arg-type]
        header_frame=b"", data_frames=[], nbytes=0, received_ns=0, decoded_ns=0, deadline_ns=0, priority=priority,
    )
    task.enqueued_ns = time.monotonic_ns()  # just queued: no aging within a test
    task.batch_key, task.rows = key, rows
    return task


def ids(tasks: list[Task]) -> list[int]:
    return [task.task_id for task in tasks]


def drain(queue: TaskQueue) -> list[int]:
    out = []
    while queue:
        out.append(queue.popleft().task_id)
    return out


def test_a_batch_takes_the_next_task_and_those_with_its_key_up_to_the_limit() -> None:
    queue = TaskQueue()
    for i, key in enumerate([KEY_A, KEY_B, KEY_A, KEY_A, KEY_B, KEY_A]):
        queue.append(make_task(i, key=key))
    assert ids(queue.take_batch(3)) == [0, 2, 3]
    assert len(queue) == 3
    assert drain(queue) == [1, 4, 5]  # passed-over tasks keep their places


def test_rows_bound_the_batch_and_a_task_too_big_to_fit_is_passed_over() -> None:
    queue = TaskQueue()
    for i, rows in enumerate([2, 5, 1, 1, 4]):
        queue.append(make_task(i, rows=rows))
    assert ids(queue.take_batch(4)) == [0, 2, 3]  # 2 + 1 + 1 rows; 5 does not fit
    assert drain(queue) == [1, 4]


def test_higher_priority_members_join_first_and_clients_take_turns() -> None:
    queue = TaskQueue()
    queue.append(make_task(0, client="a", priority=0))
    queue.append(make_task(1, client="a", priority=0))
    queue.append(make_task(2, client="b", priority=5))
    queue.append(make_task(3, client="c", priority=5))
    queue.append(make_task(4, client="b", priority=5))
    assert ids(queue.take_batch(3)) == [2, 3, 4]  # the first is the most urgent; then its level
    assert ids(queue.take_batch(8)) == [0, 1]
    assert not queue and len(queue) == 0


def test_an_unbatchable_task_goes_alone() -> None:
    queue = TaskQueue()
    queue.append(make_task(0, key=None))
    queue.append(make_task(1, key=None))
    assert ids(queue.take_batch(8)) == [0]
    assert drain(queue) == [1]


def test_taking_batches_never_loses_or_duplicates_a_task() -> None:
    rng = random.Random(7)
    queue = TaskQueue()
    queued: set[int] = set()
    next_id = 0
    for _ in range(2000):
        if rng.random() < 0.6:
            queue.append(make_task(next_id, client=rng.choice("abc"), priority=rng.choice([0, 0, 3]), key=rng.choice([KEY_A, KEY_B, None]), rows=rng.randint(1, 4)))
            queued.add(next_id)
            next_id += 1
        elif queue:
            limit = rng.randint(1, 16)
            batch = queue.take_batch(limit)
            assert 1 <= len(batch) <= max(1, limit)
            assert len({task.batch_key for task in batch}) == 1
            if len(batch) > 1:
                assert sum(task.rows for task in batch) <= limit
            for task in batch:
                queued.remove(task.task_id)  # KeyError if taken twice or never queued
        assert len(queue) == len(queued) == len(list(queue))
    assert set(drain(queue)) == queued


def queued_long_ago(task_id: int, client: str, priority: int, order: int = 0) -> Task:
    """A task queued ~5 s ago, past any starvation_ms here; `order` ranks tasks queued that long ago."""
    task = make_task(task_id, client=client, priority=priority)
    task.enqueued_ns = time.monotonic_ns() - 5_000_000_000 + order
    return task


def test_aged_tasks_take_turns_between_identities_not_oldest_first() -> None:
    """Round 11's attacker kept a few requests at priority 9 and 240 at priority 1, all queued before
    another uid's priority-0 request: aging took the oldest aged task each time, so the victim waited
    behind the whole backlog. Aged tasks now take turns by identity."""
    queue: TaskQueue[Task] = TaskQueue(starvation_ms=100)
    for i in range(2):
        queue.append(make_task(900 + i, client="uid=65534", priority=9))
    for i in range(40):
        queue.append(queued_long_ago(100 + i, "uid=65534", 1, order=i))  # all older than the victim's
    queue.append(queued_long_ago(1, "uid=1000", 0, order=1_000_000))
    order = drain(queue)
    assert order.index(1) <= 1, order  # its turn among the aged comes at once, not after 40 older ones
    assert order[:2].count(1) == 1 and [t for t in order if t >= 100 and t < 900] == list(range(100, 140))  # each identity's own stay in order


def test_an_aged_request_at_the_top_priority_takes_its_turn_among_the_aged_below() -> None:
    """Round 12's attacker: 200 aged requests of one uid at priority 0 and another uid's one at priority
    5, itself past starvation_ms: aging only looked below the top level, so every take went to the
    backlog and the priority-5 request came 200th (12 s behind a flood on a real daemon)."""
    queue: TaskQueue[Task] = TaskQueue(starvation_ms=100)
    for i in range(200):
        queue.append(queued_long_ago(100 + i, "uid=65534", 0, order=i))
    queue.append(queued_long_ago(1, "uid=1000", 5, order=1_000))
    assert drain(queue).index(1) <= 1


def test_an_identity_holding_the_turn_at_a_victims_level_cannot_hide_it() -> None:
    """Round 13's attacker: 200 old requests at priority 9, then one at the victim's level queued before
    the victim's: aging looked only at the identity whose turn it was at each level, so the attacker's
    turn there hid the victim, which came 201st of 202."""
    queue: TaskQueue[Task] = TaskQueue(starvation_ms=100)
    for i in range(200):
        queue.append(queued_long_ago(100 + i, "uid=65534", 9, order=i))
    queue.append(queued_long_ago(999, "uid=65534", 0, order=500))
    queue.append(queued_long_ago(1, "uid=1000", 0, order=600))
    assert drain(queue).index(1) <= 1


def test_queued_by_yields_one_identitys_items_at_every_level_in_arrival_order() -> None:
    queue: TaskQueue[Task] = TaskQueue(starvation_ms=1000)
    for task_id, (client, priority) in enumerate([("uid=1", 0), ("uid=2", 0), ("uid=1", 5), ("uid=1", 0), ("uid=2", 9)]):
        queue.append(make_task(task_id, client, priority))
    assert sorted(ids(list(queue.queued_by("uid=1")))) == [0, 2, 3]
    assert ids(list(queue.queued_by("uid=3"))) == []


def test_a_task_put_back_goes_first_of_its_identity_but_keeps_the_identitys_place_in_the_turns() -> None:
    queue: TaskQueue[Task] = TaskQueue(starvation_ms=1000)
    for task_id, client in enumerate(["a", "b", "a", "b"]):
        queue.append(make_task(task_id, client))
    first = queue.popleft()  # a's turn: task 0; b's is next
    queue.put_back(first)
    assert ids([queue.popleft() for _ in range(4)]) == [1, 0, 3, 2]  # b, then a (0 again first of a's), b, a


def test_take_first_looks_in_priority_and_turn_order_and_spends_that_identitys_turn() -> None:
    """What a worker's queue runs while a batch is held (worker/direct_queue.py, round 90): the first
    item the predicate takes, as popleft would look, and its identity goes to the back of the turns -
    taken without that, an identity that kept such items queued was first every time."""
    queue: TaskQueue[Task] = TaskQueue()
    for task in (make_task(1, "a", key=None), make_task(2, "a", key=None), make_task(3, "b", key=None), make_task(4, "c"), make_task(5, "d", priority=3)):
        queue.append(task)
    alone = lambda task: task.batch_key is None  # noqa: E731
    taken = [queue.take_first(alone), queue.take_first(alone), queue.take_first(alone), queue.take_first(alone)]
    assert [t.task_id if t is not None else None for t in taken] == [1, 3, 2, None]
    assert drain(queue) == [5, 4]



def test_one_slow_batch_moves_the_usual_batch_compute_little_and_an_unconfirmed_one_is_forgotten() -> None:
    from openinfer.daemon.scheduling.batch_rules import FORGET_MIN_NS, after_batch, usual_batch

    estimate = after_batch(None, 100.0)  # the first batch starts it
    assert estimate == 100.0
    estimate = after_batch(estimate, 7_000_000.0)  # a batch made slow on purpose: at most twice counted
    assert estimate == pytest.approx(110.0)
    for _ in range(60):  # a model that truly got slower is followed, a tenth more at most each batch
        estimate = after_batch(estimate, 5_000.0)
    assert estimate > 4_000.0
    # Read back while batches end; forgotten once none has for FORGET_MIN_NS (or twice the estimate).
    assert usual_batch(estimate, 10**12, 10**12 + FORGET_MIN_NS - 1, 1000) == estimate
    assert usual_batch(estimate, 10**12, 10**12 + FORGET_MIN_NS, 1000) is None
    assert usual_batch(3e9, 10**12, 10**12 + 5 * 10**9, 1) == 3e9  # 3 s batches: kept for 6 s
    assert usual_batch(3e9, 10**12, 10**12 + 6 * 10**9, 1) is None
    assert usual_batch(None, 10**12, 10**12, 1) is None


def test_a_client_that_stopped_a_batch_runs_its_short_timeouts_alone_for_a_while_and_only_those() -> None:
    from openinfer.daemon.scheduling.batch_rules import STOPPER_ALONE_NS, BatchStoppers

    stoppers, now, ms = BatchStoppers(), 10**12, 1_000_000
    assert not stoppers.alone("uid=65534", 250 * ms, now)
    stoppers.stopped("uid=65534", 250 * ms, now)  # its 0.25 s request stopped a batch
    assert stoppers.alone("uid=65534", 250 * ms, now + 1) and stoppers.alone("uid=65534", 500 * ms, now + 1)
    assert not stoppers.alone("uid=65534", 60_000 * ms, now + 1)  # its long-timeout requests batch as before
    assert not stoppers.alone("uid=0", 250 * ms, now + 1)  # and everyone else's
    stoppers.stopped("uid=65534", 100 * ms, now + 2)  # a shorter one later keeps the bar where it was
    assert stoppers.alone("uid=65534", 500 * ms, now + 3)
    assert not stoppers.alone("uid=65534", 250 * ms, now + 2 + STOPPER_ALONE_NS)  # 10 s after the last
