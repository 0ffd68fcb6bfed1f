"""task_manager.py: what callers do to tasks (submit, read, wait, list, cancel), on real SQLite
and real PostgreSQL, with real workers running real nmap on loopback (see tests/nodes.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import update

from limits import QueueFull
from models import ScanKind, ScanResult, TaskRecord, TaskStatus, tasks
from result_store import encoded, write_found
from sharding import Shard
from task_manager import TaskNotFound
from tests.nodes import MakeNode, argv_for, big_result, finished, statements_run, submit, with_whole_result
from tests.support import Listeners, NmapWrapper, eventually, outcome_of

pytestmark = pytest.mark.anyio


def _is_task_read(sql: str) -> bool:
    """The read of one task (what a wait does when it wakes)."""
    return sql.startswith("SELECT") and "tasks.id = " in sql and "tasks.owner = " in sql


def _is_batched_read(sql: str) -> bool:
    """The read of many tasks by id, without their results (what status polls share)."""
    return sql.startswith("SELECT") and "tasks.id IN (" in sql and "tasks.result" not in sql


def _is_verdict(sql: str) -> bool:
    """The update, guarded by the worker's id, that records how its scan ended."""
    setting, _, where = sql.partition(" WHERE ")
    return setting.startswith("UPDATE tasks") and "finished_at=" in setting and "tasks.worker_id = " in where


async def test_scan_completes_within_the_wait(make_node: MakeNode, nmap_wrapper: NmapWrapper,
                                              listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node()
    record = await submit(node.tasks, nmap_wrapper, port)
    assert record.status is TaskStatus.QUEUED
    done = await finished(node.tasks, record.id, "alice", 30)
    assert done.status is TaskStatus.COMPLETED and done.result is not None
    assert [(p.port, p.state) for p in done.result.hosts[0].ports] == [(port, "open")]
    assert done.started_at is not None and done.finished_at is not None
    assert done.worker_name == "w0" and done.pool == "default"


async def test_a_wait_in_the_process_that_finished_the_scan_gets_the_verdict_without_reading_it(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners,
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(1.2)
    node = await make_node()
    record = await submit(node.tasks, nmap_wrapper, port)
    with statements_run(node.stores) as statements:
        done = await node.tasks.wait(record.id, "alice", timeout_s=30, known=record)
    verdict = next(i for i, (sql, _) in enumerate(statements) if _is_verdict(sql))
    reads = [i for i, (sql, _) in enumerate(statements) if _is_task_read(sql)]
    # Reads while it ran (the wait re-reads at least every half second), none of the verdict.
    assert reads and max(reads) < verdict, statements
    assert done.status is TaskStatus.COMPLETED and done.result is None, "a wait never reads a result"
    # The row as a read returns it.
    assert done == await node.tasks.get(record.id, "alice")


async def test_a_wait_from_a_record_read_before_the_verdict_sees_it_within_half_a_second(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node()
    stale = await submit(node.tasks, nmap_wrapper, port)
    assert (await node.tasks.wait(stale.id, "alice", timeout_s=30)).status is TaskStatus.COMPLETED
    # The verdict was published before this wait subscribed: only its capped first sleep finds it.
    started = time.monotonic()
    done = await node.tasks.wait(stale.id, "alice", timeout_s=30, known=stale)
    assert done.status is TaskStatus.COMPLETED
    assert time.monotonic() - started < 2


async def test_a_scan_longer_than_the_wait_runs_once_in_the_background(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(2)
    node = await make_node()
    record = await submit(node.tasks, nmap_wrapper, port)
    early = await node.tasks.wait(record.id, "alice", timeout_s=0.5)
    assert early.status is TaskStatus.RUNNING and early.result is None
    final = await finished(node.tasks, record.id, "alice", 30)
    assert final.status is TaskStatus.COMPLETED
    assert final.result is not None and final.result.hosts[0].ports[0].port == port
    assert len(nmap_wrapper.pids()) == 1


async def test_a_full_queue_refuses_with_a_clear_error(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node(capacity=1, max_queued=2)
    first = await submit(node.tasks, nmap_wrapper, 1)
    assert await eventually(lambda: len(nmap_wrapper.pids()) == 1, 30), "the first is running, out of the queue"
    queued = [await submit(node.tasks, nmap_wrapper, 1) for _ in range(2)]
    with pytest.raises(QueueFull, match="queue is full"):
        await submit(node.tasks, nmap_wrapper, 1)
    for record in [first, *queued]:
        await node.tasks.cancel(record.id, "alice")
    assert len(nmap_wrapper.pids()) == 1


async def test_owners_cannot_see_each_others_tasks(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    node = await make_node(worker=False)
    record = await submit(node.tasks, nmap_wrapper, 1, owner="alice")
    store = node.tasks
    for call in (store.get(record.id, "bob"), store.cancel(record.id, "bob"), store.wait(record.id, "bob", 1)):
        with pytest.raises(TaskNotFound):
            await call
    assert await store.recent("bob", None, 10) == []
    assert [r.id for r in await store.recent("alice", None, 10)] == [record.id]


async def test_concurrent_reads_share_one_query_and_each_sees_only_its_own(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    node = await make_node(worker=False)
    store = node.tasks
    alices = [await submit(store, nmap_wrapper, port, owner="alice") for port in (1, 2, 3)]
    shards = [Shard(target, argv_for(nmap_wrapper, 1, target)) for target in ("127.0.0.1", "127.0.0.2")]
    bobs = await submit(store, nmap_wrapper, 1, owner="bob", shards=shards)
    missing = "00000000-0000-4000-8000-000000000000"
    reads = [*((r.id, "alice") for r in alices), (bobs.id, "bob"), (alices[0].id, "bob"), (bobs.id, "alice"),
             (missing, "alice"), *((r.id, "alice") for r in alices)] * 5
    with statements_run(node.stores) as statements:
        answers = await asyncio.gather(*(store.get(task_id, owner) for task_id, owner in reads),
                                       return_exceptions=True)
    queries = [parameters for sql, parameters in statements if _is_batched_read(sql)]
    for (task_id, owner), got in zip(reads, answers, strict=True):
        if (task_id, owner) in {(alices[0].id, "bob"), (bobs.id, "alice"), (missing, "alice")}:
            assert isinstance(got, TaskNotFound), (task_id, owner, got)
        else:
            assert isinstance(got, TaskRecord) and (got.id, got.owner) == (task_id, owner)
    [bobs_read] = {got.id: got for got in answers if isinstance(got, TaskRecord) and got.owner == "bob"}.values()
    assert bobs_read.progress is not None, "a sharded task's progress is its shards'"
    assert len(queries) <= 2 and sum(map(len, queries)) <= 2 * 5, f"{len(reads)} reads took {len(queries)} queries"


async def test_list_all_shows_every_owners_top_level_tasks_newest_first(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    node = await make_node(worker=False)
    alices = await submit(node.tasks, nmap_wrapper, 1, owner="alice")
    shards = [Shard(target, argv_for(nmap_wrapper, 1, target)) for target in ("127.0.0.1", "127.0.0.2")]
    bobs = await submit(node.tasks, nmap_wrapper, 1, owner="bob", shards=shards)
    listed = await node.tasks.recent(None, None, 10)
    assert [(r.owner, r.id) for r in listed] == [("bob", bobs.id), ("alice", alices.id)]
    assert [r.id for r in await node.tasks.recent(None, TaskStatus.QUEUED, 1)] == [bobs.id]
    assert await node.tasks.recent(None, TaskStatus.RUNNING, 10) == []


async def test_list_filters_by_status_newest_first(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    node = await make_node()
    first = await submit(node.tasks, nmap_wrapper, 1)
    second = await submit(node.tasks, nmap_wrapper, 1)
    await node.tasks.wait(first.id, "alice", 30)
    await node.tasks.wait(second.id, "alice", 30)
    assert [r.id for r in await node.tasks.recent("alice", TaskStatus.COMPLETED, 10)] == [second.id, first.id]
    assert await node.tasks.recent("alice", TaskStatus.RUNNING, 10) == []


async def test_a_wait_is_woken_by_a_change_made_in_another_process(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    runner = await make_node()
    waiter = await make_node(worker=False)
    record = await submit(waiter.tasks, nmap_wrapper, port)
    started = time.monotonic()
    final = await finished(waiter.tasks, record.id, "alice", 30)
    assert final.status is TaskStatus.COMPLETED
    # The scan itself takes well under a second; the wake-up comes from the feed, not a timeout.
    assert time.monotonic() - started < 5
    assert runner.worker is not None and final.worker_name == runner.worker.info.name


async def test_identical_shared_submissions_get_one_task_across_processes(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(2)
    first = await make_node(worker=False)
    second = await make_node(worker=False)
    argv = argv_for(nmap_wrapper, 1)
    results = await asyncio.gather(*(
        node.tasks.submit("alice", ScanKind.QUICK, "127.0.0.1", argv, 60, share=True)
        for node in (first, second, first, second)
    ))
    assert len({submitted.record.id for submitted in results}) == 1
    assert sorted(submitted.reused for submitted in results) == [False, True, True, True]
    other, reused, _ = await first.tasks.submit("bob", ScanKind.QUICK, "127.0.0.1", argv, 60, share=True)
    assert not reused and other.id != results[0].record.id


async def test_reading_a_big_result_is_not_cut_by_the_database_deadline(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """The deadline is the database's: parsing a result of 5,000 hosts is not counted against it
    (the read gives the result compressed, its hosts parsed by the reader). The deadline is set
    to half the parse time measured here, so the test holds on any machine: reading the stored
    text takes a small fraction of parsing it."""
    node = await make_node(worker=False)
    record = await submit(node.tasks, nmap_wrapper, 1)
    stored = encoded(record.id, outcome_of(big_result(5_000)))
    with node.stores.db.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == record.id).values(
            status=TaskStatus.COMPLETED.value, finished_at=time.time(), **stored.columns))
        write_found(conn, stored)
    started = time.monotonic()
    ScanResult.model_validate_json(big_result(5_000).model_dump_json())
    node.stores.db.timeout_s = (time.monotonic() - started) / 2
    read = await with_whole_result(node.tasks, record.id)
    assert read.result is not None and len(read.result.hosts) == 5_000
    assert read.result == big_result(5_000)
