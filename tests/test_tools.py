"""The tools' logic through in-memory clients of create_server(...) (the in_memory fixture):
answers, cached results and the hand-off to the background, codes of errors, one token's
tasks hidden from another, descriptions, schemas and annotations, paging. Real nmap scans
loopback listeners the tests open, on a real SQLite database; no HTTP. What needs HTTP or a
process (tokens, URL tokens, Host/Origin, logs, kill -9) is in test_server.py and
test_hardening.py."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import pytest

from config import load_settings
from server import create_server
from tests.conftest import OpenClient, ToolClient
from tests.support import (
    Listeners,
    NmapWrapper,
    answer_of,
    call,
    error_text,
    finished,
    running_task,
    write_config,
)

pytestmark = pytest.mark.anyio
UNKNOWN_TASK = "00000000-0000-4000-8000-000000000000"
READ_ONLY_TOOLS = {"get_task_status", "get_task_evidence", "get_task_result", "list_tasks", "diff_scans",
                   "list_workers", "find_hosts", "top_values", "nmap_version", "get_limits", "list_schedules",
                   "list_engagements", "get_engagement", "plan_scan"}
SCAN_TOOLS = {"quick_scan", "full_scan", "custom_scan", "scan", "schedule_scan"}
DESTRUCTIVE_TOOLS = {"cancel_task", "delete_schedule"}


async def test_quick_scan_reports_exactly_the_test_listeners(in_memory: OpenClient, listeners: Listeners) -> None:
    ports = listeners.open_free_top_ports(3)
    async with in_memory() as alice:

        async def open_ports(**flags: bool) -> tuple[set[int], str | None]:
            result = await answer_of(alice, "quick_scan", target="127.0.0.1", **flags)
            [host] = result["result"]["hosts"]
            return {p["port"] for p in host["ports"] if p["state"] == "open" and p["port"] in ports}, result["message"]

        assert await open_ports() == (set(ports), None)
        listeners.close_all()
        cached, message = await open_ports()
        assert cached == set(ports) and "pass rescan=true to scan again" in (message or "")
        assert await open_ports(rescan=True) == (set(), None)


async def test_a_scan_longer_than_the_wait_returns_a_task_id_and_runs_once(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(6)
    async with in_memory() as alice:
        first = await answer_of(alice, "quick_scan", target="127.0.0.1", timeout=5)
        assert first["status"] == "running" and first["result"] is None
        assert f"get_task_result with task_id '{first['task_id']}'" in first["message"]
        final = await finished(alice, first["task_id"])
    assert final["status"] == "completed"
    assert port in {p["port"] for p in final["result"]["hosts"][0]["ports"]}
    assert len(nmap_wrapper.pids()) == 1


async def test_simultaneous_calls_respect_concurrency_and_queue_bounds(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(1)
    async with in_memory(max_concurrent_tasks=2, max_queued_tasks=3) as alice:
        calls = [asyncio.create_task(call(alice, "quick_scan", {"target": "127.0.0.1", "timeout": 30, "rescan": True}))
                 for _ in range(10)]
        peak = 0
        while not all(c.done() for c in calls):
            peak = max(peak, len(nmap_wrapper.alive()))
            await asyncio.sleep(0.01)
    results = [c.result() for c in calls]
    refused = [error_text(r) for r in results if r.is_error]
    accepted = [r.structured_content for r in results if not r.is_error]
    assert peak == 2
    assert refused and all(text.startswith("queue_full: the scan queue is full") for text in refused)
    assert all(a["status"] == "completed" for a in accepted)
    assert len(nmap_wrapper.pids()) == len(accepted)


async def test_cancel_task_stops_nmap_and_answers_the_waiting_call(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(60)
    async with in_memory() as alice:
        waiting = asyncio.create_task(call(alice, "quick_scan", {"target": "127.0.0.1", "timeout": 60}))
        task_id = await running_task(alice, nmap_wrapper)
        [pid] = nmap_wrapper.alive()
        cancelled = await answer_of(alice, "cancel_task", task_id=task_id)
        assert cancelled["status"] == "cancelled"
        assert nmap_wrapper.alive() == [] and pid in nmap_wrapper.pids()
        answered = (await asyncio.wait_for(waiting, 10)).structured_content
        assert (answered["task_id"], answered["status"]) == (task_id, "cancelled")
        again = await call(alice, "cancel_task", {"task_id": task_id})
        assert error_text(again) == f"already_finished: task {task_id} is already cancelled"


async def test_tokens_cannot_see_each_others_tasks(in_memory: OpenClient) -> None:
    async with in_memory() as alice, in_memory("bob") as bob:
        mine = await answer_of(alice, "quick_scan", target="127.0.0.1")
        for tool in ("get_task_status", "get_task_result", "cancel_task"):
            foreign = error_text(await call(bob, tool, {"task_id": mine["task_id"]}))
            missing = error_text(await call(bob, tool, {"task_id": UNKNOWN_TASK}))
            expected = f"not_found: no task '{mine['task_id']}'"
            assert foreign == missing.replace(UNKNOWN_TASK, mine["task_id"]) == expected
        assert await answer_of(bob, "list_tasks") == {"tasks": []}
        listed = await answer_of(alice, "list_tasks", status="completed")
    assert [t["task_id"] for t in listed["tasks"]] == [mine["task_id"]]


async def test_identical_scans_share_one_task_unless_rescan(in_memory: OpenClient, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(1)
    async with in_memory() as alice, in_memory("bob") as bob:
        first, second = await asyncio.gather(*(
            answer_of(alice, "quick_scan", target="127.0.0.2", timeout=30) for _ in range(2)))
        ids = {first["task_id"], second["task_id"]}
        assert len(ids) == 1 and len(nmap_wrapper.pids()) == 1
        fresh = await answer_of(alice, "quick_scan", target="127.0.0.2", rescan=True)
        assert fresh["task_id"] not in ids and len(nmap_wrapper.pids()) == 2
        others = await answer_of(bob, "quick_scan", target="127.0.0.2")
        assert others["task_id"] not in ids and len(nmap_wrapper.pids()) == 3


HOSTILE_TARGETS = ["--script={tmp}/x.nse", "-oN{tmp}/x", "-iL/etc/passwd", "127.0.0.1;id", "127.0.0.1 -oN{tmp}/y",
                   "$(touch {tmp}/z)", "0177.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "10.0.0.0/8"]


async def test_hostile_targets_are_refused_before_nmap_starts(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper, tmp_path: Path
) -> None:
    (tmp_path / "x.nse").write_text('os.execute("touch ' + str(tmp_path / "ran") + '")')
    async with in_memory(allowed_targets=["0.0.0.0/0"]) as alice:
        before = set(tmp_path.iterdir())
        for template in HOSTILE_TARGETS:
            for tool in ("quick_scan", "full_scan"):
                result = await call(alice, tool, {"target": template.format(tmp=tmp_path)})
                assert error_text(result).startswith("invalid_target: "), (template, tool)
        assert nmap_wrapper.pids() == []
        assert set(tmp_path.iterdir()) == before


async def test_input_validation_is_strict(in_memory: OpenClient, nmap_wrapper: NmapWrapper) -> None:
    async with in_memory() as alice:
        for args in ({"target": "127.0.0.1", "timeout": "30"}, {"target": "127.0.0.1", "timeout": 4},
                     {"target": "127.0.0.1", "timeout": 301}, {"target": "127.0.0.1", "extra": 1}, {}):
            assert (await call(alice, "quick_scan", args)).is_error, args
        assert (await call(alice, "get_task_status", {"task_id": "../../etc/passwd"})).is_error
    assert nmap_wrapper.pids() == []


ARGUMENT_ERRORS = [
    ("quick_scan", {"target": "127.0.0.1", "timeout": 4},
     "invalid_argument: timeout must be a whole number from 5 to 300"),
    ("quick_scan", {"target": "127.0.0.1", "timeout": "30"}, "invalid_argument: timeout must be a whole number"),
    ("quick_scan", {}, "invalid_argument: target is required"),
    ("quick_scan", {"target": "x" * 5000}, "invalid_argument: target must be a string of 1 to 253 characters"),
    ("quick_scan", {"target": "127.0.0.1", "colour": "red"},
     "invalid_argument: 'colour' is not an argument of quick_scan; it takes target, timeout, rescan, pool"),
    ("get_task_result", {"task_id": "../../etc/passwd"}, "invalid_argument: task_id must be a string matching"),
    ("get_task_result", {"task_id": UNKNOWN_TASK, "format": "pdf"},
     "invalid_argument: format must be one of json, xml, csv"),
    ("no_such_tool", {}, "not_found: there is no tool 'no_such_tool'"),
]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_every_tool_error_starts_with_a_code_and_never_quotes_a_library(in_memory: OpenClient, mode: str) -> None:
    async with in_memory(mode=mode) as alice:
        for tool, arguments, message in ARGUMENT_ERRORS:
            text = error_text(await call(alice, tool, arguments))
            assert text.startswith(message), (tool, arguments, text)
            assert "http" not in text and "pydantic" not in text and "x" * 201 not in text


async def test_tools_describe_themselves(in_memory: OpenClient) -> None:
    async with in_memory(mode="legacy") as alice:
        tools = {tool.name: tool for tool in await alice.list_tools()}
    assert set(tools) == READ_ONLY_TOOLS | SCAN_TOOLS | DESTRUCTIVE_TOOLS
    for tool in tools.values():
        assert tool.description and tool.output_schema and tool.annotations, tool.name
        assert "$ref" not in str(tool.input_schema) and "$ref" not in str(tool.output_schema), "schemas are inlined"
    assert "--top-ports 100" in tools["quick_scan"].description
    assert tools["quick_scan"].input_schema["properties"]["timeout"]["maximum"] == 300
    assert tools["full_scan"].input_schema["properties"]["timeout"]["maximum"] == 600
    assert "X-Nmap-MCP-Signature" in tools["schedule_scan"].description
    hints = {name: (t.annotations.read_only_hint, t.annotations.destructive_hint, t.annotations.open_world_hint)
             for name, t in tools.items() if t.annotations}
    assert {name for name, hint in hints.items() if hint == (True, False, False)} == READ_ONLY_TOOLS
    assert {name for name, hint in hints.items() if hint == (False, False, True)} == SCAN_TOOLS
    assert {name for name, hint in hints.items() if hint == (False, True, False)} == DESTRUCTIVE_TOOLS


async def test_list_tasks_shows_the_newest_first_up_to_its_limit(in_memory: OpenClient) -> None:
    async with in_memory() as alice:
        done = [(await answer_of(alice, "custom_scan", command=f"-p {port} 127.0.0.1"))["task_id"]
                for port in (1, 2, 3)]
        refused = await call(alice, "custom_scan", {"command": "-p 4 127.0.0.1", "timeout": 5, "pool": "elsewhere"})
        assert error_text(refused).startswith("no_pool: ")
        newest = await answer_of(alice, "list_tasks", limit=2)
        everything = await answer_of(alice, "list_tasks")
        none_failed = await answer_of(alice, "list_tasks", status="failed")
        too_many = await call(alice, "list_tasks", {"limit": 101})
    assert [t["task_id"] for t in newest["tasks"]] == done[:0:-1]
    assert [t["task_id"] for t in everything["tasks"]] == done[::-1], "a refused scan is no task"
    assert all("result" not in t for t in everything["tasks"]), "listings carry no results"
    assert none_failed == {"tasks": []}
    assert error_text(too_many) == "invalid_argument: limit must be a whole number from 1 to 100"


async def test_get_task_result_pages_hosts_and_says_where_the_rest_starts(
    in_memory: OpenClient, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    async with in_memory() as alice:
        scan = await answer_of(alice, "custom_scan", command=f"-Pn -p {port} 127.0.0.1-5")
        task = scan["task_id"]
        first = await answer_of(alice, "get_task_result", task_id=task, limit=2)
        last = await answer_of(alice, "get_task_result", task_id=task, limit=2, offset=4)
        rows = await answer_of(alice, "get_task_result", task_id=task, format="csv", limit=2, offset=2)
        whole = await answer_of(alice, "get_task_result", task_id=task, view="full", limit=1000)
    assert [h["address"] for h in scan["result"]["hosts"]] == [f"127.0.0.{n}" for n in range(1, 6)]
    assert first["page"] == {"unit": "hosts", "offset": 0, "returned": 2, "total": 5, "next_offset": 2, "cut": None}
    assert [h["address"] for h in first["result"]["hosts"]] == ["127.0.0.1", "127.0.0.2"]
    assert f"task_id '{task}', format 'json', view 'summary' and offset 2 for more" in first["message"]
    assert not first["truncated"], "a page the caller asked for is not a cut"
    assert last["page"]["next_offset"] is None and last["message"] is None
    assert [h["address"] for h in last["result"]["hosts"]] == ["127.0.0.5"]
    table = list(csv.reader(io.StringIO(rows["content"])))
    assert [row[0] for row in table[1:]] == ["127.0.0.3", "127.0.0.4"] and rows["page"]["next_offset"] == 4
    assert whole["page"]["returned"] == 5 and whole["page"]["next_offset"] is None and whole["message"] is None


async def test_list_workers_shows_the_pool_and_the_worker_of_this_server(in_memory: OpenClient) -> None:
    async with in_memory(max_concurrent_tasks=3) as alice:
        [pool] = (await answer_of(alice, "list_workers"))["pools"]
    assert (pool["pool"], pool["networks"], pool["queued"], pool["workers_alive"]) == ("default", [], 0, 1)
    [worker] = pool["workers"]
    assert (worker["name"], worker["capacity"], worker["running"], worker["alive"]) == ("alice-0 stdio", 3, 0, True)


async def test_a_schedule_is_deleted_by_its_owner_alone(in_memory: OpenClient, nmap_wrapper: NmapWrapper) -> None:
    async with in_memory() as alice, in_memory("bob") as bob:
        created = await answer_of(alice, "schedule_scan", kind="quick", target="127.0.0.1", every="0 3 * * *")
        schedule = created["schedule_id"]
        assert created["webhook_secret"] is None, "no webhook, no secret"
        foreign = await call(bob, "delete_schedule", {"schedule_id": schedule})
        assert error_text(foreign) == f"not_found: no schedule '{schedule}'"
        assert (await answer_of(bob, "list_schedules"))["schedules"] == []
        assert [s["schedule_id"] for s in (await answer_of(alice, "list_schedules"))["schedules"]] == [schedule]
        assert await answer_of(alice, "delete_schedule", schedule_id=schedule) == {
            "schedule_id": schedule, "deleted": True}
        assert (await answer_of(alice, "list_schedules"))["schedules"] == []
        again = await call(alice, "delete_schedule", {"schedule_id": schedule})
        assert error_text(again) == f"not_found: no schedule '{schedule}'"
    assert nmap_wrapper.pids() == [], "a daily schedule made now has not run"


async def test_a_call_without_an_identity_is_refused_by_every_tool(tmp_path: Path, nmap_wrapper: NmapWrapper) -> None:
    """Over HTTP a call without a valid token never reaches a tool (test_server.py); should one
    ever get there, as an in-memory call to the HTTP server does, it acts for nobody."""
    config = write_config(tmp_path / "config.json", nmap_path=str(nmap_wrapper.path),
                          audit_log=str(tmp_path / "audit.jsonl"))
    mcp, _runtime = create_server(load_settings(config), str(nmap_wrapper.path))
    async with ToolClient(mcp) as anonymous:
        for tool, arguments in (("quick_scan", {"target": "127.0.0.1"}), ("list_tasks", {}), ("get_limits", {}),
                                ("get_task_status", {"task_id": UNKNOWN_TASK}), ("list_schedules", {})):
            refused = await call(anonymous, tool, arguments)
            assert error_text(refused) == "unauthenticated: this tool needs a valid token", tool
    assert nmap_wrapper.pids() == []
