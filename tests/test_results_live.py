"""Results over real HTTP, real nmap: MCP progress notifications on the SSE stream, and answers
that stay under the byte cap counted on the wire. What the tools answer is in test_results.py."""

from __future__ import annotations

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support import ALICE, StartServer, tool_call_on_the_wire

pytestmark = pytest.mark.anyio


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
