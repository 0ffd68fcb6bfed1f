"""db.py and change_feed.py: the database under every store, and how processes hear of changes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

import db
from change_feed import heard_key, wait_set
from db import DatabaseUnavailable
from models import TaskStatus
from tests.nodes import opened_stores, submit, wait_for
from tests.support import POSTGRES_ADMIN_URL, NmapWrapper

pytestmark = pytest.mark.anyio


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
    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.2)
    async with opened_stores(postgres_url, max_queued=10) as stores:
        await stores.db.ping()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid() AND query NOT LIKE 'LISTEN%%'", (make_url(postgres_url).database,)).fetchone()
        assert ended is not None and ended[0] >= 1
        await asyncio.sleep(0.3)  # idle past PING_IDLE_SECONDS: pinged, found dead, replaced
        await stores.db.ping()


@pytest.mark.slow("SQLite's 5 s busy timeout")
async def test_a_sqlite_database_locked_past_its_busy_timeout_is_unavailable(
    tmp_path: Path, nmap_wrapper: NmapWrapper
) -> None:
    """The writing BEGIN goes to the driver directly, so its errors arrive as sqlite3's own."""
    async with opened_stores(f"sqlite:///{tmp_path / 'tasks.db'}", max_queued=10) as stores:
        holder = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            with pytest.raises(DatabaseUnavailable, match="not reachable"):
                await submit(stores.tasks, nmap_wrapper, 1)
            holder.execute("ROLLBACK")
            assert (await submit(stores.tasks, nmap_wrapper, 1)).status is TaskStatus.QUEUED
        finally:
            holder.close()


async def test_a_call_not_answered_in_time_is_unavailable_and_its_transaction_rolled_back(
    tmp_path: Path, nmap_wrapper: NmapWrapper
) -> None:
    """A database that does not answer (here: its write lock held elsewhere, within SQLite's own
    5 s busy timeout) is `unavailable` after timeout_s; the submit given up on does not commit
    when the database answers later."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    async with opened_stores(url, max_queued=10, timeout_s=0.5) as stores:
        holder = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            asked = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="not reachable"):
                await submit(stores.tasks, nmap_wrapper, 1)
            assert time.monotonic() - asked < 4, "answered by the deadline, not by SQLite's busy timeout"
            assert stores.db.calm_seconds() < 4
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        kept = await submit(stores.tasks, nmap_wrapper, 2)
    # Closed: every database thread has finished, the abandoned submit included.
    async with opened_stores(url, max_queued=10) as stores:
        assert [record.id for record in await stores.tasks.recent("alice", None, 10)] == [kept.id]


def pooled_connections(database_url: str) -> int:
    """Connections to the test database other than the change feed's listener."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query NOT LIKE 'LISTEN%%'",
                            (make_url(database_url).database,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_the_connections_a_busy_spell_opened_are_closed_once_idle(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process kept every pooled connection it ever opened (up to 20) for as long as it lived:
    the server now closes those idle for POOL_IDLE_SECONDS, the pool reuses the one returned
    last, and the next busy spell replaces the closed ones unseen."""
    monkeypatch.setattr(db, "POOL_IDLE_SECONDS", 1)
    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.2)

    def hold(conn_db: db.Database) -> None:
        with conn_db.reading() as conn:
            conn.exec_driver_sql("SELECT pg_sleep(0.3)")

    async with opened_stores(postgres_url, max_queued=10) as stores:
        await asyncio.gather(*(stores.db.run(hold, stores.db) for _ in range(6)))
        assert pooled_connections(postgres_url) >= 6
        assert await wait_for(lambda: pooled_connections(postgres_url) <= 1, timeout=15, every_s=0.2)
        await asyncio.gather(*(stores.db.run(hold, stores.db) for _ in range(6)))
        await stores.db.ping()
