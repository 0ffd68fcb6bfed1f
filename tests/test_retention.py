"""Retention on real SQLite and PostgreSQL: what is older than retention_days goes, in small
batches; what is recent, queued or running stays; a SQLite file shrinks when much went."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select, text

from db import create_db_engine, upgrade_schema
from models import inventory_hosts, inventory_ports, task_hosts, tasks, usage_minutes
from retention import DAY_SECONDS, purge_once, upkeep_forever
from tests.nodes import opened_stores

pytestmark = pytest.mark.anyio
NOW = time.time()


def task(task_id: str, status: str, age_days: float, **extra: object) -> dict[str, object]:
    moment = NOW - age_days * DAY_SECONDS
    return {"id": task_id, "owner": "alice", "kind": "quick", "target": "127.0.0.1", "argv": "[]", "status": status,
            "created_at": moment, "finished_at": moment if status not in ("queued", "running") else None,
            "time_limit": 60, "result": "x" * 2000, "parent_id": None, "shard_count": 0} | extra


def seed(url: str, old: int) -> None:
    """`old` completed tasks of 40 days ago (with a sharded one and live rows), and what must stay."""
    engine = create_db_engine(url)
    upgrade_schema(engine)
    rows = [task(f"old-{i}", "completed", 40) for i in range(old)]
    rows += [task("parent", "cancelled", 40, shard_count=2), task("shard-1", "cancelled", 40, parent_id="parent"),
             task("shard-2", "cancelled", 40, parent_id="parent"), task("recent", "completed", 5),
             task("queued-long-ago", "queued", 40), task("running-long-ago", "running", 40)]
    host = {"owner": "alice", "address_key": "", "status": "up", "first_seen": 0.0, "changed_at": 0.0,
            "last_task_id": "x"}
    port = {"owner": "alice", "protocol": "tcp", "port": 22, "address_key": "", "state": "open", "first_seen": 0.0,
            "changed_at": 0.0, "last_task_id": "x"}
    with engine.begin() as conn:
        conn.execute(insert(tasks), rows)
        conn.execute(insert(task_hosts), [{"task_id": "shard-1", "seq": 0, "data": "{}"}])
        conn.execute(insert(inventory_hosts), [host | {"address": "127.0.0.2", "last_seen": NOW - 40 * DAY_SECONDS},
                                                host | {"address": "127.0.0.3", "last_seen": NOW - DAY_SECONDS}])
        conn.execute(insert(inventory_ports), [port | {"address": "127.0.0.2", "last_seen": NOW - 40 * DAY_SECONDS},
                                                port | {"address": "127.0.0.3", "last_seen": NOW - DAY_SECONDS}])
        conn.execute(insert(usage_minutes), [{"owner": "alice", "minute": int((NOW - days * DAY_SECONDS) // 60),
                                              "scans": 1, "addresses": 1, "rescans": 0} for days in (40, 1)])
    engine.dispose()


def remaining(url: str) -> tuple[list[str], int, list[str], list[int]]:
    engine = create_db_engine(url)
    with engine.connect() as conn:
        ids = sorted(conn.execute(select(tasks.c.id)).scalars())
        live = conn.execute(select(func.count()).select_from(task_hosts)).scalar_one()
        hosts = sorted(conn.execute(select(inventory_hosts.c.address)).scalars())
        minutes = sorted(conn.execute(select(usage_minutes.c.minute)).scalars())
    engine.dispose()
    return ids, live, hosts, minutes


async def test_old_finished_tasks_and_inventory_go_recent_and_active_stay(database_url: str) -> None:
    seed(database_url, old=1200)
    async with opened_stores(database_url, max_queued=10) as stores:
        deleted = await purge_once(stores, 30, now=NOW)
    assert deleted == {"tasks": 1201, "inventory_hosts": 1, "inventory_ports": 1, "usage_minutes": 1}
    assert remaining(database_url) == (["queued-long-ago", "recent", "running-long-ago"], 0, ["127.0.0.3"],
                                       [int((NOW - DAY_SECONDS) // 60)])


async def test_a_sqlite_file_is_compacted_after_much_was_deleted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'big.db'}"
    seed(url, old=3000)
    before = (tmp_path / "big.db").stat().st_size
    async with opened_stores(url, max_queued=10) as stores:
        await purge_once(stores, 30, now=NOW)
        assert await stores.db.compact() is False, "nothing left to compact"
    assert (tmp_path / "big.db").stat().st_size < before / 4


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_retention_days_0_keeps_everything_and_the_job_takes_the_statistics_again(database_url: str) -> None:
    """With retention_days 0 nothing goes, and each pass still takes SQLite's statistics of the
    inventory again as it grows (its queries' plans depend on them; on PostgreSQL the
    autovacuum does)."""
    seed(database_url, old=3)
    async with opened_stores(database_url, max_queued=10) as stores:
        engine = create_db_engine(database_url)
        assert analyzed_rows(engine) == 2, "taken at start"
        with engine.begin() as conn:
            conn.execute(insert(inventory_hosts), [
                {"owner": "bob", "address": f"127.0.0.{n}", "address_key": "", "status": "up", "first_seen": 0.0,
                 "last_seen": NOW, "changed_at": 0.0, "last_task_id": "x"} for n in range(1, 41)])
        job = asyncio.create_task(upkeep_forever(stores, 0, first_run_within_s=0))
        try:
            async with asyncio.timeout(10):
                while analyzed_rows(engine) != 42:
                    await asyncio.sleep(0.05)
        finally:
            job.cancel()
            engine.dispose()
    ids, _, _, minutes = remaining(database_url)
    assert len(ids) == 3 + 6 and len(minutes) == 2


def analyzed_rows(engine: Engine) -> int:
    """The rows of inventory_hosts, as SQLite's last statistics of it say."""
    with engine.connect() as conn:
        stat = conn.execute(text("SELECT stat FROM sqlite_stat1 WHERE idx = 'ix_inventory_hosts_owner_key'")).scalar()
    return int(stat.split()[0])
