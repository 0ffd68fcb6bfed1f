"""task_manager.py and worker.py on real SQLite and real PostgreSQL, running real nmap on loopback.

A "node" here is what one process of the service holds: a store (its own engine) and,
unless it serves the API only, a worker. Two nodes on one database behave like two processes
for everything that goes through the database.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import make_url

import task_manager
from inventory import HostQuery
from models import ScanKind, TaskStatus, task_hosts, tasks
from scanner import ScanOutcome, build_argv
from task_manager import (
    DatabaseUnavailable,
    QueueFull,
    Shard,
    Submitted,
    TaskAlreadyFinished,
    TaskManager,
    TaskNotFound,
    TaskRecord,
    WorkerInfo,
    create_db_engine,
    heard_key,
    upgrade_schema,
    wait_set,
)
from tests.support import POSTGRES_ADMIN_URL, Listeners, NmapWrapper, process_alive
from worker import Worker, resolve_expired_forever

pytestmark = pytest.mark.anyio


@dataclass
class Node:
    store: TaskManager
    worker: Worker | None
    reaper: asyncio.Task[None]

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        self.reaper.cancel()
        await asyncio.gather(self.reaper, return_exceptions=True)
        await self.store.stop()


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(database_url: str) -> AsyncIterator[MakeNode]:
    nodes: list[Node] = []

    async def make(capacity: int = 4, max_queued: int = 50, grace: float = 0.5, lease: float = 30.0,
                   pool: str = "default", worker: bool = True) -> Node:
        store = TaskManager(create_db_engine(database_url), max_queued=max_queued, lease_seconds=lease)
        await store.start()
        scan_worker = Worker(store, name=f"w{len(nodes)}", pool=pool, capacity=capacity, grace_seconds=grace)
        if worker:
            await scan_worker.start()
        reaper = asyncio.create_task(resolve_expired_forever(store, max(lease / 4, 0.2)))
        node = Node(store, scan_worker if worker else None, reaper)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.stop()


def argv_for(nmap: NmapWrapper, port: int, target: str = "127.0.0.1") -> list[str]:
    return build_argv(str(nmap.path), ["-sT", "-p", str(port)], [target], ipv6=False, privileged=False)


async def submit(store: TaskManager, nmap: NmapWrapper, port: int, owner: str = "alice", limit: int = 120,
                 **options: object) -> TaskRecord:
    record = (await store.submit(owner, ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap, port), limit, **options)).record
    return record


async def test_a_loop_waiting_on_an_event_stops_when_cancelled_as_the_event_is_set() -> None:
    """The race that kept a scheduler alive after its process stopped, on Python 3.11's wait_for."""
    changed = asyncio.Event()
    woken = 0

    async def wait_forever() -> None:
        nonlocal woken
        while True:
            changed.clear()
            await wait_set(changed, 30)
            woken += 1

    loop = asyncio.create_task(wait_forever())
    await asyncio.sleep(0.05)
    changed.set()
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(loop, 2)
    assert woken == 0


def test_a_process_hears_other_processes_notifications_and_not_its_own() -> None:
    assert heard_key("a1b2 queue:dmz", "a1b2") is None
    assert heard_key("c3d4 queue:dmz", "a1b2") == "queue:dmz"
    assert heard_key("0b1e8a4c-6f1d-4a54-9b1e-3f1f0a2b7c9d", "a1b2") == "0b1e8a4c-6f1d-4a54-9b1e-3f1f0a2b7c9d"


async def test_a_pooled_postgresql_connection_that_died_while_idle_is_replaced_unseen(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(task_manager, "PING_IDLE_SECONDS", 0.2)
    store = TaskManager(create_db_engine(postgres_url), max_queued=10)
    await store.start()
    try:
        await store.ping()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid() AND query NOT LIKE 'LISTEN%%'", (make_url(postgres_url).database,)).fetchone()
        assert ended is not None and ended[0] >= 1
        await asyncio.sleep(0.3)  # idle past PING_IDLE_SECONDS: pinged, found dead, replaced
        await store.ping()
    finally:
        await store.stop()


async def test_a_sqlite_database_locked_past_its_busy_timeout_is_unavailable(
    tmp_path: Path, nmap_wrapper: NmapWrapper
) -> None:
    """The writing BEGIN goes to the driver directly, so its errors arrive as sqlite3's own."""
    store = TaskManager(create_db_engine(f"sqlite:///{tmp_path / 'tasks.db'}"), max_queued=10)
    await store.start()
    holder = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(DatabaseUnavailable, match="not reachable"):
            await submit(store, nmap_wrapper, 1)
        holder.execute("ROLLBACK")
        assert (await submit(store, nmap_wrapper, 1)).status is TaskStatus.QUEUED
    finally:
        holder.close()
        await store.stop()


async def test_scan_completes_within_the_wait(make_node: MakeNode, nmap_wrapper: NmapWrapper,
                                              listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node()
    record = await submit(node.store, nmap_wrapper, port)
    assert record.status is TaskStatus.QUEUED
    done = await node.store.wait(record.id, "alice", timeout=30)
    assert done.status is TaskStatus.COMPLETED and done.result is not None
    assert [(p.port, p.state) for p in done.result.hosts[0].ports] == [(port, "open")]
    assert done.started_at is not None and done.finished_at is not None
    assert done.worker_name == "w0" and done.pool == "default"


async def test_a_wait_in_the_process_that_finished_the_scan_gets_the_verdict_without_reading_it(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners, monkeypatch: pytest.MonkeyPatch,
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(1.2)
    node = await make_node()
    record = await submit(node.store, nmap_wrapper, port)
    read_statuses: list[TaskStatus] = []
    read = node.store._read

    def counted_read(task_id: str, owner: str) -> TaskRecord:
        found = read(task_id, owner)
        read_statuses.append(found.status)
        return found

    monkeypatch.setattr(node.store, "_read", counted_read)
    done = await node.store.wait(record.id, "alice", timeout=30, known=record)
    # Reads while it ran (the wait re-reads at least every half second), none of the verdict.
    assert read_statuses and set(read_statuses) == {TaskStatus.RUNNING}
    assert done.status is TaskStatus.COMPLETED and done.result is not None
    assert done == await node.store.get(record.id, "alice", with_result=True)  # the row as a read returns it, result and all


async def test_a_wait_from_a_record_read_before_the_verdict_sees_it_within_half_a_second(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node()
    stale = await submit(node.store, nmap_wrapper, port)
    assert (await node.store.wait(stale.id, "alice", timeout=30)).status is TaskStatus.COMPLETED
    # The verdict was published before this wait subscribed: only its capped first sleep finds it.
    started = time.monotonic()
    done = await node.store.wait(stale.id, "alice", timeout=30, known=stale)
    assert done.status is TaskStatus.COMPLETED and done.result is not None
    assert time.monotonic() - started < 2


async def test_a_scan_longer_than_the_wait_runs_once_in_the_background(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(2)
    node = await make_node()
    record = await submit(node.store, nmap_wrapper, port)
    early = await node.store.wait(record.id, "alice", timeout=0.5)
    assert early.status is TaskStatus.RUNNING and early.result is None
    final = await node.store.wait(record.id, "alice", timeout=30)
    assert final.status is TaskStatus.COMPLETED
    assert final.result is not None and final.result.hosts[0].ports[0].port == port
    assert len(nmap_wrapper.pids()) == 1


async def test_concurrency_is_bounded_and_every_task_runs_once(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(0.6)
    node = await make_node(capacity=2)
    records = [await submit(node.store, nmap_wrapper, port) for _ in range(6)]
    peak = 0
    waits = asyncio.gather(*(node.store.wait(r.id, "alice", timeout=60) for r in records))
    while not waits.done():
        peak = max(peak, len(nmap_wrapper.alive()))
        await asyncio.sleep(0.01)
    finals = await waits
    assert peak == 2
    assert all(f.status is TaskStatus.COMPLETED for f in finals)
    assert len(nmap_wrapper.pids()) == 6


async def test_a_full_queue_refuses_with_a_clear_error(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node(capacity=1, max_queued=2)
    first = await submit(node.store, nmap_wrapper, 1)
    assert (await node.store.wait(first.id, "alice", timeout=0.5)).status is TaskStatus.RUNNING
    queued = [await submit(node.store, nmap_wrapper, 1) for _ in range(2)]
    with pytest.raises(QueueFull, match="queue is full"):
        await submit(node.store, nmap_wrapper, 1)
    for record in [first, *queued]:
        await node.store.cancel(record.id, "alice")
    assert len(nmap_wrapper.pids()) == 1


async def test_cancel_kills_nmap_and_records_cancelled(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node(capacity=1)
    assert node.worker is not None
    running = await submit(node.store, nmap_wrapper, 1)
    queued = await submit(node.store, nmap_wrapper, 1)
    assert (await node.store.wait(running.id, "alice", timeout=0.5)).status is TaskStatus.RUNNING
    assert await wait_for(lambda: len(nmap_wrapper.pids()) == 1)
    [pid] = nmap_wrapper.pids()
    assert (await node.store.cancel(running.id, "alice")).status is TaskStatus.CANCELLED
    await node.worker.wait_stopped(running.id, 5)
    assert not process_alive(pid)
    assert (await node.store.cancel(queued.id, "alice")).status is TaskStatus.CANCELLED
    assert nmap_wrapper.pids() == [pid]
    with pytest.raises(TaskAlreadyFinished, match="already cancelled"):
        await node.store.cancel(queued.id, "alice")


async def wait_for(condition: Callable[[], bool], timeout: float = 5) -> bool:
    """Poll `condition` while the event loop (and the worker on it) keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        await asyncio.sleep(0.02)
    return condition()


async def test_a_submission_hands_the_pools_oldest_task_to_a_free_local_worker(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    """The claim made in the submitting transaction follows the queue's order, as the claim
    loop would: an older queued task goes first. A worker with no slot free claims nothing."""
    [port] = listeners.open_free_top_ports(1)
    node = await make_node(worker=False)  # no claim loop: only hand-overs start scans here
    worker = Worker(node.store, name="direct", pool="default", capacity=1, grace_seconds=0.5)
    try:
        nmap_wrapper.set_delay(1.5)
        older = await submit(node.store, nmap_wrapper, port)
        newer = await worker.hand_over(lambda to: node.store.submit(
            "alice", ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap_wrapper, port), 120, claim_for=to))
        assert newer.claimed is not None and newer.claimed.id == older.id != newer.record.id
        assert await wait_for(lambda: worker.running == 1)
        full = await worker.hand_over(lambda to: node.store.submit(
            "alice", ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap_wrapper, port), 120, claim_for=to))
        assert full.claimed is None
        final = await node.store.wait(older.id, "alice", timeout=30)
        assert final.status is TaskStatus.COMPLETED and final.worker_name == "direct"
        for waiting in (newer.record, full.record):
            assert (await node.store.get(waiting.id, "alice")).status is TaskStatus.QUEUED
        assert await wait_for(lambda: worker.running == 0)
        nmap_wrapper.set_delay(0)
        own = await worker.hand_over(lambda to: node.store.submit(
            "alice", ScanKind.QUICK, "127.0.0.1", argv_for(nmap_wrapper, port), 120, claim_for=to))
        assert own.claimed is not None and own.claimed.id == newer.record.id, "the slot was given back"
    finally:
        await worker.stop()


async def test_a_caller_cancelled_during_a_hand_over_does_not_strand_its_task(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node(worker=False)
    worker = Worker(node.store, name="direct", pool="default", capacity=1, grace_seconds=0.5)
    submitting = asyncio.Event()

    async def submit_later(to: WorkerInfo | None) -> Submitted:
        await submitting.wait()
        return await node.store.submit("alice", ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap_wrapper, port), 120,
                                       claim_for=to)

    try:
        caller = asyncio.create_task(worker.hand_over(submit_later))
        await asyncio.sleep(0.05)
        caller.cancel()
        submitting.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await wait_for(lambda: worker.running == 1)
        [record] = await node.store.list("alice", None, 10)
        final = await node.store.wait(record.id, "alice", timeout=30)
        assert final.status is TaskStatus.COMPLETED and final.worker_name == "direct"
    finally:
        await worker.stop()


async def test_owners_cannot_see_each_others_tasks(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    node = await make_node(worker=False)
    record = await submit(node.store, nmap_wrapper, 1, owner="alice")
    store = node.store
    for call in (store.get(record.id, "bob"), store.cancel(record.id, "bob"), store.wait(record.id, "bob", 1)):
        with pytest.raises(TaskNotFound):
            await call
    assert await store.list("bob", None, 10) == []
    assert [r.id for r in await store.list("alice", None, 10)] == [record.id]


async def test_concurrent_reads_share_one_query_and_each_sees_only_its_own(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await make_node(worker=False)
    store = node.store
    alices = [await submit(store, nmap_wrapper, port, owner="alice") for port in (1, 2, 3)]
    shards = [Shard(target, argv_for(nmap_wrapper, 1, target)) for target in ("127.0.0.1", "127.0.0.2")]
    bobs = await submit(store, nmap_wrapper, 1, owner="bob", shards=shards)
    queries: list[list[str]] = []
    read_many = store._read_many

    def counted(task_ids: list[str]) -> dict[str, TaskRecord]:
        queries.append(task_ids)
        return read_many(task_ids)

    monkeypatch.setattr(store, "_read_many", counted)
    missing = "00000000-0000-4000-8000-000000000000"
    reads = [*((r.id, "alice") for r in alices), (bobs.id, "bob"), (alices[0].id, "bob"), (bobs.id, "alice"),
             (missing, "alice"), *((r.id, "alice") for r in alices)] * 5
    answers = await asyncio.gather(*(store.get(task_id, owner) for task_id, owner in reads), return_exceptions=True)
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
    alices = await submit(node.store, nmap_wrapper, 1, owner="alice")
    shards = [Shard(target, argv_for(nmap_wrapper, 1, target)) for target in ("127.0.0.1", "127.0.0.2")]
    bobs = await submit(node.store, nmap_wrapper, 1, owner="bob", shards=shards)
    listed = await node.store.list_all(None, 10)
    assert [(r.owner, r.id) for r in listed] == [("bob", bobs.id), ("alice", alices.id)]
    assert [r.id for r in await node.store.list_all(TaskStatus.QUEUED, 1)] == [bobs.id]
    assert await node.store.list_all(TaskStatus.RUNNING, 10) == []


async def test_list_filters_by_status_newest_first(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    node = await make_node()
    first = await submit(node.store, nmap_wrapper, 1)
    second = await submit(node.store, nmap_wrapper, 1)
    await node.store.wait(first.id, "alice", 30)
    await node.store.wait(second.id, "alice", 30)
    assert [r.id for r in await node.store.list("alice", TaskStatus.COMPLETED, 10)] == [second.id, first.id]
    assert await node.store.list("alice", TaskStatus.RUNNING, 10) == []


async def test_expired_leases_are_resolved_by_any_process(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    """A task claimed by a worker that died before nmap started is queued again (it never
    touched the network); one whose nmap had started is interrupted; a live lease is kept."""
    [port] = listeners.open_free_top_ports(1)
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    now = time.time()
    base = {"owner": "alice", "kind": "custom", "target": "127.0.0.1", "time_limit": 60, "created_at": now,
            "argv": json.dumps(argv_for(nmap_wrapper, port)), "status": "running", "worker_id": "gone"}
    rows = [
        base | {"id": "claimed-never-started", "claimed_at": now - 60, "started_at": None, "lease_expires_at": now - 30},
        base | {"id": "started-then-died", "claimed_at": now - 50, "started_at": now - 50, "lease_expires_at": now - 1},
        base | {"id": "alive-elsewhere", "claimed_at": now, "started_at": now, "lease_expires_at": now + 3600},
    ]
    with engine.begin() as conn:
        conn.execute(insert(tasks), rows)
    engine.dispose()
    node = await make_node(capacity=1, lease=2)
    requeued = await node.store.wait("claimed-never-started", "alice", timeout=30)
    assert requeued.status is TaskStatus.COMPLETED and requeued.worker_name == "w0"
    assert requeued.result is not None and requeued.result.hosts[0].ports[0].port == port
    died = await node.store.get("started-then-died", "alice")
    assert died.status is TaskStatus.INTERRUPTED and "submit it again" in (died.error or "")
    assert (await node.store.get("alive-elsewhere", "alice")).status is TaskStatus.RUNNING
    assert len(nmap_wrapper.pids()) == 1


async def test_shutdown_interrupts_scans_past_the_grace_period_and_keeps_the_queue(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node(capacity=1, grace=0.2)
    record = await submit(node.store, nmap_wrapper, 1)
    waiting = await submit(node.store, nmap_wrapper, 1)
    await node.store.wait(record.id, "alice", timeout=0.5)
    assert await wait_for(lambda: len(nmap_wrapper.pids()) == 1)
    [pid] = nmap_wrapper.pids()
    assert node.worker is not None
    await node.worker.stop()
    assert not process_alive(pid)
    final = await node.store.get(record.id, "alice")
    assert final.status is TaskStatus.INTERRUPTED and "shut down" in (final.error or "")
    assert (await node.store.get(waiting.id, "alice")).status is TaskStatus.QUEUED


async def test_time_limit_stops_the_scan_and_fails_the_task(make_node: MakeNode,
                                                            nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node()
    record = await submit(node.store, nmap_wrapper, 1, limit=1)
    final = await node.store.wait(record.id, "alice", timeout=30)
    assert final.status is TaskStatus.FAILED and "time limit of 1 s" in (final.error or "")
    assert not nmap_wrapper.alive()


async def test_finishing_is_a_guarded_transition(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node()
    assert node.worker is not None
    record = await submit(node.store, nmap_wrapper, 1)
    claimed = await node.store.wait(record.id, "alice", timeout=0.5)
    await node.store.cancel(record.id, "alice")
    late = ScanOutcome(TaskStatus.COMPLETED, None, None, b"")
    assert await node.store.finish(claimed, node.worker.info.id, late) is False
    assert (await node.store.get(record.id, "alice")).status is TaskStatus.CANCELLED


async def test_time_limit_keeps_the_hosts_finished_so_far(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    node = await make_node()
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1-100", "--scan-delay", "10ms", "--max-hostgroup", "1"],
                      ["127.0.0.1-8"], ipv6=False, privileged=False)
    record = (await node.store.submit("alice", ScanKind.CUSTOM, "127.0.0.1-8", argv, 3)).record
    final = await node.store.wait(record.id, "alice", timeout=30)
    assert final.status is TaskStatus.FAILED and "time limit of 3 s" in (final.error or "")
    assert final.result is not None and final.result.partial
    assert 1 <= len(final.result.hosts) < 8 and final.result.hosts[0].address == "127.0.0.1"
    assert (await node.store.raw_xml(record.id, "alice") or b"").startswith(b"<?xml")


async def test_progress_and_finished_hosts_are_readable_from_another_process(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """What a scan has found so far lives in the database, not in the worker's memory."""
    runner = await make_node()
    reader = await make_node(worker=False)
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1-200", "--scan-delay", "10ms", "--max-hostgroup", "1"],
                      ["127.0.0.1-8"], ipv6=False, privileged=False)
    record = (await reader.store.submit("alice", ScanKind.CUSTOM, "127.0.0.1-8", argv, 120)).record
    deadline = time.monotonic() + 30
    partial = None
    while time.monotonic() < deadline:
        seen = await reader.store.get(record.id, "alice")
        partial = await reader.store.result_so_far(seen)
        if partial is not None and partial.hosts and seen.progress is not None:
            break
        await asyncio.sleep(0.2)
    assert partial is not None and partial.partial and seen.status is TaskStatus.RUNNING
    assert seen.progress is not None and seen.progress.percent >= 0
    await reader.store.cancel(record.id, "alice")
    assert runner.worker is not None
    await runner.worker.wait_stopped(record.id, 5)
    stopped = await reader.store.get(record.id, "alice", with_result=True)
    kept = await reader.store.result_so_far(stopped)
    assert stopped.status is TaskStatus.CANCELLED and kept is not None and kept.partial
    assert [h.address for h in kept.hosts][: len(partial.hosts)] == [h.address for h in partial.hosts]


async def test_a_wait_is_woken_by_a_change_made_in_another_process(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    runner = await make_node()
    waiter = await make_node(worker=False)
    record = await submit(waiter.store, nmap_wrapper, port)
    started = time.monotonic()
    final = await waiter.store.wait(record.id, "alice", timeout=30)
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
        node.store.submit("alice", ScanKind.QUICK, "127.0.0.1", argv, 60, share=True)
        for node in (first, second, first, second)
    ))
    assert len({submitted.record.id for submitted in results}) == 1
    assert sorted(submitted.reused for submitted in results) == [False, True, True, True]
    other, reused, _ = await first.store.submit("bob", ScanKind.QUICK, "127.0.0.1", argv, 60, share=True)
    assert not reused and other.id != results[0].record.id


async def test_a_completed_task_clears_its_live_rows(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    node = await make_node()
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1-50", "--scan-delay", "10ms", "--max-hostgroup", "1"],
                      ["127.0.0.1-3"], ipv6=False, privileged=False)
    record = (await node.store.submit("alice", ScanKind.CUSTOM, "127.0.0.1-3", argv, 120)).record
    engine = create_db_engine(database_url)
    live = select(task_hosts).where(task_hosts.c.task_id == record.id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            written = conn.execute(live).all()
        if written:
            break
        await asyncio.sleep(0.1)
    assert written, "no finished host was written while the scan ran"
    final = await node.store.wait(record.id, "alice", timeout=60)
    assert final.status is TaskStatus.COMPLETED and final.result is not None and len(final.result.hosts) == 3
    with engine.connect() as conn:
        left = conn.execute(live).all()
        dedupe = conn.execute(select(tasks.c.dedupe_key).where(tasks.c.id == record.id)).scalar_one()
    engine.dispose()
    assert left == [] and dedupe is None


REFUSE_INVENTORY = {
    "sqlite": [("CREATE TRIGGER refuse_inventory BEFORE INSERT ON inventory_hosts "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")],
    "postgresql": [("CREATE FUNCTION refuse_inventory() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"),
                   ("CREATE TRIGGER refuse_inventory BEFORE INSERT ON inventory_hosts "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_inventory()")],
}


async def test_a_completed_scan_keeps_its_verdict_when_the_database_refuses_its_inventory_rows(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners,
    caplog: pytest.LogCaptureFixture,
) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node()
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        for statement in REFUSE_INVENTORY[engine.dialect.name]:
            conn.exec_driver_sql(statement)
    engine.dispose()
    record = await submit(node.store, nmap_wrapper, port)
    final = await node.store.wait(record.id, "alice", timeout=30)
    assert final.status is TaskStatus.COMPLETED and final.result is not None
    assert final.result.hosts[0].ports[0].port == port
    assert await node.store.find_hosts("alice", HostQuery(), 10, 0) == ([], 0)
    assert any("could not be added to the inventory" in r.getMessage() and "refused by the test" in r.exc_text
               for r in caplog.records if r.exc_text), caplog.text


async def test_a_task_whose_lease_a_live_worker_lost_is_never_left_running(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """Another process resolved the task (its lease had expired): the worker stops its nmap."""
    nmap_wrapper.set_delay(30)
    node = await make_node(lease=3)
    record = await submit(node.store, nmap_wrapper, 1)
    assert (await node.store.wait(record.id, "alice", timeout=1)).status is TaskStatus.RUNNING
    assert await wait_for(lambda: len(nmap_wrapper.alive()) == 1)
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == record.id).values(lease_expires_at=time.time() - 1))
    engine.dispose()
    final = await node.store.wait(record.id, "alice", timeout=10)
    assert final.status is TaskStatus.INTERRUPTED
    assert await wait_for(lambda: nmap_wrapper.alive() == [], 5)
