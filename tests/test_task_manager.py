"""task_manager.py on real SQLite and real PostgreSQL, running real nmap on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import insert, select

from models import ScanKind, TaskStatus, tasks
from scanner import ScanOutcome, build_argv
from task_manager import (
    QueueFull,
    TaskAlreadyFinished,
    TaskManager,
    TaskNotFound,
    create_db_engine,
)
from tests.support import Listeners, NmapWrapper, process_alive

pytestmark = pytest.mark.anyio
MakeManager = Callable[..., Awaitable[TaskManager]]


@pytest.fixture
async def make_manager(database_url: str) -> AsyncIterator[MakeManager]:
    managers: list[TaskManager] = []

    async def make(max_concurrent: int = 4, max_queued: int = 50, grace: float = 0.5) -> TaskManager:
        manager = TaskManager(
            create_db_engine(database_url), max_concurrent=max_concurrent, max_queued=max_queued,
            shutdown_grace=grace,
        )
        await manager.start()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.stop()


def argv_for(nmap: NmapWrapper, port: int, target: str = "127.0.0.1") -> list[str]:
    return build_argv(str(nmap.path), ["-sT", "-p", str(port)], [target], ipv6=False, privileged=False)


async def submit(manager: TaskManager, nmap: NmapWrapper, port: int, owner: str = "alice", limit: int = 120):
    return await manager.submit(owner, ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap, port), limit)


async def test_scan_completes_within_the_wait(make_manager: MakeManager, nmap_wrapper: NmapWrapper,
                                              listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    manager = await make_manager()
    record = await submit(manager, nmap_wrapper, port)
    assert record.status is TaskStatus.QUEUED
    done = await manager.wait(record.id, "alice", timeout=30)
    assert done.status is TaskStatus.COMPLETED and done.result is not None
    assert [(p.port, p.state) for p in done.result.hosts[0].ports] == [(port, "open")]
    assert done.started_at is not None and done.finished_at is not None


async def test_a_scan_longer_than_the_wait_runs_once_in_the_background(
    make_manager: MakeManager, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(2)
    manager = await make_manager()
    record = await submit(manager, nmap_wrapper, port)
    early = await manager.wait(record.id, "alice", timeout=0.5)
    assert early.status is TaskStatus.RUNNING and early.result is None
    final = await manager.wait(record.id, "alice", timeout=30)
    assert final.status is TaskStatus.COMPLETED
    assert final.result is not None and final.result.hosts[0].ports[0].port == port
    assert len(nmap_wrapper.pids()) == 1


async def test_concurrency_is_bounded_and_every_task_runs_once(
    make_manager: MakeManager, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(0.6)
    manager = await make_manager(max_concurrent=2)
    records = [await submit(manager, nmap_wrapper, port) for _ in range(6)]
    peak = 0
    waits = asyncio.gather(*(manager.wait(r.id, "alice", timeout=60) for r in records))
    while not waits.done():
        peak = max(peak, len(nmap_wrapper.alive()))
        await asyncio.sleep(0.01)
    finals = await waits
    assert peak == 2
    assert all(f.status is TaskStatus.COMPLETED for f in finals)
    assert len(nmap_wrapper.pids()) == 6


async def test_a_full_queue_refuses_with_a_clear_error(make_manager: MakeManager, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    manager = await make_manager(max_concurrent=1, max_queued=2)
    first = await submit(manager, nmap_wrapper, 1)
    assert (await manager.wait(first.id, "alice", timeout=0.3)).status is TaskStatus.RUNNING
    queued = [await submit(manager, nmap_wrapper, 1) for _ in range(2)]
    with pytest.raises(QueueFull, match="queue is full"):
        await submit(manager, nmap_wrapper, 1)
    for record in [first, *queued]:
        await manager.cancel(record.id, "alice")
    assert len(nmap_wrapper.pids()) == 1


async def test_cancel_kills_nmap_and_records_cancelled(make_manager: MakeManager, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    manager = await make_manager(max_concurrent=1)
    running = await submit(manager, nmap_wrapper, 1)
    queued = await submit(manager, nmap_wrapper, 1)
    assert (await manager.wait(running.id, "alice", timeout=0.3)).status is TaskStatus.RUNNING
    [pid] = nmap_wrapper.pids()
    assert (await manager.cancel(running.id, "alice")).status is TaskStatus.CANCELLED
    assert not process_alive(pid)
    assert (await manager.cancel(queued.id, "alice")).status is TaskStatus.CANCELLED
    assert nmap_wrapper.pids() == [pid]
    with pytest.raises(TaskAlreadyFinished, match="already cancelled"):
        await manager.cancel(queued.id, "alice")


async def test_owners_cannot_see_each_others_tasks(make_manager: MakeManager, nmap_wrapper: NmapWrapper) -> None:
    manager = await make_manager()
    record = await submit(manager, nmap_wrapper, 1, owner="alice")
    for call in (manager.get(record.id, "bob"), manager.cancel(record.id, "bob"), manager.wait(record.id, "bob", 1)):
        with pytest.raises(TaskNotFound):
            await call
    assert await manager.list("bob", None, 10) == []
    assert [r.id for r in await manager.list("alice", None, 10)] == [record.id]


async def test_list_filters_by_status_newest_first(make_manager: MakeManager, nmap_wrapper: NmapWrapper) -> None:
    manager = await make_manager()
    first = await submit(manager, nmap_wrapper, 1)
    second = await submit(manager, nmap_wrapper, 1)
    await manager.wait(first.id, "alice", 30)
    await manager.wait(second.id, "alice", 30)
    assert [r.id for r in await manager.list("alice", TaskStatus.COMPLETED, 10)] == [second.id, first.id]
    assert await manager.list("alice", TaskStatus.RUNNING, 10) == []


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


async def test_start_resolves_what_a_dead_process_left_behind(
    database_url: str, make_manager: MakeManager, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    engine = create_db_engine(database_url)
    from models import metadata

    metadata.create_all(engine)
    now = time.time()
    base = {"owner": "alice", "kind": "custom", "target": "127.0.0.1", "time_limit": 60, "created_at": now}
    rows = [
        base | {"id": "dead-local", "status": "running", "argv": "[]",
                "worker_id": f"{socket.gethostname()}:{dead_pid()}:x", "heartbeat_at": now},
        base | {"id": "stale-remote", "status": "running", "argv": "[]",
                "worker_id": "other-host:1:x", "heartbeat_at": now - 3600},
        base | {"id": "live-remote", "status": "running", "argv": "[]",
                "worker_id": "other-host:2:x", "heartbeat_at": now},
        base | {"id": "left-queued", "status": "queued", "argv": json.dumps(argv_for(nmap_wrapper, port)),
                "worker_id": None, "heartbeat_at": None},
    ]
    with engine.begin() as conn:
        conn.execute(insert(tasks), rows)
    engine.dispose()
    manager = await make_manager(max_concurrent=1)
    for task_id in ("dead-local", "stale-remote"):
        record = await manager.get(task_id, "alice")
        assert record.status is TaskStatus.INTERRUPTED and "stopped before it finished" in (record.error or "")
    assert (await manager.get("live-remote", "alice")).status is TaskStatus.RUNNING
    requeued = await manager.wait("left-queued", "alice", timeout=30)
    assert requeued.status is TaskStatus.COMPLETED
    assert requeued.result is not None and requeued.result.hosts[0].ports[0].port == port


async def test_shutdown_interrupts_scans_past_the_grace_period(make_manager: MakeManager,
                                                               nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    manager = await make_manager(grace=0.2)
    record = await submit(manager, nmap_wrapper, 1)
    await manager.wait(record.id, "alice", timeout=0.3)
    [pid] = nmap_wrapper.pids()
    await manager.stop()
    assert not process_alive(pid)
    reopened = await make_manager()
    final = await reopened.get(record.id, "alice")
    assert final.status is TaskStatus.INTERRUPTED and "shut down" in (final.error or "")


async def test_time_limit_stops_the_scan_and_fails_the_task(make_manager: MakeManager,
                                                            nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    manager = await make_manager()
    record = await submit(manager, nmap_wrapper, 1, limit=1)
    final = await manager.wait(record.id, "alice", timeout=30)
    assert final.status is TaskStatus.FAILED and "time limit of 1 s" in (final.error or "")
    assert not nmap_wrapper.alive()


async def test_finishing_is_a_guarded_transition(make_manager: MakeManager, nmap_wrapper: NmapWrapper,
                                                 database_url: str) -> None:
    nmap_wrapper.set_delay(30)
    manager = await make_manager()
    record = await submit(manager, nmap_wrapper, 1)
    await manager.wait(record.id, "alice", timeout=0.3)
    await manager.cancel(record.id, "alice")
    late = ScanOutcome(TaskStatus.COMPLETED, None, None, b"")
    assert manager._mark_finished(record.id, late) is False
    engine = create_db_engine(database_url)
    with engine.connect() as conn:
        status = conn.execute(select(tasks.c.status).where(tasks.c.id == record.id)).scalar_one()
    engine.dispose()
    assert status == TaskStatus.CANCELLED.value


async def test_time_limit_keeps_the_hosts_finished_so_far(make_manager: MakeManager, nmap_wrapper: NmapWrapper) -> None:
    manager = await make_manager()
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1-100", "--scan-delay", "10ms", "--max-hostgroup", "1"],
                      ["127.0.0.1-8"], ipv6=False, privileged=False)
    record = await manager.submit("alice", ScanKind.CUSTOM, "127.0.0.1-8", argv, 3)
    final = await manager.wait(record.id, "alice", timeout=30)
    assert final.status is TaskStatus.FAILED and "time limit of 3 s" in (final.error or "")
    assert final.result is not None and final.result.partial
    assert 1 <= len(final.result.hosts) < 8 and final.result.hosts[0].address == "127.0.0.1"
    assert (await manager.raw_xml(record.id, "alice") or b"").startswith(b"<?xml")
