"""History costs nothing per call (issue 24): the lookups every submission makes, and the
queries the admin overview and the inventory tools make, are served by indexes that match
them, on real SQLite and PostgreSQL, however much history the database holds."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, insert
from sqlalchemy.sql import Select

from db import DB_THREADS, create_db_engine, upgrade_schema
from inventory import HostQuery
from limits import USAGE_AND_WAITING, usage_params
from models import ScanKind, TaskStatus, inventory_hosts, inventory_ports, schedule_runs, schedules, tasks
from task_manager import FRESH_TWIN, dedupe_key
from tests.nodes import opened_stores, statements_run

ARGV = ["/usr/bin/nmap", "-sT", "-p", "1", "--"]


def completed_tasks(owner: str, count: int, now: float) -> list[dict[str, Any]]:
    """`count` completed quick scans of `owner`, each of another target, as submit writes them."""
    rows = []
    for n in range(count):
        argv = [*ARGV, f"127.0.{n // 250}.{n % 250 + 1}"]
        rows.append({"id": f"{owner}-{n}", "owner": owner, "kind": ScanKind.QUICK.value, "target": argv[-1],
                     "argv": json.dumps(argv), "status": TaskStatus.COMPLETED.value, "created_at": now - n,
                     "finished_at": now - n + 1, "time_limit": 60, "result": "{}" * 200,
                     "call_key": dedupe_key(owner, ScanKind.QUICK, argv)})
    return rows


@pytest.fixture
def history(database_url: str) -> Iterator[Engine]:
    """A database whose token 'alice' has 3,000 completed scans (and 'bob' 1,000)."""
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    now = time.time()
    with engine.begin() as conn:
        conn.execute(insert(tasks), completed_tasks("alice", 3000, now) + completed_tasks("bob", 1000, now))
        if engine.dialect.name == "postgresql":  # what its autovacuum does; SQLite keeps none of tasks
            conn.exec_driver_sql("ANALYZE")
    yield engine
    engine.dispose()


def inventory_rows(hosts: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """alice's hosts, each with ssh, https and one of 50 other ports open, one in ten with http."""
    seen = {"owner": "alice", "first_seen": 0.0, "last_seen": 1.0, "changed_at": 0.0, "last_task_id": "t"}
    host_rows, port_rows = [], []
    for n in range(hosts):
        host = seen | {"address": f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", "address_key": f"{n:033d}"}
        host_rows.append(host | {"status": "up"})
        ports = [(22, "ssh"), (443, "https"), (8000 + n % 50, "http-alt")] + [(80, "http")] * (n % 10 == 0)
        port_rows += [host | {"protocol": "tcp", "port": port, "state": "open", "service": service}
                      for port, service in ports]
    return host_rows, port_rows


def plan_of(engine: Engine, statement: Select[Any], params: dict[str, Any]) -> list[str]:
    """SQLite's EXPLAIN QUERY PLAN steps, or PostgreSQL's EXPLAIN nodes ('Index Scan using ix', 'Seq Scan on table')."""
    compiled = statement.compile(engine)
    bound = compiled.construct_params(params)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            values = tuple(bound[name] for name in compiled.positiontup or ())
            return [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", values)]
        [[plan]] = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", bound).all()
    return [node["Node Type"] + (f" using {node['Index Name']}" if "Index Name" in node else
                                 f" on {node['Relation Name']}" if "Relation Name" in node else "")
            for node in plan_nodes(plan[0]["Plan"])]


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def test_the_freshness_lookup_reads_one_entry_of_its_index(history: Engine) -> None:
    """Every shareable scan looks for the caller's identical completed call under the submit
    lock: by (owner, status) it read every completed task of the token (106 ms at 50k)."""
    argv = [*ARGV, "127.0.0.7"]
    params = {"p_call_key": dedupe_key("alice", ScanKind.QUICK, argv), "p_owner": "alice",
              "p_fresh_since": time.time() - 300}
    steps = plan_of(history, FRESH_TWIN, params)
    if history.dialect.name == "sqlite":
        assert steps == ["SEARCH tasks USING INDEX ix_tasks_fresh (call_key=? AND status=? AND finished_at>?)"], steps
    else:
        assert steps == ["Limit", "Index Scan using ix_tasks_fresh"], steps
    with history.connect() as conn:
        [found] = conn.execute(FRESH_TWIN, params).all()
    assert found.id == "alice-6" and found.owner == "alice"


def test_the_queue_length_every_submit_checks_reads_only_queued_entries(history: Engine) -> None:
    """The queue's length (status queued, shard_count 0) was counted on SQLite through the
    whole (owner, status, ...) covering index, every task ever: 2.6 ms under the submit lock
    at 50k tasks, a third of a submit's time."""
    steps = plan_of(history, USAGE_AND_WAITING, usage_params("alice", time.time()))
    if history.dialect.name == "sqlite":
        assert steps[-1] == "SEARCH tasks USING COVERING INDEX ix_tasks_status_pool_created (status=?)", steps
        assert not [step for step in steps if step.startswith("SCAN tasks")], steps
    else:
        assert "Seq Scan on tasks" not in steps, steps


@pytest.mark.anyio
async def test_find_hosts_by_port_reads_the_port_index_once_sqlite_has_statistics(tmp_path: Path) -> None:
    """Without statistics SQLite read find_hosts(port=80) through (owner, address_key): every
    port of the owner (151 ms at 103k hosts). The hourly job takes them again as the inventory
    grows (a process takes them at start too: tests/test_retention.py), and the connections
    already open use them; of the inventory only, never of tasks (db.ANALYZED_TABLES says why)."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    host_rows, port_rows = inventory_rows(3000)
    async with opened_stores(url, max_queued=10) as stores:
        query = HostQuery(port=80)
        assert await stores.inventory.find_hosts("alice", query, 50, 0) == ([], 0)
        with stores.db.engine.begin() as conn:
            conn.execute(insert(inventory_hosts), host_rows)
            conn.execute(insert(inventory_ports), port_rows)
            conn.execute(insert(tasks), completed_tasks("alice", 100, time.time()))
        with statements_run(stores) as seen:
            hosts, total = await stores.inventory.find_hosts("alice", query, 50, 0)
        with contextlib.ExitStack() as pool:  # every pooled connection open, its schema read
            for conn in [pool.enter_context(stores.db.engine.connect()) for _ in range(DB_THREADS["sqlite"])]:
                assert "ix_inventory_ports_owner_port" not in str(plans_in(conn, seen[:2]))
        await stores.db.refresh_statistics()
        with contextlib.ExitStack() as pool:
            connections = [pool.enter_context(stores.db.engine.connect()) for _ in range(DB_THREADS["sqlite"])]
            plans = [plans_in(conn, seen[:2]) for conn in connections]
            analyzed = set(connections[0].exec_driver_sql("SELECT DISTINCT tbl FROM sqlite_stat1").scalars())
    assert total == 300 and len(hosts) == 50
    by_port = "SEARCH inventory_ports USING INDEX ix_inventory_ports_owner_port (owner=? AND port=? AND state=?)"
    assert all(by_port in plan for per_connection in plans for plan in per_connection), plans
    assert analyzed == {"inventory_hosts", "inventory_ports"}


def plans_in(conn: Connection, statements: list[tuple[str, Any]]) -> list[list[str]]:
    return [[row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
            for sql, params in statements]


@pytest.mark.anyio
@pytest.mark.parametrize("status", [None, TaskStatus.COMPLETED])
async def test_the_overview_lists_every_tokens_newest_tasks_in_index_order(
    history: Engine, status: TaskStatus | None
) -> None:
    """The /ui overview (refreshed every 2 s) lists every token's newest tasks, and the newest
    completed ones: both sorted every task (156 and 136 ms at 50k tasks on SQLite)."""
    url = history.url.render_as_string(hide_password=False)
    async with opened_stores(url, max_queued=10) as stores:
        with statements_run(stores) as seen:
            newest = await stores.tasks.recent(None, status, 20)
        [(sql, params)] = [(sql, params) for sql, params in seen if "FROM tasks" in sql]
        with stores.db.engine.connect() as conn:
            if history.dialect.name == "sqlite":
                steps = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
            else:  # at 4,000 small rows a sequential scan is cheaper; at 50k PostgreSQL takes the index
                conn.exec_driver_sql("SET enable_seqscan = off")
                [[plan]] = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).all()
                steps = [node["Node Type"] + f" using {node.get('Index Name')}" for node in plan_nodes(plan[0]["Plan"])]
    assert {record.id for record in newest} == {f"{owner}-{n}" for n in range(10) for owner in ("alice", "bob")}
    if history.dialect.name == "sqlite":
        index = "ix_tasks_status_created (status=?)" if status else "ix_tasks_parent (parent_id=?)"
        assert steps == [f"SEARCH tasks USING INDEX {index}"], steps
    else:  # either index reads them in order
        assert steps[0] == "Limit using None" and steps[1].startswith("Index Scan using ix_tasks_"), steps


def changed_inventory(engine: Engine, now: float) -> set[str]:
    """alice's 3,000 hosts of inventory_rows, of which 30 changed and 30 others have a port that
    changed within the hour; the addresses of those 60."""
    host_rows, port_rows = inventory_rows(3000)
    changed = {row["address"] for row in host_rows[::100]}
    host_rows = [row | {"changed_at": now - 60} if row["address"] in changed else row for row in host_rows]
    with_port = {row["address"] for row in host_rows[50::100]}
    port_rows = [row | {"changed_at": now - 60} if row["address"] in with_port and row["port"] == 22 else row
                 for row in port_rows]
    with engine.begin() as conn:
        conn.execute(insert(inventory_hosts), host_rows)
        conn.execute(insert(inventory_ports), port_rows)
    return changed | with_port


def full_scans(engine: Engine, statements: list[tuple[str, Any]]) -> list[str]:
    """The steps of SQLite's plans of `statements` that read a whole table, or all of the
    owner's entries of an index (a derived table's rows, `anon_`, are what was found)."""
    with engine.connect() as conn:
        return [step for plan in plans_in(conn, statements) for step in plan if not step.startswith("SCAN anon_")
                and (step.startswith("SCAN") or step.endswith("(owner=?)"))]


@pytest.mark.anyio
async def test_changed_since_reads_the_hosts_and_ports_that_changed(database_url: str) -> None:
    """find_hosts(changed_since) read every host and port of the owner for the OR of a port's
    and its host's change (601 ms at 100k hosts on SQLite): the addresses that changed now come
    from the (owner, changed_at) indexes, and only their rows are read."""
    async with opened_stores(database_url, max_queued=10) as stores:
        expected = changed_inventory(stores.db.engine, time.time())
        await stores.db.refresh_statistics()
        with statements_run(stores) as seen:
            hosts, total = await stores.inventory.find_hosts("alice", HostQuery(changed_since=time.time() - 3600),
                                                             100, 0)
            by_port, by_port_total = await stores.inventory.find_hosts(
                "alice", HostQuery(port=22, changed_since=time.time() - 3600), 100, 0)
        scans = full_scans(stores.db.engine, seen) if stores.db.dialect == "sqlite" else []
    assert total == 60 and {host.address for host in hosts} == expected
    # Port 22 is open on every host: shown for the 30 whose port changed and the 30 that did.
    assert by_port_total == 60 and {host.address for host in by_port} == expected
    assert scans == [], scans


@pytest.mark.anyio
async def test_each_top_values_field_reads_its_index_alone(tmp_path: Path) -> None:
    """top_values counts the owner's open ports (or hosts): from an index holding the value,
    the state and the address, never the rows (SQLite: COVERING INDEX in every plan)."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    async with opened_stores(url, max_queued=10) as stores:
        changed_inventory(stores.db.engine, time.time())
        await stores.db.refresh_statistics()
        plans = {}
        for field in ("port", "service", "product", "version", "os", "status"):
            with statements_run(stores) as seen:
                await stores.inventory.top_values("alice", field, HostQuery(), 10)
            with stores.db.engine.connect() as conn:
                plans[field] = [step for plan in plans_in(conn, seen) for step in plan if "inventory_" in step]
    assert all(len(steps) == 1 and "USING COVERING INDEX ix_inventory_" in steps[0] for steps in plans.values()), plans


@pytest.mark.anyio
async def test_a_schedules_latest_change_is_the_newest_entry_of_its_index(database_url: str) -> None:
    """The overview shows each schedule's latest change: for a schedule whose runs found none
    for months, every run of it was read to learn so."""
    async with opened_stores(database_url, max_queued=10) as stores:
        with stores.db.engine.begin() as conn:
            conn.execute(insert(schedules), {"id": "s1", "owner": "alice", "kind": "quick", "spec": "127.0.0.1",
                                             "every": "1h", "created_at": 0.0, "next_run_at": 1e10})
            conn.execute(insert(schedule_runs), [
                {"id": f"r{n}", "schedule_id": "s1", "due_at": float(n), "status": "done", "webhook_attempts": 0,
                 "diff": '{"changed": true}' if n == 7 else None} for n in range(2000)])
        with statements_run(stores) as seen:
            [state], _ = await stores.schedules.states("alice", 10)
        [change] = [(sql, params) for sql, params in seen if "diff IS NOT NULL" in sql]
        with stores.db.engine.connect() as conn:
            if stores.db.dialect == "sqlite":
                steps = plans_in(conn, [change])[0]
            else:  # at 2,000 small rows a scan could be as cheap; the index is what it takes at scale
                conn.exec_driver_sql("SET enable_seqscan = off")
                [[plan]] = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {change[0]}", change[1]).all()
                steps = [node.get("Index Name") or node["Node Type"] for node in plan_nodes(plan[0]["Plan"])]
    assert state.last_change is not None and state.last_change.due_at == 7.0
    assert any("ix_schedule_runs_changes" in step for step in steps), steps
