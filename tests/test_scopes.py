"""A token's `tools` hold on every route to the same data (policy.ROUTE_TOOLS): MCP Tasks'
methods and the task resource refuse a token that may not use the tools they stand for, a scan
answers with a task handle only to a token that may read it, and every cancel is audited
whatever its route. In-memory clients of create_server(...) acting as restricted tokens (the
in_memory fixture, with the MCP Tasks extension declared), real nmap on loopback, the audit log
the servers write. The operator page's part is in test_dashboard.py (it needs HTTP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastmcp_tasks  # noqa: F401 - every Client of the 2026-07-28 era now declares the extension
import mcp_types
import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError
from fastmcp_tasks import call_tool_task
from fastmcp_tasks.client_models import (
    CancelTaskRequest,
    ClientGetTaskResult,
    GetTaskRequest,
    GetTaskRequestParams,
    UpdateTaskRequest,
    UpdateTaskRequestParams,
)
from mcp.shared.exceptions import MCPError
from starlette.routing import Route

from approvals import ApprovalDesk
from config import load_settings
from dashboard import Dashboard
from mcp_tasks import ScanTasks
from policy import ROUTE_TOOLS
from server import create_server
from tests.conftest import OpenClient
from tests.support import SECRETS, NmapWrapper, answer_of, eventually, write_config

pytestmark = pytest.mark.anyio
# Routes that are no request of their own: the right to get a task handle, and tasks/get once
# the task has completed (it then carries the result).
RIGHTS_WITHIN_A_ROUTE = {"tasks/handle", "tasks/get (completed)"}
SCAN = {"command": "-p 1 127.0.0.1", "timeout": 5}


def audit_lines(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]


def queued_task(directory: Path, token: str) -> str:
    """The id of the one task `token` queued, as its audit line names it."""
    [task_id] = [line["task_id"] for line in audit_lines(directory) if line["event"] == "queued"
                 and line["token"] == token]
    return str(task_id)


def cancels(directory: Path) -> list[tuple[str, str | None, str, str | None]]:
    """Every cancel the audit log recorded as done: token, route (None: the tool), verdict, reason."""
    return [(line["token"], line.get("via"), line["verdict"], line["reason"]) for line in audit_lines(directory)
            if line["event"] == "done" and line["tool"] == "cancel_task"]


async def task_request(client: Client, method: str, task_id: str) -> Any:
    """One tasks/* request; its result, or the MCPError it was answered with."""
    params = GetTaskRequestParams(task_id=task_id)
    request: Any = {"tasks/get": GetTaskRequest(params=params), "tasks/cancel": CancelTaskRequest(params=params),
                    "tasks/update": UpdateTaskRequest(params=UpdateTaskRequestParams(task_id=task_id,
                                                                                    input_responses={}))}[method]
    try:
        return await client.session.send_request(
            request, ClientGetTaskResult if method == "tasks/get" else mcp_types.Result)
    except MCPError as e:
        return e


async def test_every_route_the_server_offers_is_in_the_route_table(tmp_path: Path, nmap_wrapper: NmapWrapper) -> None:
    settings = load_settings(write_config(tmp_path / "config.json", nmap_path=str(nmap_wrapper.path)))
    mcp, runtime = create_server(settings, str(nmap_wrapper.path))
    tools = {tool.name for tool in await mcp.list_tools(run_middleware=False)}
    resources = [str(r.uri) for r in await mcp.list_resources(run_middleware=False)]
    templates = [t.uri_template for t in await mcp.list_resource_templates(run_middleware=False)]
    methods = [binding.method for binding in ScanTasks(runtime.service, lambda: None, runtime.auditor).methods()]
    api = [route.path for route in mcp.http_app(path=settings.path).routes
           if isinstance(route, Route) and route.path.startswith("/ui/api/")]
    desk = ApprovalDesk(runtime.stores.approvals, runtime.service.policy)
    sections = [s.route for s in Dashboard(runtime.service, runtime.schedules, desk, runtime.auditor).sections]
    offered = {*resources, *templates, *methods, *api, *sections}
    assert offered | RIGHTS_WITHIN_A_ROUTE == set(ROUTE_TOOLS), "a route missing from the table, or a stale one"
    assert set().union(*ROUTE_TOOLS.values()) <= tools


async def test_a_token_allowed_only_a_scan_tool_reads_and_cancels_nothing_by_other_routes(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper, tmp_path: Path,
) -> None:
    nmap_wrapper.set_delay(60)
    tokens = {"alice": {"secret": SECRETS["alice"], "tools": ["custom_scan"]}, "bob": {"secret": SECRETS["bob"]}}
    async with in_memory("alice", tasks=True, tokens=tokens) as alice:
        with pytest.raises(ToolError):  # the answer came inline, as to a client without the extension
            await call_tool_task(alice, "custom_scan", SCAN)
        task_id = queued_task(tmp_path, "alice")
        assert await eventually(lambda: len(nmap_wrapper.alive()) == 1, 20)
        refusals = {method: await task_request(alice, method, task_id)
                    for method in ("tasks/get", "tasks/update", "tasks/cancel")}
        with pytest.raises(MCPError) as read:
            await alice.read_resource_mcp(f"nmap://tasks/{task_id}")
        templates = await alice.list_resource_templates()
    assert {method: (e.code, e.message) for method, e in refusals.items()} == {
        "tasks/get": (-32600, "forbidden: tasks/get needs the tool get_task_status, which this token may not use"),
        "tasks/update": (-32600, "forbidden: tasks/update needs the tool get_task_status, which this token may not "
                                 "use"),
        "tasks/cancel": (-32600, "forbidden: tasks/cancel needs the tool cancel_task, which this token may not use"),
    }
    assert len(nmap_wrapper.alive()) == 1, "the refused cancel left the scan running"
    assert read.value.message == (
        "forbidden: nmap://tasks/{task_id} needs the tool get_task_result, which this token may not use")
    assert templates == []
    assert cancels(tmp_path) == [("alice", "tasks/cancel", "refused",
                                  "forbidden: tasks/cancel needs the tool cancel_task, which this token may not use")]


async def test_a_completed_task_s_result_needs_get_task_result_through_tasks_get_too(
    in_memory: OpenClient, tmp_path: Path,
) -> None:
    tokens = {"alice": {"secret": SECRETS["alice"], "tools": ["custom_scan", "get_task_status"]}}
    async with in_memory("alice", tasks=True, tokens=tokens) as alice:
        done = await answer_of(alice, "custom_scan", **SCAN)
        refused = await task_request(alice, "tasks/get", done["task_id"])
    assert done["status"] == "completed" and done["task_id"] == queued_task(tmp_path, "alice")
    assert (refused.code, refused.message) == (
        -32600, "forbidden: tasks/get (completed) needs the tool get_task_result, which this token may not use")


async def test_every_cancel_is_audited_whatever_its_route(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper, tmp_path: Path,
) -> None:
    nmap_wrapper.set_delay(60)
    async with in_memory("alice", tasks=True) as alice:
        by_route = (await call_tool_task(alice, "custom_scan", SCAN)).task_id
        assert await eventually(lambda: len(nmap_wrapper.alive()) == 1, 20)
        assert not isinstance(await task_request(alice, "tasks/cancel", by_route), MCPError)
        assert await eventually(lambda: not nmap_wrapper.alive(), 20)
        by_tool = (await call_tool_task(alice, "custom_scan", SCAN | {"command": "-p 2 127.0.0.1"})).task_id
        assert await eventually(lambda: len(nmap_wrapper.alive()) == 1, 20)
        cancelled = await answer_of(alice, "cancel_task", task_id=by_tool)
    assert cancelled["status"] == "cancelled"
    assert cancels(tmp_path) == [("alice", "tasks/cancel", "allowed", None), ("alice", None, "allowed", None)]
    [accepted] = [line for line in audit_lines(tmp_path) if line["event"] == "accepted" and line.get("via")]
    assert accepted["arguments"] == {"task_id": by_route} and accepted["tool"] == "cancel_task"
