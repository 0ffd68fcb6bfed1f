"""Results over real HTTP: progress, partial results, formats, caps and diffs, real nmap."""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from nmap_report import parse_report
from tests.support import (
    ALICE,
    SECRETS,
    Listeners,
    LiveServer,
    StartServer,
    call_tool,
    error_text,
    poll_until_finished,
    tool_call_on_the_wire,
)

pytestmark = pytest.mark.anyio


async def tool(server: LiveServer, name: str, **args: object) -> dict:
    result = await call_tool(server.url, ALICE, name, args)
    assert not result.is_error, result.content
    return result.structured_content


async def test_progress_rises_while_a_slow_scan_runs_then_it_completes(live_server: StartServer) -> None:
    server = live_server()
    started = await tool(server, "custom_scan", command="-p 1-500 --scan-delay 20ms 127.0.0.1", timeout=5)
    assert started["status"] == "running" and started["progress"]["phase"] == "Connect Scan"
    percents = [started["progress"]["percent"]]
    while (status := await tool(server, "get_task_status", task_id=started["task_id"]))["status"] == "running":
        if status["progress"]:
            percents.append(status["progress"]["percent"])
        await asyncio.sleep(0.5)
    assert status["status"] == "completed" and status["progress"] is None
    assert len(set(percents)) >= 2 and percents == sorted(percents) and 0 < percents[-1] < 100


async def test_a_waiting_call_sends_mcp_progress_notifications(live_server: StartServer) -> None:
    server = live_server()
    notes: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, total, message))

    async with (httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}) as http,
                Client(streamable_http_client(server.url, http_client=http), mode="legacy") as client):
            result = await client.call_tool(
                "custom_scan", {"command": "-p 1-300 --scan-delay 20ms 127.0.0.1", "timeout": 60},
                progress_callback=on_progress,
            )
    assert result.structured_content["status"] == "completed"
    assert notes and all(total == 100 for _, total, _ in notes)
    assert [p for p, _, _ in notes] == sorted(p for p, _, _ in notes)
    assert "Connect Scan" in (notes[-1][2] or "")


async def test_partial_results_while_running_and_after_cancel(live_server: StartServer, listeners: Listeners) -> None:
    listeners.open(21000, "127.0.0.2")
    server = live_server()
    command = "-p 1-100,21000 --scan-delay 10ms --max-hostgroup 1 127.0.0.1-8"
    started = await tool(server, "custom_scan", command=command, timeout=5)
    assert started["status"] == "running"
    running = await tool(server, "get_task_result", task_id=started["task_id"])
    assert running["result"]["partial"] is True
    done_so_far = [h["address"] for h in running["result"]["hosts"]]
    assert done_so_far[:2] == ["127.0.0.1", "127.0.0.2"] and len(done_so_far) < 8
    assert [(p["port"], p["state"]) for p in running["result"]["hosts"][1]["ports"]] == [(21000, "open")]
    cancelled = await tool(server, "cancel_task", task_id=started["task_id"])
    assert cancelled["status"] == "cancelled"
    kept = await tool(server, "get_task_result", task_id=started["task_id"], view="full")
    assert kept["status"] == "cancelled" and kept["result"]["partial"] is True
    assert [h["address"] for h in kept["result"]["hosts"]][: len(done_so_far)] == done_so_far


async def test_diff_between_two_real_scans(live_server: StartServer, listeners: Listeners) -> None:
    first_port, kept_port, later_port = 21001, 21002, 21003
    for port in (first_port, kept_port):
        assert listeners.open(port)
    server = live_server()
    command = f"-p {first_port},{kept_port},{later_port} 127.0.0.1"
    before = await tool(server, "custom_scan", command=command)
    listeners.close(first_port)
    assert listeners.open(later_port)
    after = await tool(server, "custom_scan", command=command)
    diff = await tool(server, "diff_scans", task_a=before["task_id"], task_b=after["task_id"])
    assert [(c["port"], c["before"], c["after"]) for c in diff["ports_opened"]] == [(later_port, "", "open")]
    assert [(c["port"], c["before"], c["after"]) for c in diff["ports_closed"]] == [(first_port, "open", "")]
    assert diff["unchanged_open_ports"] == 1 and diff["hosts_came_up"] == diff["hosts_went_down"] == []


async def test_diff_needs_two_finished_scans_of_your_own(live_server: StartServer) -> None:
    server = live_server()
    slow = await tool(server, "custom_scan", command="-p 1-500 --scan-delay 20ms 127.0.0.1", timeout=5)
    done = await tool(server, "quick_scan", target="127.0.0.1")
    refused = await call_tool(server.url, ALICE, "diff_scans", {"task_a": done["task_id"], "task_b": slow["task_id"]})
    assert error_text(refused).startswith("not_comparable: task ")
    foreign = await call_tool(server.url, SECRETS["bob"], "diff_scans",
                              {"task_a": done["task_id"], "task_b": done["task_id"]})
    assert error_text(foreign).startswith("not_found: ")


async def test_xml_and_csv_formats_of_a_finished_scan(live_server: StartServer, listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    server = live_server()
    scan = await tool(server, "custom_scan", command=f"-sV -p {port},1 127.0.0.1-3")
    full = await tool(server, "get_task_result", task_id=scan["task_id"], view="full")
    xml = await tool(server, "get_task_result", task_id=scan["task_id"], format="xml")
    assert xml["format"] == "xml" and xml["content"].startswith("<?xml") and xml["result"] is None
    assert json.loads(parse_report(xml["content"], full["target"]).model_dump_json()) == full["result"] | {
        "warnings": full["result"]["warnings"]}
    table = await tool(server, "get_task_result", task_id=scan["task_id"], format="csv")
    lines = table["content"].splitlines()
    assert lines[0] == "address,hostname,port,protocol,state,service,product,version,extrainfo"
    assert f"127.0.0.1,,{port},tcp,open," in table["content"] and len(lines) == 1 + 3 * 2


async def test_answers_stay_under_the_byte_cap_on_the_wire(live_server: StartServer) -> None:
    """The cap counts the bytes of the HTTP body: the answer's two copies and the framing."""
    server = live_server(max_answer_bytes=8000)
    result, wire = await tool_call_on_the_wire(server.url, ALICE, "custom_scan",
                                               {"command": "-p 1-30 --reason 127.0.0.0/26", "timeout": 60})
    scan = result["structuredContent"]
    assert wire <= 8000 and scan["status"] == "completed"
    assert f"offset {scan['page']['next_offset']} for more" in scan["message"]
    seen, offset, cut, sizes = [], 0, [], []
    while offset is not None:
        result, wire = await tool_call_on_the_wire(server.url, ALICE, "get_task_result",
                                                   {"task_id": scan["task_id"], "view": "full", "offset": offset})
        page = result["structuredContent"]
        sizes.append(wire)
        seen += [h["address"] for h in page["result"]["hosts"]]
        cut.append(page["truncated"])
        offset = page["page"]["next_offset"]
    assert max(sizes) <= 8000 and max(sizes) > 6000, "pages fill the cap, and never pass it"
    assert len(seen) == len(set(seen)) == 64 and any(cut)


async def test_a_finished_result_is_fetched_again_after_the_hand_off(live_server: StartServer) -> None:
    server = live_server()
    started = await tool(server, "custom_scan", command="-p 1-300 --scan-delay 20ms 127.0.0.1", timeout=5)
    final = await poll_until_finished(server.url, ALICE, started["task_id"])
    assert final["status"] == "completed" and final["result"]["hosts_up"] == 1 and not final["result"]["partial"]
