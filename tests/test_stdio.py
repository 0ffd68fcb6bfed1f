"""`server.py --stdio`: MCP over stdin/stdout for a local client, and a stdio bridge to the
HTTP server, each driven by the official MCP Python SDK's stdio client.

The server runs as a real process (started by the SDK, as a desktop client starts it) with
the tools, policy, queue and database of the HTTP server; its caller is `stdio_caller`.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.support import (
    ALICE,
    BOB,
    ROOT,
    SECRETS,
    Listeners,
    LiveServer,
    NmapWrapper,
    call_tool,
    error_text,
    eventually,
    poll_until_finished,
    stdio_initialize,
    write_config,
)

pytestmark = [pytest.mark.anyio, pytest.mark.server]


@asynccontextmanager
async def stdio_session(command: list[str], errlog: Path) -> AsyncIterator[Client]:
    """A client session with a process it starts, as Claude Desktop or LM Studio start one."""
    params = StdioServerParameters(command=command[0], args=command[1:], cwd=ROOT)
    with errlog.open("a") as log:
        async with Client(stdio_client(params, errlog=log), mode="legacy") as client:  # type: ignore[arg-type]
            yield client


def stdio_command(config: Path) -> list[str]:
    return [sys.executable, str(ROOT / "server.py"), "--stdio", "-c", str(config)]


async def tool(client: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(name, args)
    assert not result.is_error, error_text(result)
    assert result.structured_content is not None
    return result.structured_content


async def until_finished(client: Client, task_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await tool(client, "get_task_status", {"task_id": task_id})
        if status["status"] not in ("queued", "running"):
            return status
        assert time.monotonic() < deadline, status
        await anyio.sleep(0.2)


def audited_callers(audit_log: Path, tool_name: str) -> set[str]:
    lines = [json.loads(line) for line in audit_log.read_text().splitlines()]
    return {line["token"] for line in lines if line["tool"] == tool_name}


def open_port(listeners: Listeners) -> int:
    [port] = listeners.open_free_top_ports(1)
    return port


async def test_a_local_client_scans_as_local_and_finds_its_background_scan_after_a_restart(
    tmp_path: Path, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    port = open_port(listeners)
    audit_log = tmp_path / "audit.jsonl"
    config = write_config(tmp_path / "config.json", nmap_path=str(nmap_wrapper.path), audit_log=str(audit_log))
    errlog = tmp_path / "stderr.log"
    async with stdio_session(stdio_command(config), errlog) as client:
        quick = await tool(client, "quick_scan", {"target": "127.0.0.1", "timeout": 30})
        assert quick["status"] == "completed", quick
        assert port in {p["port"] for p in quick["result"]["hosts"][0]["ports"]}
        denied = await client.call_tool("quick_scan", {"target": "192.0.2.1"})
        assert denied.is_error and error_text(denied).startswith("invalid_target:"), "the same policy as over HTTP"

        nmap_wrapper.set_delay(8)
        waited = await tool(client, "quick_scan", {"target": "127.0.0.2", "timeout": 5})
        assert waited["status"] in ("queued", "running") and waited["task_id"], waited
        background = waited["task_id"]
        assert (await until_finished(client, background))["status"] == "completed", "it ran on while connected"
        listed = await tool(client, "list_tasks", {})
        assert {task["task_id"] for task in listed["tasks"]} >= {quick["task_id"], background}
    assert audited_callers(audit_log, "quick_scan") == {"local"}

    nmap_wrapper.set_delay(0)
    async with stdio_session(stdio_command(config), errlog) as client:
        again = await tool(client, "get_task_result", {"task_id": background})
        assert again["status"] == "completed" and again["task_id"] == background

    laptop = write_config(tmp_path / "laptop.json", nmap_path=str(nmap_wrapper.path), audit_log=str(audit_log),
                          stdio_caller="laptop")
    async with stdio_session(stdio_command(laptop), errlog) as client:
        other = await client.call_tool("get_task_result", {"task_id": background})
        assert other.is_error and error_text(other).startswith("not_found:"), "tasks belong to their caller"
    for secret in SECRETS.values():
        assert secret not in errlog.read_text()


def test_nothing_but_mcp_reaches_stdout_and_the_logs_go_to_stderr(tmp_path: Path, nmap_wrapper: NmapWrapper) -> None:
    config = write_config(tmp_path / "config.json", nmap_path=str(nmap_wrapper.path),
                          audit_log=str(tmp_path / "audit.jsonl"), log_level="DEBUG")
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize",
         "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nmap_version", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
         "params": {"name": "quick_scan", "arguments": {"target": "127.0.0.1", "timeout": 30}}},
    ]
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(stdio_command(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=stderr_file, cwd=ROOT)
    assert process.stdin is not None and process.stdout is not None
    answers: dict[int, dict[str, Any]] = {}
    lines: list[bytes] = []
    for request in requests:
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.flush()
        while "id" in request and request["id"] not in answers:
            line = process.stdout.readline()
            assert line, "the server closed stdout"
            lines.append(line)
            message = json.loads(line)
            if "id" in message:
                answers[message["id"]] = message
    process.stdin.close()
    lines.extend(process.stdout.read().splitlines(keepends=True))
    assert process.wait(30) == 0, "end of stdin ends the server"
    stderr = stderr_path.read_bytes()
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in lines), "stdout carries JSON-RPC lines only"
    assert answers[1]["result"]["serverInfo"]["name"] == "nmap-mcp"
    assert answers[4]["result"]["structuredContent"]["status"] == "completed"
    assert b"nmap-mcp" in stderr and b"DEBUG" in stderr, "the log is on stderr"


async def test_a_stdio_bridge_reaches_the_http_server_with_the_same_tools(
    live_server: Callable[..., LiveServer], tmp_path: Path, listeners: Listeners, nmap_wrapper: NmapWrapper
) -> None:
    """fastmcp-remote, what a desktop client that starts only local processes runs to reach the
    server over HTTP (as Claude Desktop runs mcp-remote in the config we print for it)."""
    port = open_port(listeners)
    server = live_server(audit_log=str(tmp_path / "audit.jsonl"))
    bridge = [str(Path(sys.executable).parent / "fastmcp-remote"), server.url,
              "--header", f"Authorization: Bearer {ALICE}"]
    direct = write_config(tmp_path / "direct.json", nmap_path=str(nmap_wrapper.path),
                          db_path=str(tmp_path / "tasks.db"), audit_log=str(tmp_path / "direct.jsonl"))
    errlog = tmp_path / "bridge.log"
    async with stdio_session(stdio_command(direct), errlog) as local:
        local_tools = {t.name for t in (await local.list_tools()).tools}
    async with stdio_session(bridge, errlog) as client:
        assert {t.name for t in (await client.list_tools()).tools} == local_tools
        scanned = await tool(client, "quick_scan", {"target": "127.0.0.1", "timeout": 30})
        assert scanned["status"] == "completed", scanned
        assert port in {p["port"] for p in scanned["result"]["hosts"][0]["ports"]}
    as_alice = await call_tool(server.url, ALICE, "get_task_status", {"task_id": scanned["task_id"]})
    assert as_alice.structured_content is not None and as_alice.structured_content["status"] == "completed"
    assert audited_callers(tmp_path / "audit.jsonl", "quick_scan") == {"alice"}


def task_row(database: Path, task_id: str) -> sqlite3.Row:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        conn.row_factory = sqlite3.Row
        query = "SELECT status, worker_name, claimed_at, finished_at FROM tasks WHERE id = ?"
        row: sqlite3.Row | None = conn.execute(query, (task_id,)).fetchone()
    assert row is not None, task_id
    return row


async def queued_over_http(server: LiveServer, secret: str, target: str) -> str:
    started = await call_tool(server.url, secret, "quick_scan", {"target": target, "timeout": 5})
    assert started.structured_content is not None, error_text(started)
    return str(started.structured_content["task_id"])


@pytest.mark.slow("two scans of 8 s each, one after the other on the server's one slot")
async def test_a_desktop_app_on_the_server_s_config_never_takes_a_teammate_s_scan(
    live_server: Callable[..., LiveServer], tmp_path: Path, nmap_wrapper: NmapWrapper
) -> None:
    """The stdio entry printed on the server machine runs with the server's config, database
    and pool. While it sits idle, bob's scan waits for the server's one busy slot instead of
    running in the desktop app's process; the app quitting then leaves it running."""
    server = live_server(max_concurrent_tasks=1, worker_name="http-server",
                         audit_log=str(tmp_path / "audit.jsonl"))
    database = tmp_path / "tasks.db"
    errlog = tmp_path / "stdio.log"
    async with stdio_session(stdio_command(server.config_path), errlog) as desktop:
        own = await tool(desktop, "quick_scan", {"target": "127.0.0.1", "timeout": 30})
        assert own["status"] == "completed", "the app's own scans run in its process"
        assert task_row(database, own["task_id"])["worker_name"] == "http-server stdio"

        nmap_wrapper.set_delay(8)
        first = await queued_over_http(server, ALICE, "127.0.0.2")
        assert await eventually(lambda: task_row(database, first)["status"] == "running", 30)
        teammate = await queued_over_http(server, BOB, "127.0.0.3")
        assert await eventually(lambda: task_row(database, teammate)["status"] != "queued", 60)
        claimed = task_row(database, teammate)
        assert claimed["worker_name"] == "http-server", "bob's scan ran in the desktop app's process"
        assert claimed["claimed_at"] >= task_row(database, first)["finished_at"], "it waited for the server's slot"
    # The app has quit (its stdin closed, its process gone) while bob's scan runs.
    assert task_row(database, teammate)["status"] == "running"
    assert (await poll_until_finished(server.url, BOB, teammate, timeout=60))["status"] == "completed"


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_print_config_says_which_config_and_database_the_stdio_entry_uses(tmp_path: Path, database: str) -> None:
    password = "db-password-" + "p" * 12
    url = f"postgresql+psycopg://nmap:{password}@127.63.0.1:5432/scans"
    config = write_config(tmp_path / "config.json", **({"database_url": url} if database == "postgresql" else {}))
    printed = subprocess.run([sys.executable, str(ROOT / "server.py"), "-c", str(config), "--print-config", "cursor"],
                             capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(printed.stdout)["mcpServers"]["nmap-local"]["args"][-1] == str(config)
    shown = "postgresql+psycopg://nmap:***@127.63.0.1:5432/scans" if database == "postgresql" \
        else f"sqlite:///{tmp_path / 'tasks.db'}"
    assert f"starts --stdio with {config}, on the database {shown};" in printed.stderr
    assert "only the scans of its caller 'local'" in printed.stderr
    assert password not in printed.stderr + printed.stdout


@pytest.mark.parametrize("client", ["claude-desktop", "claude-code"])
def test_the_laptop_flow_prints_only_the_stdio_entry_and_it_starts_from_a_gui_app(
    tmp_path: Path, client: str
) -> None:
    """README's "Use it from my laptop": --init, then --stdio --print-config. No server runs
    there, so the paste names none; its command starts with a desktop app's PATH and directory."""
    config = tmp_path / "laptop.json"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "server.py"), "-c", str(config), *args], cwd=tmp_path,
                              capture_output=True, text=True, check=False)

    assert run("--init").returncode == 0
    printed = run("--stdio", "--print-config", client)
    assert printed.returncode == 0, printed.stderr
    assert "http" not in printed.stdout, "no entry for a server that does not run here"
    if client == "claude-code":
        [line] = printed.stdout.splitlines()
        command = shlex.split(line)[shlex.split(line).index("--") + 1:]
    else:
        [(name, entry)] = json.loads(printed.stdout)["mcpServers"].items()
        assert name == "nmap-local"
        command = [entry["command"], *entry["args"]]
    assert Path(command[0]).is_absolute()
    assert stdio_initialize(command, cwd=Path("/"))["serverInfo"]["name"] == "nmap-mcp"
    refused = run("--stdio", "--print-config", "chatgpt")
    assert refused.returncode == 2 and "cannot start a local program" in refused.stderr
