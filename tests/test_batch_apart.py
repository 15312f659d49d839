"""Whose direct requests are batched apart after a batch of several uids' crashed a worker
(daemon/direct/batch_apart.py): the table the supervisor keeps and sends, the crashed run's uids as the
deadline page names them, and how a batch is taken with some identities apart (attacker rounds 81, 82)."""
from __future__ import annotations

from typing import Iterator

import msgpack
import pytest

from openinfer.daemon.direct.batch_apart import ALL, EVERYONE, MAX_ENTRIES, BatchApart
from openinfer.daemon.direct.deadline_page import MAX_NAMED, DeadlinePage
from openinfer.daemon.scheduling.taskqueue import TaskQueue
from test_taskqueue import drain, ids, make_task

pytestmark = pytest.mark.unit

SECOND = 1_000_000_000


def test_the_crashed_runs_uids_are_apart_until_their_time_and_no_one_else_is() -> None:
    apart = BatchApart()
    assert apart.now(0) is None
    apart.keep_apart(frozenset({"uid=5", "uid=7"}), 10 * SECOND, 0)
    now = apart.now(SECOND)
    assert now is not None and "uid=5" in now and "uid=7" in now and "uid=0" not in now
    apart.keep_apart(frozenset({"uid=9"}), 20 * SECOND, 2 * SECOND)
    assert sorted(apart.now(15 * SECOND) or ()) == ["uid=9"]  # the first crash's window is over
    assert apart.now(20 * SECOND) is None and not apart


def test_a_run_not_named_keeps_everyone_apart_and_so_does_a_table_grown_too_large() -> None:
    apart = BatchApart()
    apart.keep_apart(frozenset(), 10 * SECOND, 0)
    assert apart.now(0) is ALL and "uid=1" in ALL
    crowded = BatchApart()
    crowded.keep_apart(frozenset(f"uid={n}" for n in range(MAX_ENTRIES + 1)), 10 * SECOND, 0)
    assert crowded.until_ns == {EVERYONE: 10 * SECOND}


def test_the_table_crosses_the_channel_whole_and_a_malformed_one_is_refused() -> None:
    apart = BatchApart()
    apart.keep_apart(frozenset({"uid=5"}), 10 * SECOND, 0)
    assert BatchApart.decode(apart.encode()).until_ns == {"uid=5": 10 * SECOND}
    for raw in (msgpack.packb([1, 2]), msgpack.packb({"uid=5": "soon"}), msgpack.packb({1: 2}), msgpack.packb({f"uid={n}": 1 for n in range(MAX_ENTRIES + 1)}), b"\xc1"):
        with pytest.raises(ValueError):
            BatchApart.decode(raw)


@pytest.fixture()
def page() -> Iterator[DeadlinePage]:
    shared = DeadlinePage.create("batch-apart-test")
    yield shared
    shared.close()


def test_the_deadline_page_names_every_uid_of_a_run(page: DeadlinePage) -> None:
    assert page.run_owners() is None
    page.running(1, 2, [5])
    assert page.run_owners() == {"uid=5"}
    page.running(1, 2, [5, 7, 0])
    assert page.run_owners() == {"uid=5", "uid=7", "uid=0"}
    page.running(1, 2, list(range(MAX_NAMED + 1)))  # too many to name
    assert page.run_owners() == frozenset()
    page.running(1, 2, None)
    assert page.run_owners() == frozenset()
    page.idle()
    assert page.run_owners() is None


def test_the_supervisor_reads_the_workers_words_and_trusts_none_out_of_range(page: DeadlinePage) -> None:
    page.running(1, 2, [5])
    for count, uid_word in ((MAX_NAMED + 1, 6), (-7, 6), (1, 0), (1, 2**32 + 1), (1, -3)):
        page.words[2], page.words[3] = count, uid_word
        assert page.run_owners() == frozenset(), (count, uid_word)


def test_an_identity_apart_batches_with_its_own_only_and_the_others_without_it() -> None:
    queue = TaskQueue()
    for task_id, client in enumerate(["a", "b", "c", "a", "b", "c"]):
        queue.append(make_task(task_id, client=client))
    apart = {"a", "b"}
    assert ids(queue.take_batch(8, apart)) == [0, 3]  # a's: with its own only
    assert ids(queue.take_batch(8, apart)) == [1, 4]
    assert drain(queue) == [2, 5]
    for task_id, client in enumerate(["c", "a", "d", "c", "d"]):
        queue.append(make_task(task_id, client=client))
    assert sorted(ids(queue.take_batch(8, apart))) == [0, 2, 3, 4]  # c's and d's together, never a's
    assert drain(queue) == [1]
