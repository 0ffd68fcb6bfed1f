"""Native MCP Tasks (io.modelcontextprotocol/tasks, SEP-2663) over real HTTP and real nmap.

The client half is the official one: fastmcp-tasks' `call_tool_task` and `ToolTask` on a
`fastmcp.Client` in 2026-07-28 mode (importing fastmcp_tasks makes every such client opt in).
Raw JSON-RPC posts check the wire shapes. Every scan targets 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError
from fastmcp_tasks import ToolTask, call_tool_task
from fastmcp_tasks.client_models import ClientGetTaskResult
from mcp.shared.exceptions import MCPError
from sqlalchemy.engine import make_url

from tests.support import (
    ALICE,
    BOB,
    MCP_HEADERS,
    POSTGRES_ADMIN_URL,
    START_UP_SECONDS,
    Listeners,
    NmapWrapper,
    ServiceProcess,
    StartServer,
    call_tool,
    post,
    process_alive,
    scratch_database,
    server_argv,
    wait_until,
    write_config,
)

# Every test runs the service as processes and speaks HTTP to them.
pytestmark = [pytest.mark.anyio, pytest.mark.server]
TASKS = "io.modelcontextprotocol/tasks"
MISSING_TASK = "00000000-0000-4000-8000-000000000000"
SLOW_SCAN = {"command": "-p 1-500 --scan-delay 20ms 127.0.0.1"}


async def our_status(url: str, token: str, task_id: str) -> str:
    """The task's status as our own get_task_status tool reports it."""
    return (await call_tool(url, token, "get_task_status", {"task_id": task_id})).structured_content["status"]


async def until(probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float = 20) -> Any:
    """Call `probe` until `done` holds for its answer; return that answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done(answer := await probe()):
        assert loop.time() < deadline, f"still {answer!r} after {timeout} s"
        await asyncio.sleep(0.1)
    return answer


async def same_as_get_task_result(url: str, task: ToolTask) -> dict[str, Any]:
    """The task's result through tasks/get equals get_task_result's answer; returns it."""
    finished = await task.result()
    expected = await call_tool(url, ALICE, "get_task_result", {"task_id": task.task_id})
    assert finished.structured_content == expected.structured_content
    assert [block.text for block in finished.content] == [block.text for block in expected.content]  # type: ignore[union-attr]
    return finished.structured_content  # type: ignore[return-value]


def open_ports(answer: dict[str, Any]) -> set[int]:
    return {p["port"] for host in answer["result"]["hosts"] for p in host["ports"] if p["state"] == "open"}


async def failure(call: Awaitable[object]) -> tuple[int, str]:
    """A tasks/* request that must fail: its JSON-RPC error code and message."""
    with pytest.raises(MCPError) as raised:
        await call
    return raised.value.error.code, raised.value.error.message


def rpc(url: str, method: str, params: dict[str, Any], *, opt_in: bool = True, name: str | None = None,
        version: str = "2026-07-28") -> dict[str, Any]:
    """One 2026-07-28 JSON-RPC request as alice, with the per-request envelope and routing
    headers; returns the response message."""
    capabilities = {"extensions": {TASKS: {}}} if opt_in else {}
    meta = {"io.modelcontextprotocol/protocolVersion": version,
            "io.modelcontextprotocol/clientCapabilities": capabilities}
    headers = MCP_HEADERS | {"Authorization": f"Bearer {ALICE}", "MCP-Protocol-Version": version, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}
    response = httpx.post(url, json=body, headers=headers, timeout=30)
    data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1] if data else response.text)


async def test_a_scan_answers_with_a_task_whose_state_is_our_task(
    live_server: StartServer, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(3)
    server = live_server()
    async with Client(server.url, auth=ALICE) as client:
        task = await call_tool_task(client, "quick_scan", {"target": "127.0.0.1"})
        assert task.create_result.status == "working"
        await until(lambda: our_status(server.url, ALICE, task.task_id), lambda status: status == "running")
        working = await task.status()
        assert working.task_id == task.task_id and working.status == "working"
        assert working.status_message == "running: no progress reported by nmap yet"
        answer = await same_as_get_task_result(server.url, task)
        assert (await task.status()).status == "completed"
    assert answer["status"] == "completed" and answer["task_id"] == task.task_id and port in open_ports(answer)
    assert len(nmap_wrapper.pids()) == 1


async def test_a_failed_scan_is_a_completed_task_whose_answer_says_it_failed(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    server = live_server()
    nmap_wrapper.path.unlink()  # nmap disappears after start-up: the scan fails, the tool call did not
    async with Client(server.url, auth=ALICE) as client:
        task = await call_tool_task(client, "quick_scan", {"target": "127.0.0.1"})
        answer = await same_as_get_task_result(server.url, task)
        final = await task.status()
    assert final.status == "completed" and final.status_message == f"nmap not found at {nmap_wrapper.path}"
    assert answer["status"] == "failed" and answer["error"] == final.status_message


async def test_tasks_cancel_stops_nmap_and_get_shows_cancelled(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    server = live_server()
    async with Client(server.url, auth=ALICE) as client:
        task = await call_tool_task(client, "custom_scan", SLOW_SCAN)
        progress = await until(task.status, lambda got: "%" in (got.status_message or ""))
        assert re.fullmatch(r"running: Connect Scan \d+%(, about \d+ s left)?", progress.status_message)
        [pid] = nmap_wrapper.pids()
        assert process_alive(pid)
        await task.cancel()
        assert not process_alive(pid)
        assert (await task.status()).status == "cancelled"
        with pytest.raises(ToolError, match="cancelled"):
            await task.result()
        await task.cancel()  # a finished task: acknowledged, left as it is
    assert await our_status(server.url, ALICE, task.task_id) == "cancelled"


@contextlib.contextmanager
def database_url(kind: str, directory: Path) -> Iterator[str]:
    """A SQLite file in `directory`, or a scratch PostgreSQL database dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'tasks.db'}"
        return
    with scratch_database() as name:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def serve_api(config: Path, log: Path) -> ServiceProcess:
    """An `--api` process (MCP only, no scans), once it answers /healthz."""
    api = ServiceProcess(server_argv(config, "--api"), log).start()
    base = f"http://127.0.0.1:{json.loads(config.read_text())['port']}"

    def healthy() -> bool:
        api.check_running()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        return False

    assert wait_until(healthy, START_UP_SECONDS, 0.1), api.log_text()
    return api


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_a_task_outlives_a_restart_of_the_api_process_while_a_worker_scans(
    tmp_path: Path, nmap_wrapper: NmapWrapper, listeners: Listeners, kind: str
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(15)  # the API process restarts meanwhile, a few seconds on a busy machine
    with database_url(kind, tmp_path) as url:
        config = write_config(tmp_path / "config.json", database_url=url, nmap_path=str(nmap_wrapper.path),
                              audit_log=str(tmp_path / "audit.jsonl"))
        endpoint = f"http://127.0.0.1:{json.loads(config.read_text())['port']}/mcp"
        worker = ServiceProcess(server_argv(config, "--worker"), tmp_path / "worker.log").start()
        processes = [worker, serve_api(config, tmp_path / "api-1.log")]
        try:
            async with Client(endpoint, auth=ALICE) as client:
                created = (await call_tool_task(client, "quick_scan", {"target": "127.0.0.1"})).create_result
            await until(lambda: our_status(endpoint, ALICE, created.task_id), lambda status: status == "running")
            processes[1].stop()
            processes.append(serve_api(config, tmp_path / "api-2.log"))
            async with Client(endpoint, auth=ALICE) as client:
                task = ToolTask(client, "quick_scan", created)
                assert (await task.status()).status == "working"
                answer = await same_as_get_task_result(endpoint, task)
        finally:
            for process in processes:
                process.stop()
    assert answer["status"] == "completed" and port in open_ports(answer)
    assert len(nmap_wrapper.pids()) == 1


async def test_clients_that_do_not_opt_in_wait_as_before(live_server: StartServer, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(1)
    server = live_server()
    sdk_client = await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1", "timeout": 30})
    assert sdk_client.structured_content["status"] == "completed"
    async with Client(server.url, auth=ALICE, mode="legacy") as legacy:
        waited = await legacy.call_tool("quick_scan", {"target": "127.0.0.1", "rescan": True, "timeout": 30})
        assert waited.structured_content["status"] == "completed"
        with pytest.raises(ToolError, match="did not run as a task"):
            await call_tool_task(legacy, "quick_scan", {"target": "127.0.0.1", "rescan": True})
    plain = rpc(server.url, "tools/call", {"name": "quick_scan", "arguments": {"target": "127.0.0.1", "rescan": True}},
                opt_in=False, name="quick_scan")["result"]
    assert plain["resultType"] == "complete" and plain["structuredContent"]["status"] == "completed"
    assert "taskId" not in plain
    # A tool that submits no scan answers inline even when the client opted in.
    async with Client(server.url, auth=ALICE) as client:
        status = await client.call_tool("get_task_status", {"task_id": plain["structuredContent"]["task_id"]})
        assert status.structured_content["status"] == "completed"
        with pytest.raises(ToolError, match="did not run as a task"):
            await call_tool_task(client, "list_tasks", {})
    assert len(nmap_wrapper.pids()) == 4


async def test_another_token_cannot_see_or_cancel_the_task(live_server: StartServer, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(3)
    server = live_server()
    async with Client(server.url, auth=ALICE) as alice:
        task = await call_tool_task(alice, "quick_scan", {"target": "127.0.0.1"})
        missing = ToolTask(alice, "quick_scan", task.create_result.model_copy(update={"task_id": MISSING_TASK}))
        not_found = await failure(missing.status())
        assert not_found == (-32602, "Failed to retrieve task: Task not found")
        async with Client(server.url, auth=BOB) as bob:
            theirs = ToolTask(bob, "quick_scan", task.create_result)
            assert await failure(theirs.status()) == not_found
            assert await failure(theirs.cancel()) == not_found
        assert await failure(missing.cancel()) == not_found
        answer = await task.result()
    assert answer.structured_content["status"] == "completed"


async def test_wire_shapes_and_where_the_capability_is_advertised(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(2)
    server = live_server(denied_targets=["127.0.0.2/32"])
    discovered = rpc(server.url, "server/discover", {}, opt_in=False)["result"]
    assert discovered["capabilities"]["extensions"][TASKS] == {}
    # The 2025-11-25 era has no extensions: neither the handshake nor a tool mentions tasks.
    legacy = post(server, Authorization=f"Bearer {ALICE}")
    handshake = json.loads(next(line[5:] for line in legacy.text.splitlines() if line.startswith("data:")))
    capabilities = handshake["result"]["capabilities"]
    assert legacy.status_code == 200 and "tools" in capabilities and "tasks" not in json.dumps(capabilities)
    listed = post(server, body={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, Authorization=f"Bearer {ALICE}",
                  **{"MCP-Protocol-Version": "2025-11-25"})
    assert '"quick_scan"' in listed.text and '"execution"' not in listed.text and "taskSupport" not in listed.text

    created = rpc(server.url, "tools/call", {"name": "quick_scan", "arguments": {"target": "127.0.0.1"}},
                  name="quick_scan")["result"]
    assert set(created) == {"resultType", "taskId", "status", "statusMessage", "createdAt", "lastUpdatedAt",
                            "ttlMs", "pollIntervalMs", "_meta"}
    assert (created["resultType"], created["status"], created["ttlMs"]) == ("task", "working", None)
    assert created["statusMessage"] == "queued: waiting for a worker of pool 'default'"
    task_id = created["taskId"]
    got = rpc(server.url, "tasks/get", {"taskId": task_id}, name=task_id)["result"]
    assert got["resultType"] == "complete" and got["taskId"] == task_id and got["createdAt"] == created["createdAt"]
    ClientGetTaskResult.model_validate(got, by_name=False)

    refused = rpc(server.url, "tasks/get", {"taskId": task_id}, opt_in=False, name=task_id)["error"]
    assert refused["code"] == -32021 and refused["data"] == {"requiredCapabilities": {"extensions": {TASKS: {}}}}
    assert rpc(server.url, "tasks/get", {"taskId": task_id}, name=MISSING_TASK)["error"]["code"] == -32020
    update = {"taskId": task_id, "inputResponses": {"name": {"action": "accept"}}}
    assert rpc(server.url, "tasks/update", update, name=task_id)["result"]["resultType"] == "complete"
    assert rpc(server.url, "tasks/update", update | {"taskId": MISSING_TASK}, name=MISSING_TASK)["error"] == {
        "code": -32602, "message": "Failed to retrieve task: Task not found"}
    assert rpc(server.url, "tasks/cancel", {"taskId": task_id}, name=task_id)["result"]["resultType"] == "complete"
    cancelled = rpc(server.url, "tasks/get", {"taskId": task_id}, name=task_id)["result"]
    assert (cancelled["status"], cancelled["ttlMs"]) == ("cancelled", None) and "result" not in cancelled

    # A refused scan is an ordinary tool error and creates no task; 2025-11-25 has no tasks/* methods.
    refused_scan = rpc(server.url, "tools/call", {"name": "quick_scan", "arguments": {"target": "127.0.0.2"}},
                       name="quick_scan")["result"]
    assert refused_scan["isError"] is True and "taskId" not in refused_scan
    assert refused_scan["content"][0]["text"].startswith("invalid_target:")
    old_era = post(server, body={"jsonrpc": "2.0", "id": 3, "method": "tasks/get", "params": {"taskId": task_id}},
                   Authorization=f"Bearer {ALICE}", **{"MCP-Protocol-Version": "2025-11-25"})
    assert '"code":-32601' in old_era.text.replace(" ", "")
    assert len(nmap_wrapper.pids()) == 1
