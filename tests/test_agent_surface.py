"""What an agent sees besides the scan tools, through the official client and a real server:
the typed `scan` tool and its parity with custom_scan, nmap_version, resources, prompts,
instructions and serverInfo."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support import ALICE, BOB, ROOT, Listeners, LiveServer, StartServer, call_tool, error_text

pytestmark = pytest.mark.anyio


def queued_argvs(server: LiveServer) -> list[list[str]]:
    lines = (server.config_path.parent / "audit.jsonl").read_text().splitlines()
    return [entry["argv"] for entry in map(json.loads, lines) if entry["event"] == "queued"]


@pytest.mark.parametrize(("typed", "command"), [
    ({"targets": "127.0.0.1", "ports": "{p}"}, "-sT -p {p} -T3 127.0.0.1"),
    ({"targets": "127.0.0.1, 127.0.0.2", "top_ports": 20, "skip_host_discovery": True, "timing": "T4"},
     "-sT --top-ports 20 -Pn -T4 127.0.0.1 127.0.0.2"),
    ({"targets": "127.0.0.1", "ports": "{p}", "service_versions": True, "scripts": ["default", "safe"]},
     "-sT -p {p} -sV --script default,safe -T3 127.0.0.1"),
    ({"targets": "127.0.0.0/30", "scan_type": "ping"}, "-sn -T3 127.0.0.0/30"),
])
async def test_the_typed_scan_builds_the_argv_custom_scan_builds(
    live_server: StartServer, listeners: Listeners, typed: dict[str, Any], command: str
) -> None:
    [port] = listeners.open_free_top_ports(1)
    server = live_server()
    arguments = {k: v.format(p=port) if isinstance(v, str) else v for k, v in typed.items()}
    answer = (await call_tool(server.url, ALICE, "scan", arguments | {"timeout": 60})).structured_content
    assert answer["status"] == "completed" and answer["kind"] == "custom"
    if "ports" in typed:
        assert port in {p["port"] for h in answer["result"]["hosts"] for p in h["ports"] if p["state"] == "open"}
    custom = await call_tool(server.url, ALICE, "custom_scan", {"command": command.format(p=port), "timeout": 60})
    assert custom.structured_content["status"] == "completed"
    typed_argv, custom_argv = queued_argvs(server)
    assert typed_argv == custom_argv


async def test_the_typed_scan_keeps_custom_scans_policy(live_server: StartServer) -> None:
    server = live_server()
    syn = await call_tool(server.url, ALICE, "scan", {"targets": "127.0.0.1", "scan_type": "syn"})
    assert error_text(syn).startswith("invalid_command: '-sS' needs raw packets")
    intrusive = await call_tool(server.url, ALICE, "scan", {"targets": "127.0.0.1", "scripts": ["intrusive"]})
    assert error_text(intrusive).startswith("invalid_argument: scripts must be")
    outside = await call_tool(server.url, ALICE, "scan", {"targets": "169.254.169.254"})
    assert error_text(outside).startswith("invalid_target: ")


async def test_nmap_version_tells_what_the_scanner_can_do(live_server: StartServer) -> None:
    server = live_server()
    version = (await call_tool(server.url, ALICE, "nmap_version", {})).structured_content
    assert version["nmap_version"].count(".") >= 1 and "liblua" in " ".join(version["compiled_with"])
    assert version["raw_packet_scans"] is False and version["script_categories"] == [
        "default", "safe", "discovery", "version"]
    assert version["server_version"] == (ROOT / "VERSION").read_text().strip()


async def test_a_tasks_result_is_a_resource_only_its_token_reads(
    live_server: StartServer, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    server = live_server()
    done = (await call_tool(server.url, ALICE, "custom_scan", {"command": f"-p {port} 127.0.0.1"})).structured_content
    expected = (await call_tool(server.url, ALICE, "get_task_result", {"task_id": done["task_id"]})).structured_content
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}) as http, Client(
        streamable_http_client(server.url, http_client=http), mode="legacy"
    ) as client:
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["nmap://tasks/{task_id}"]
        read = await client.read_resource(f"nmap://tasks/{done['task_id']}")
        assert json.loads(read.contents[0].text) == expected  # type: ignore[union-attr]
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {BOB}"}) as http, Client(
        streamable_http_client(server.url, http_client=http), mode="legacy"
    ) as client:
        with pytest.raises(Exception, match="not_found: no task"):
            await client.read_resource(f"nmap://tasks/{done['task_id']}")


async def test_prompts_instructions_and_server_info(live_server: StartServer) -> None:
    server = live_server()
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}) as http, Client(
        streamable_http_client(server.url, http_client=http), mode="legacy"
    ) as client:
        prompts = {p.name: p for p in (await client.list_prompts()).prompts}
        assert set(prompts) == {"assess_network", "what_changed"}
        assessed = await client.get_prompt("assess_network", {"network": "10.0.0.0/24"})
        text = assessed.messages[0].content.text  # type: ignore[union-attr]
        assert "quick_scan on 10.0.0.0/24" in text and "find_hosts" in text and "diff_scans" in text
        info = client.server_info
        instructions = client.instructions or ""
    assert info is not None and info.title == "nmap scanner" and info.description and info.name == "nmap-mcp"
    for tool in ("quick_scan", "get_task_result", "find_hosts", "diff_scans", "list_workers"):
        assert tool in instructions
