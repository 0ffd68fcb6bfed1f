"""Schema migrations: a database made by 0.1.0 upgrades in place, and the migrations build
exactly the schema models.py declares.

The fixtures are real databases of nmap-mcp 0.1.0 (commit 30881d6), made by running its
TaskManager on loopback: two completed scans (owners 'default' and 'ci') and a cancelled
one; the PostgreSQL one is its `pg_dump --inserts`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import insert, select, text

from db import MIGRATIONS, create_db_engine, upgrade_schema
from models import TaskStatus, metadata, tasks, usage_minutes
from tests.nodes import opened_stores

pytestmark = pytest.mark.anyio
FIXTURES = Path(__file__).parent / "fixtures"


def load_v010(database_url: str, tmp_path: Path) -> str:
    """Put the 0.1.0 database behind `database_url` (a fresh SQLite file or PostgreSQL db)."""
    if database_url.startswith("sqlite"):
        path = tmp_path / "v010.db"
        shutil.copy(FIXTURES / "db_v0.1.0.sqlite", path)
        return f"sqlite:///{path}"
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql((FIXTURES / "db_v0.1.0_postgresql.sql").read_text())
    engine.dispose()
    return database_url


async def test_a_database_of_0_1_0_upgrades_in_place(database_url: str, tmp_path: Path) -> None:
    url = load_v010(database_url, tmp_path)
    async with opened_stores(url, max_queued=10) as stores:
        store = stores.tasks
        default = await store.recent("default", None, 10)
        assert sorted(r.status for r in default) == [TaskStatus.CANCELLED, TaskStatus.COMPLETED]
        [completed] = [r for r in default if r.status is TaskStatus.COMPLETED]
        kept = await store.get(completed.id, "default", with_result=True)
        assert kept.pool == "default" and kept.result is not None
        assert [(p.port, p.state) for p in kept.result.hosts[0].ports] == [(22022, "open"), (22023, "closed")]
        assert [p.untrusted for p in kept.result.hosts[0].ports] == [None, None], "0.1.0's empty text fields"
        assert (await store.raw_xml(completed.id, "default") or b"").startswith(b"<?xml")
        [ci] = await store.recent("ci", None, 10)
        ci_result = (await store.get(ci.id, "ci", with_result=True)).result
        assert ci_result is not None and [h.address for h in ci_result.hosts] == ["127.0.0.2", "127.0.0.3"]


def test_migrations_build_the_schema_models_declare(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    upgrade_schema(engine)  # a second start finds nothing to do
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    assert differences == []
    assert version == "0008"


async def test_an_upgrade_counts_the_last_days_tasks_into_the_usage_of_the_limits(database_url: str) -> None:
    """A database of the previous release (0006) gets usage_minutes filled from its tasks of
    the last day, so that limits hold across the upgrade."""
    engine = create_db_engine(database_url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    now = time.time()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0006")
        row = {"owner": "alice", "kind": "quick", "target": "127.0.0.1", "argv": "[]", "status": "completed",
               "time_limit": 60, "parent_id": None, "forced": False}
        conn.execute(insert(tasks), [
            row | {"id": "recent", "created_at": now - 120, "address_count": 256, "forced": True},
            row | {"id": "shard", "created_at": now - 120, "address_count": 64, "parent_id": "recent"},
            row | {"id": "earlier", "created_at": now - 7200, "address_count": 4},
            row | {"id": "old", "created_at": now - 90_000, "address_count": 1000},
        ])
    upgrade_schema(engine)
    with engine.connect() as conn:
        counted = sorted(conn.execute(select(usage_minutes.c.minute, usage_minutes.c.scans, usage_minutes.c.addresses,
                                             usage_minutes.c.rescans)).all())
    engine.dispose()
    assert counted == [(int((now - 7200) // 60), 1, 4, 0), (int((now - 120) // 60), 1, 256, 1)]
    async with opened_stores(database_url, max_queued=10) as stores:
        used = await stores.usage.usage("alice")
    assert used["addresses_per_day"] == 260 and used["rescans_per_hour"] == 1
