"""supervisor.py: a background loop that dies stops its process, and never silently.

Each loop of the service gets a real failure, injected where a bug or a broken database
would put it: a trigger makes the database refuse exactly that loop's statement (an error
that is not "the database is unreachable", which the loops rightly wait out).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import insert

from db import create_db_engine, upgrade_schema
from models import tasks, workers
from retention import DAY_SECONDS, upkeep_forever
from supervisor import Supervisor
from tests.nodes import Node, argv_for, opened_stores, start_node, submit
from tests.support import LiveServer, NmapWrapper, wait_until

pytestmark = pytest.mark.anyio


def refuse(database_url: str, table: str, event: str, when: str = "1 = 1") -> None:
    """Make the database refuse `event` (UPDATE, DELETE) on rows of `table` matching `when`."""
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE {event} ON {table} WHEN {when} "
                                 "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        else:
            conn.exec_driver_sql("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                                 "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
            conn.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE {event} ON {table} FOR EACH ROW "
                                 f"WHEN ({when}) EXECUTE FUNCTION refuse()")
    engine.dispose()


def insert_rows(database_url: str, table: object, rows: list[dict[str, object]]) -> None:
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), rows)  # type: ignore[arg-type]
    engine.dispose()


async def died(supervisor: Supervisor, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """Wait until `loop` has died; it must be logged with its traceback."""
    async with asyncio.timeout(30):
        await supervisor.failed.wait()
    # SQLite's RAISE is an IntegrityError, PL/pgSQL's a ProgrammingError.
    assert supervisor.failure in {f"the background loop {loop!r} died ({error})"
                                  for error in ("IntegrityError", "ProgrammingError")}, supervisor.failure
    said = f"the background loop {loop!r} died; stopping this process"
    [record] = [r for r in caplog.records if r.getMessage() == said]
    assert record.exc_text is not None and "refused by the test" in record.exc_text


@pytest.fixture
async def node(database_url: str, nmap_wrapper: NmapWrapper) -> AsyncIterator[Callable[..., object]]:
    """One node, whose supervisor the test reads (a dead loop is what these tests expect)."""
    started: list[Node] = []

    async def start(**options: object) -> Node:
        started.append(await start_node(database_url, "w0", nmap_wrapper, **options))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for each in started:
        await each.stop()


async def test_a_loop_that_dies_is_logged_and_fails_the_process_one_that_ends_or_is_cancelled_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor()

    async def ends() -> None:
        return

    async def waits() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise RuntimeError("a bug")

    supervisor.start("ends", ends())
    supervisor.start("waits", waits())
    await asyncio.sleep(0)
    await supervisor.stop("waits")
    assert not supervisor.failed.is_set() and supervisor.names == set()
    supervisor.start("fails", fails())
    async with asyncio.timeout(5):
        await supervisor.failed.wait()
    assert supervisor.failure == "the background loop 'fails' died (RuntimeError)"
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records if r.levelname == "CRITICAL")


async def test_a_claim_loop_that_dies_stops_the_process(
    database_url: str, node: Callable[..., object], nmap_wrapper: NmapWrapper, caplog: pytest.LogCaptureFixture,
) -> None:
    refuse(database_url, "tasks", "UPDATE", "OLD.status = 'queued' AND NEW.status = 'running'")
    running: Node = await node()  # type: ignore[misc]
    await submit(running.tasks, nmap_wrapper, 1)
    await died(running.supervisor, "claim", caplog)
    assert nmap_wrapper.pids() == []


async def test_a_heartbeat_that_dies_stops_the_process(
    database_url: str, node: Callable[..., object], caplog: pytest.LogCaptureFixture,
) -> None:
    refuse(database_url, "workers", "UPDATE")
    running: Node = await node(lease=1.5)  # type: ignore[misc]
    await died(running.supervisor, "heartbeat", caplog)


async def test_a_lease_reaper_that_dies_stops_the_process(
    database_url: str, node: Callable[..., object], caplog: pytest.LogCaptureFixture,
) -> None:
    insert_rows(database_url, workers, [{"id": "stale", "name": "stale", "pool": "default", "capacity": 1,
                                         "running": 0, "started_at": 0.0, "heartbeat_at": 0.0}])
    refuse(database_url, "workers", "DELETE", "OLD.name = 'stale'")
    running: Node = await node(lease=1.0, worker=False)  # type: ignore[misc]
    await died(running.supervisor, "lease-reaper", caplog)


async def test_a_retention_loop_that_dies_stops_the_process(
    database_url: str, nmap_wrapper: NmapWrapper, caplog: pytest.LogCaptureFixture,
) -> None:
    long_ago = time.time() - 40 * DAY_SECONDS
    insert_rows(database_url, tasks, [{
        "id": "old", "owner": "alice", "kind": "custom", "target": "127.0.0.1", "time_limit": 60,
        "argv": json.dumps(argv_for(nmap_wrapper, 1)), "status": "completed", "created_at": long_ago,
        "finished_at": long_ago}])
    refuse(database_url, "tasks", "DELETE")
    supervisor = Supervisor()
    async with opened_stores(database_url, max_queued=10) as stores:
        supervisor.start("retention", upkeep_forever(stores, 30, first_run_within_s=0))
        await died(supervisor, "retention", caplog)


def test_a_server_whose_loop_died_exits_non_zero_with_the_traceback_in_its_log(
    live_server: Callable[..., LiveServer], tmp_path: Path,
) -> None:
    server = live_server(lease_seconds=1.5)
    refuse(f"sqlite:///{tmp_path / 'tasks.db'}", "workers", "UPDATE")
    assert server.process is not None
    assert wait_until(lambda: server.process.poll() is not None, 60, 0.1), server.log_text()  # type: ignore[union-attr]
    assert server.process.returncode == 1
    log = server.log_text()
    assert "the background loop 'heartbeat' died; stopping this process" in log
    assert "refused by the test" in log and "Traceback" in log
    assert "error: the background loop 'heartbeat' died (IntegrityError); see the log for its traceback" in log
