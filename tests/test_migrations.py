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
from models import TaskStatus, inventory_hosts, inventory_ports, metadata, tasks, usage_minutes
from tests.nodes import opened_stores, with_whole_result

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
        kept = await with_whole_result(store, completed.id, "default")
        assert kept.pool == "default" and kept.result is not None
        assert [(p.port, p.state) for p in kept.result.hosts[0].ports] == [(22022, "open"), (22023, "closed")]
        assert [p.untrusted for p in kept.result.hosts[0].ports] == [None, None], "0.1.0's empty text fields"
        report = await store.report_page(completed.id, 0, 100)
        assert report is not None and report.text.startswith("<?xml") and report.total > 100
        # The upgrade gave it its call's digest: an identical call still finds it fresh.
        twin = await store.trial("default", kept.kind, kept.target, kept.argv, 60, share=True, fresh_since=0)
        assert twin is not None and twin.id == completed.id
        assert await store.trial("ci", kept.kind, kept.target, kept.argv, 60, share=True, fresh_since=0) is None
        [ci] = await store.recent("ci", None, 10)
        ci_result = (await with_whole_result(store, ci.id, "ci")).result
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
    assert version == "0022"


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


def test_an_upgrade_counts_what_the_inventory_knew_as_confirmed_by_the_task_that_last_saw_it(
    database_url: str,
) -> None:
    """Rows of the previous release (0008) hold a product, CPE, scripts or OS only because a
    scan looked: after the upgrade they are confirmed by the task that last reported them, so
    a later scan that does not look leaves them."""
    engine = create_db_engine(database_url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0008")
        # The columns 0008 has only: the models' inserts name just the columns given.
        seen = {"owner": "alice", "address_key": "47f000001", "first_seen": 1.0, "last_seen": 2.0, "changed_at": 1.0}
        conn.execute(insert(inventory_hosts), [
            seen | {"address": "127.0.0.1", "status": "up", "os": "Linux 5.X", "last_task_id": "t-os"},
            seen | {"address": "127.0.0.2", "status": "up", "os": "", "last_task_id": "t-none"}])
        port = seen | {"address": "127.0.0.1", "protocol": "tcp", "state": "open", "product": "", "cpe": "[]",
                       "scripts": "[]"}
        conn.execute(insert(inventory_ports), [
            port | {"port": 22, "product": "OpenSSH", "last_task_id": "t-sv"},
            port | {"port": 80, "cpe": '["cpe:/a:x"]', "scripts": '["http-title"]', "last_task_id": "t-sc"},
            port | {"port": 81, "last_task_id": "t-quick"}])
    upgrade_schema(engine)
    with engine.connect() as conn:
        hosts = conn.execute(select(inventory_hosts.c.address, inventory_hosts.c.os_confirmed_at,
                                    inventory_hosts.c.os_task_id).order_by(inventory_hosts.c.address)).all()
        ports = conn.execute(select(inventory_ports.c.port, inventory_ports.c.version_task_id,
                                    inventory_ports.c.scripts_task_id, inventory_ports.c.extrainfo)
                             .order_by(inventory_ports.c.port)).all()
    engine.dispose()
    assert hosts == [("127.0.0.1", 2.0, "t-os"), ("127.0.0.2", None, None)]
    assert ports == [(22, "t-sv", None, ""), (80, "t-sc", "t-sc", ""), (81, None, None, "")]
