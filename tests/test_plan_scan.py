"""plan_scan: a dry run of a scan tool's arguments, through in-memory clients of the real server
(real nmap, real SQLite). It refuses what the tool refuses, in the same words; its argv is the
one the scan then runs; it queues and counts nothing; its estimate comes from history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client
from sqlalchemy import Select

from db import create_db_engine, upgrade_schema
from models import ScanKind
from task_manager import HISTORY, RUN_HISTORY
from tests.conftest import OpenClient
from tests.support import SECRETS, NmapWrapper, answer_of, call, error_text

pytestmark = pytest.mark.anyio
NARROW = {"alice": {"secret": SECRETS["alice"], "allowed_targets": ["127.0.21.0/28"]}}


async def plan(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    return await answer_of(client, "plan_scan", tool=tool, arguments=arguments)


def queued_argvs(directory: Path) -> list[list[str]]:
    """The argv of each task queued, as the audit log recorded it."""
    lines = [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]
    return [line["argv"] for line in lines if line["event"] == "queued"]


REFUSED = [
    ("quick_scan", {"target": "127.0.21.100"}, "invalid_target"),
    ("custom_scan", {"command": "-p 1 -oN /tmp/x 127.0.21.1"}, "invalid_command"),
    ("custom_scan", {"command": "-p 1 --max-rate 60000 127.0.21.1"}, "invalid_command"),
    ("quick_scan", {"target": "127.0.21.1", "timeout": 1}, "invalid_argument"),
    ("scan", {"targets": "127.0.21.1", "ports": "1", "timing": "T5"}, "invalid_argument"),
    ("full_scan", {"target": "127.0.21.1", "pool": "dmz"}, "no_pool"),
]


@pytest.mark.parametrize(("tool", "arguments", "code"), REFUSED)
async def test_a_refused_plan_says_what_the_call_would_say(
    in_memory: OpenClient, tool: str, arguments: dict[str, Any], code: str
) -> None:
    async with in_memory(tokens=NARROW) as alice:
        planned = await plan(alice, tool, **arguments)
        called = error_text(await call(alice, tool, arguments))
        assert (await answer_of(alice, "list_tasks"))["tasks"] == []
    assert planned["verdict"] == "refused" and planned["code"] == code and planned["scan"] is None
    assert f"{planned['code']}: {planned['reason']}" == called


async def test_a_token_plans_only_the_tools_it_may_call(in_memory: OpenClient) -> None:
    tokens = {"bob": {"secret": SECRETS["bob"], "tools": ["plan_scan", "quick_scan"]}}
    async with in_memory("bob", tokens=tokens) as bob:
        refused = await plan(bob, "custom_scan", command="-p 1 127.0.21.1")
        allowed = await plan(bob, "quick_scan", target="127.0.21.1")
    assert (refused["verdict"], refused["code"], refused["reason"]) == (
        "refused", "forbidden", "this token may not use custom_scan")
    assert allowed["verdict"] == "allowed"


async def test_a_plan_is_the_scan_that_then_runs_and_queues_nothing(in_memory: OpenClient, tmp_path: Path) -> None:
    calls = [("custom_scan", {"command": "-p 1-20,T:30 127.0.21.0/30"}), ("quick_scan", {"target": "127.0.21.5"}),
             ("scan", {"targets": ["127.0.21.6", "127.0.21.7"], "ports": "22,80"}),
             ("full_scan", {"target": "127.0.21.8", "skip_host_discovery": True})]
    async with in_memory() as alice:
        used = await answer_of(alice, "get_limits")
        plans = [await plan(alice, tool, **arguments) for tool, arguments in calls]
        assert (await answer_of(alice, "list_tasks"))["tasks"] == []
        assert await answer_of(alice, "get_limits") == used
        assert queued_argvs(tmp_path) == []
        for tool, arguments in calls:
            await answer_of(alice, tool, **arguments)
    assert {p["verdict"] for p in plans} == {"allowed"} and {p["code"] for p in plans} == {None}
    scans = [p["scan"] for p in plans]
    assert [s["argv"] for s in scans] == queued_argvs(tmp_path)
    assert [(s["addresses"], s["ports_per_address"], s["probes"]) for s in scans] == [
        (4, 21, 84), (1, 100, 100), (2, 2, 4), (1, 65535, 65535)]
    custom = scans[0]
    assert (custom["pool"], custom["shards"], custom["max_rate"], custom["queued"]) == ("default", 1, 50_000, 0)
    assert (custom["workers_alive"], custom["capacity"], custom["running"]) == (1, 10, 0)
    assert custom["estimate"]["packets"] == 84 + 4 * 2, "one probe per address and port, two to discover each"
    assert scans[3]["estimate"]["packets"] == 65535, "-Pn: no discovery"


async def test_a_plan_shows_the_shards_the_scan_is_then_cut_into(in_memory: OpenClient) -> None:
    """One live worker: a big scan is one nmap run. bob's stdio process is a worker of the pool,
    but takes only bob's scans: alice's scan stays whole. A second process of alice's (each
    stdio process's worker takes its caller's scans): shards of at most shard_addresses, as the
    scan then runs."""
    command = "-p 1 127.0.21.0/25"
    async with in_memory(shard_addresses=64) as alice:
        whole = (await plan(alice, "custom_scan", command=command))["scan"]
        async with in_memory("bob"):
            beside_bob = (await plan(alice, "custom_scan", command=command))["scan"]
        async with in_memory("alice"):
            sharded = (await plan(alice, "custom_scan", command=command))["scan"]
            done = await answer_of(alice, "custom_scan", command=command, timeout=60)
            runs = (await answer_of(alice, "get_task_evidence", task_id=done["task_id"]))["runs"]
    assert (whole["shards"], whole["workers_alive"], whole["addresses"]) == (1, 1, 128)
    assert (beside_bob["shards"], beside_bob["workers_alive"]) == (1, 2)
    assert (sharded["shards"], sharded["workers_alive"], sharded["addresses"], sharded["probes"]) == (2, 2, 128, 128)
    assert done["status"] == "completed" and [run["target"] for run in runs] == ["127.0.21.0/26", "127.0.21.64/26"]


async def test_a_pool_whose_runs_waited_on_the_network_cuts_a_long_scan_for_its_free_slots(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper
) -> None:
    """One worker of two slots: a /24 of 100 ports runs whole (nmap's efficient group for it is
    256, and one worker never splits a fast scan). After a custom scan whose nmap took 1.5 s
    for 160 probes (the wrapper waits, as nmap waits on a slow network), the pool is slow for
    custom scans: the same /24 is cut in two shards per free slot of nmap's least group, 64,
    in the plan and then in the scan."""
    command = "-p 1-100 127.80.1.0/24"
    async with in_memory(max_concurrent_tasks=2) as alice:
        fast = (await plan(alice, "custom_scan", command=command))["scan"]
        nmap_wrapper.set_delay(1.5)
        slow_run = await answer_of(alice, "custom_scan", command="-p 1-10 127.80.0.0/28", timeout=60)
        nmap_wrapper.set_delay(0)
        sharded = (await plan(alice, "custom_scan", command=command))["scan"]
        done = await answer_of(alice, "custom_scan", command=command, timeout=60)
        runs = (await answer_of(alice, "get_task_evidence", task_id=done["task_id"]))["runs"]
    assert slow_run["status"] == "completed"
    assert (fast["shards"], fast["workers_alive"], fast["capacity"]) == (1, 1, 2)
    assert sharded["shards"] == 4
    assert done["status"] == "completed" and [run["target"] for run in runs] == [
        f"127.80.1.{first}/26" for first in (0, 64, 128, 192)]


async def test_a_plan_answers_rate_limited_and_names_the_scan_it_would_reuse(in_memory: OpenClient) -> None:
    tokens = {"alice": {"secret": SECRETS["alice"], "limits": {"scans_per_minute": 1}}}
    async with in_memory(tokens=tokens) as alice:
        first = await answer_of(alice, "quick_scan", target="127.0.21.9")
        again = await plan(alice, "quick_scan", target="127.0.21.9")
        other = await plan(alice, "quick_scan", target="127.0.21.10")
        forced = await plan(alice, "quick_scan", target="127.0.21.9", rescan=True)
    assert again["verdict"] == "allowed" and again["scan"]["reuses_task"] == first["task_id"]
    assert other["verdict"] == "refused" and other["code"] == "rate_limited"
    assert other["reason"].startswith("1 scans per minute for token 'alice'; retry in ")
    assert other["scan"]["argv"][-1] == "127.0.21.10" and other["scan"]["probes"] == 100
    assert other["scan"]["reuses_task"] is None
    assert forced["code"] == "rate_limited"


async def test_the_estimate_comes_from_the_fleet_s_history_of_similar_scans(in_memory: OpenClient) -> None:
    """Without history there is no duration, only the floor its rate cap sets; after a few scans
    of the kind, the estimate of the next is within a generous factor of what it then takes."""
    command = {"command": "-Pn -p 1-3000 --max-rate 10000 127.0.21.11"}
    tokens = {name: {"secret": SECRETS[name]} for name in ("alice", "bob")}
    async with in_memory(tokens=tokens) as alice, in_memory("bob", tokens=tokens) as bob:
        blank = (await plan(alice, "custom_scan", **command))["scan"]["estimate"]
        for _ in range(3):
            await answer_of(bob, "custom_scan", **command)
        estimate = (await plan(alice, "custom_scan", **command))["scan"]["estimate"]
        ran = await answer_of(alice, "custom_scan", **command)
    assert blank["duration_s"] is None and blank["based_on"] == 0 and blank["min_duration_s"] == 0.3
    assert estimate["based_on"] == 3 and "custom scans in pool 'default'" in estimate["method"]
    took = ran["finished_at"] - ran["started_at"]
    assert took >= 0.3 and 0.2 * took <= estimate["duration_s"] <= 5 * took, (estimate, took)


@pytest.mark.parametrize("statement", [HISTORY, RUN_HISTORY])
def test_the_history_is_read_from_its_index_alone(tmp_path: Path, statement: Select[Any]) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    upgrade_schema(engine)
    params = {"p_kind": ScanKind.QUICK.value, "p_pool": "default", "p_limit": 50}
    compiled = statement.compile(engine)
    bound = compiled.construct_params(params)
    with engine.connect() as conn:
        steps = [row[-1] for row in conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {compiled}", tuple(bound[name] for name in compiled.positiontup or ()))]
    engine.dispose()
    assert steps == ["SEARCH tasks USING COVERING INDEX ix_tasks_history (kind=? AND pool=? AND status=?)"], steps
