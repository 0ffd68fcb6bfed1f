"""Per-token limits, enforced in the database: on real SQLite and PostgreSQL, across two
"processes" (stores) on one database, and through the tools of in-memory clients."""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert

from config import Limits
from db import create_db_engine, upgrade_schema
from limits import USAGE, USAGE_AND_WAITING, RateLimited, usage_params
from models import ScanKind, TaskStatus, tasks
from sharding import Shard
from stores import Stores
from tests.conftest import OpenClient
from tests.nodes import opened_stores
from tests.support import SECRETS, answer_of, call, error_text

pytestmark = pytest.mark.anyio
MakeStore = Callable[[], Awaitable[Stores]]
ARGV = ["/usr/bin/nmap", "-sT", "-p", "1", "--", "127.0.0.1"]
WIDE = Limits(scans_per_minute=100, concurrent_scans=100, addresses_per_day=100_000, rescans_per_hour=100)


@pytest.fixture
async def make_store(database_url: str) -> AsyncIterator[MakeStore]:
    """Stores without workers: what they queue stays queued, which the limits count too."""
    async with contextlib.AsyncExitStack() as opened:

        async def make() -> Stores:
            return await opened.enter_async_context(opened_stores(database_url, max_queued=1000))

        yield make


async def submit(stores: Stores, limits: Limits, owner: str = "alice", addresses: int = 1,
                 forced: bool = False, probes: int = 1) -> None:
    await stores.tasks.submit(owner, ScanKind.QUICK, "127.0.0.1", ARGV, 60, limits=limits, address_count=addresses,
                             forced=forced, probe_count=probes)


def retry_seconds(error: RateLimited, window: int) -> int:
    seconds = int(re.search(r"retry in (\d+) s$", str(error)).group(1))  # type: ignore[union-attr]
    assert 0 < seconds <= window
    return seconds


async def test_scans_per_minute_hold_across_processes(make_store: MakeStore) -> None:
    first, second = await make_store(), await make_store()
    limits = Limits(scans_per_minute=2, concurrent_scans=100, addresses_per_day=10_000, rescans_per_hour=100)
    await submit(first, limits)
    await submit(second, limits)
    with pytest.raises(RateLimited, match=r"^2 scans per minute for token 'alice'; retry in \d+ s$") as refused:
        await submit(first, limits)
    assert retry_seconds(refused.value, 60) > 50
    await submit(second, limits, owner="bob")
    assert (await first.usage.usage("alice"))["scans_per_minute"] == 2


async def test_concurrent_scans_count_what_is_queued_or_running(make_store: MakeStore) -> None:
    store = await make_store()
    limits = Limits(scans_per_minute=100, concurrent_scans=2, addresses_per_day=10_000, rescans_per_hour=100)
    await submit(store, limits)
    await submit(store, limits)
    refused = r"^2 concurrent scans for token 'alice'; retry when one of them has finished"
    with pytest.raises(RateLimited, match=refused):
        await submit(store, limits)
    [oldest, *_] = await store.tasks.recent("alice", None, 10)
    await store.tasks.cancel(oldest.id, "alice")
    await submit(store, limits)


async def test_addresses_per_day_and_forced_rescans(make_store: MakeStore) -> None:
    store = await make_store()
    limits = Limits(scans_per_minute=100, concurrent_scans=100, addresses_per_day=300, rescans_per_hour=1)
    await submit(store, limits, addresses=256)
    await submit(store, limits, addresses=40)
    with pytest.raises(RateLimited, match=r"^300 addresses per day for token 'alice'; retry in \d+ s$") as refused:
        await submit(store, limits, addresses=8)
    assert retry_seconds(refused.value, 86_400) > 86_000
    with pytest.raises(RateLimited, match="covers 512 addresses, more than the 300 addresses per day"):
        await submit(store, limits, owner="bob", addresses=512)
    await submit(store, limits, owner="bob", forced=True)
    with pytest.raises(RateLimited, match=r"^1 rescans per hour for token 'bob'; retry in \d+ s$"):
        await submit(store, limits, owner="bob", forced=True)
    await submit(store, limits, owner="bob")


async def test_probes_per_day_weigh_each_scan_by_its_addresses_x_ports(make_store: MakeStore) -> None:
    first, second = await make_store(), await make_store()
    limits = WIDE.model_copy(update={"probes_per_day": 1000})
    await submit(first, limits, probes=600)
    await submit(second, limits, probes=300)
    refused = r"^1000 probes per day for token 'alice' \(this scan sends 200\); retry in \d+ s$"
    with pytest.raises(RateLimited, match=refused) as waited:
        await submit(first, limits, probes=200)
    assert retry_seconds(waited.value, 86_400) > 86_000
    await submit(first, limits, probes=100)
    with pytest.raises(RateLimited, match=r"^this scan sends 1500 probes \(addresses x ports\), more than the 1000 "
                                          r"probes per day of token 'bob'; scan fewer addresses or ports$"):
        await submit(second, limits, owner="bob", probes=1500)
    assert (await second.usage.usage("alice"))["probes_per_day"] == 1000


async def test_a_window_counts_exactly_the_tasks_since_its_start(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each window is summed per minute of usage, with the minute it starts in read from the
    tasks themselves: tasks 5 s inside and 5 s outside a window, both in that first minute,
    are told apart."""
    store = await make_store()
    now = 1_800_000_030.0  # 30 s into a minute: each window starts 30 s into its first minute
    clock = {"now": now}
    monkeypatch.setattr(time, "time", lambda: clock["now"])
    for age, addresses in ((86_405, 1000), (86_395, 100), (3605, 10), (3595, 1), (65, 0), (55, 0)):
        clock["now"] = now - age
        await submit(store, WIDE, addresses=addresses, forced=True, probes=addresses * 7)
    clock["now"] = now
    used = await store.usage.usage("alice")
    assert used["addresses_per_day"] == 111 and used["rescans_per_hour"] == 3 and used["scans_per_minute"] == 1
    assert used["probes_per_day"] == 777


async def test_a_token_s_own_limits_through_its_tools(in_memory: OpenClient) -> None:
    tokens = {"alice": {"secret": SECRETS["alice"]},
              "bob": {"secret": SECRETS["bob"], "limits": {"scans_per_minute": 1}}}
    config = {"tokens": tokens, "limits": {"concurrent_scans": 5}}
    async with in_memory(**config) as alice, in_memory("bob", **config) as bob:
        assert not (await call(bob, "custom_scan", {"command": "-p 1 127.0.0.1"})).is_error
        second = await call(bob, "custom_scan", {"command": "-p 2 127.0.0.1"})
        assert re.fullmatch(r"rate_limited: 1 scans per minute for token 'bob'; retry in \d+ s", error_text(second))
        assert not (await call(alice, "custom_scan", {"command": "-p 2 127.0.0.1"})).is_error
        shown = await answer_of(bob, "get_limits")
    by_name = {entry["name"]: entry for entry in shown["limits"]}
    assert shown["token"] == "bob" and by_name["scans_per_minute"] == {
        "name": "scans_per_minute", "limit": 1, "used": 1, "window": "the last minute"}
    assert by_name["concurrent_scans"]["limit"] == 5 and by_name["addresses_per_day"]["limit"] == 65_536
    assert by_name["probes_per_day"] == {"name": "probes_per_day", "limit": 1_000_000_000, "used": 1, "window": (
        "the last 24 hours; a scan's probes are its addresses x ports")} and shown["max_rate"] == 50_000


async def test_probe_budget_and_rate_cap_through_the_tools(in_memory: OpenClient) -> None:
    """A token's probes_per_day counts each scan's addresses x ports; its max_rate caps the
    --max-rate of custom_scan, and a lower one of its own is kept."""
    tokens = {"bob": {"secret": SECRETS["bob"], "limits": {"probes_per_day": 150, "max_rate": 2000}}}
    async with in_memory("bob", tokens=tokens) as bob:
        assert not (await call(bob, "custom_scan", {"command": "-p 1-100 --max-rate 1000 127.0.21.1"})).is_error
        refused = await call(bob, "custom_scan", {"command": "-p 1-30 127.0.21.2-3"})
        assert re.fullmatch(r"rate_limited: 150 probes per day for token 'bob' \(this scan sends 60\); retry in \d+ s",
                            error_text(refused))
        too_fast = await call(bob, "custom_scan", {"command": "-p 1 --max-rate 2001 127.0.21.1"})
        assert error_text(too_fast) == ("invalid_command: '--max-rate 2001' is above this token's cap of 2000 "
                                        "packets per second; give at most --max-rate 2000, or leave it out to get 2000")
        shown = await answer_of(bob, "get_limits")
    assert {entry["name"]: entry["used"] for entry in shown["limits"]}["probes_per_day"] == 100
    assert shown["max_rate"] == 2000


def test_the_usage_check_of_every_submit_reads_no_task_row(tmp_path: Path) -> None:
    """A task's row holds its result and XML: a usage check that read the rows of the token's
    day cost a submit 4.7 ms at 1,200 tasks, growing with every scan. SQLite must answer it
    from the indexes alone, and the queue's length, in the same statement, from the queue's
    index (tests/test_history_scale.py checks it does with 4,000 tasks too)."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    upgrade_schema(engine)
    params = usage_params("alice", time.time())
    plans = {}
    for name, statement in (("usage", USAGE), ("submit", USAGE_AND_WAITING)):
        sql = str(statement.params(params).compile(engine, compile_kwargs={"literal_binds": True}))
        with engine.connect() as conn:
            plans[name] = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
                           if row[-1].startswith(("SEARCH", "SCAN")) and row[-1] != "SCAN CONSTANT ROW"]
    engine.dispose()
    task_reads = [step for step in plans["usage"] if step.startswith("SEARCH tasks")]
    assert len(task_reads) == 6 and all("USING COVERING INDEX" in step for step in task_reads), plans
    assert [step for step in plans["usage"] if step not in task_reads] == [
        "SEARCH usage_minutes USING PRIMARY KEY (owner=? AND minute>?)"] * 4, plans
    queue = "SEARCH tasks USING COVERING INDEX ix_tasks_status_pool_created (status=?)"
    assert plans["submit"] == [*plans["usage"], queue], plans


def plan_nodes(node: dict[str, object]) -> Iterator[dict[str, object]]:
    yield node
    for child in node.get("Plans", []):  # type: ignore[union-attr]
        yield from plan_nodes(child)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgresql_counts_a_tokens_running_scans_without_reading_its_finished_ones(
    database_url: str, make_store: MakeStore
) -> None:
    """Given `status IN ('queued', 'running')`, PostgreSQL read every task of the token and
    filtered them (802 rows for 10 active ones in the benchmark), at every submit."""
    store = await make_store()
    for _ in range(3):
        await store.tasks.submit("alice", ScanKind.QUICK, "127.0.0.1", ARGV, 60)
    now = time.time()
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        conn.execute(insert(tasks), [
            {"id": str(uuid.uuid4()), "owner": "alice", "kind": ScanKind.QUICK.value, "target": "127.0.0.1",
             "argv": json.dumps(ARGV), "status": TaskStatus.COMPLETED.value, "created_at": now - n, "time_limit": 60}
            for n in range(2000)])
        conn.exec_driver_sql("ANALYZE tasks")
    params = usage_params("alice", now)
    sql = str(USAGE.params(params).compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        [[plan]] = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").all()
    engine.dispose()
    nodes = list(plan_nodes((plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]))
    by_status = [n for n in nodes if "status" in str(n.get("Index Cond", ""))]
    assert len(by_status) == 2, nodes
    assert not [n for n in nodes if "status" in str(n.get("Filter", ""))], nodes


async def test_each_shard_of_a_sharded_scan_counts_toward_concurrent_scans(make_store: MakeStore) -> None:
    """A /24 in 4 shards starts 4 nmaps: it counts 4, not 1 (it counted 1 and started 4)."""
    store = await make_store()
    limits = WIDE.model_copy(update={"concurrent_scans": 5})
    shards = [Shard(f"127.0.0.{i}", [*ARGV[:-1], f"127.0.0.{i}"]) for i in range(1, 5)]
    await store.tasks.submit("alice", ScanKind.CUSTOM, "127.0.0.1-4", ARGV, 60, limits=limits, shards=shards,
                             address_count=4)
    assert (await store.usage.usage("alice"))["concurrent_scans"] == 4
    await submit(store, limits)
    with pytest.raises(RateLimited, match=r"^5 concurrent scans for token 'alice'"):
        await submit(store, limits)
    with pytest.raises(RateLimited, match=r"^this scan runs as 6 nmap processes \(one per shard\), more than the 5"):
        await store.tasks.submit("bob", ScanKind.CUSTOM, "127.0.0.1-6", ARGV, 60, limits=limits, address_count=6,
                                 shards=[*shards, *shards[:2]])
