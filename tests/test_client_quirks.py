"""Real clients' requests as they arrive, byte for byte, against a real server process: the
quirks http_edge.py absorbs so that each client works as it is (docs/clients.md has the table)."""

from __future__ import annotations

import json
import socket
from typing import Any

import h11
import pytest

from tests.support import ALICE, Listeners, LiveServer, StartServer, top_ports

pytestmark = pytest.mark.anyio
SCANNED = "127.61.0.2"
# What flagify-com/UniMCPSim's mcp_client.py (the DeepSOC team's MCP client) sends, captured
# from its code on httpx 0.28.1: `?token=` in the URL, Accept with SSE only, httpx's order of
# headers and its compact JSON. HOST, TOKEN and the body are filled in per request.
DEEPSOC_REQUEST = (
    b"POST /mcp?token=TOKEN HTTP/1.1\r\n"
    b"Host: HOST\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"User-Agent: python-httpx/0.28.1\r\n"
    b"Content-Type: application/json\r\n"
    b"Accept: text/event-stream\r\n"
    b"Content-Length: LENGTH\r\n"
    b"\r\n"
)
# Its initialize, as it sends it; it never sends notifications/initialized, and every request has id 1.
DEEPSOC_INITIALIZE = {"jsonrpc": "2.0", "method": "initialize", "id": 1, "params": {
    "protocolVersion": "2025-06-18", "capabilities": {"roots": {"listChanged": True}, "sampling": {}},
    "clientInfo": {"name": "UniMCPSim-Playground", "version": "1.0.0"}}}


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as it is on a new connection; the status, headers and whole body of the answer."""
    connection = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(request)
        connection.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))  # h11 expects one
        status, headers, body = 0, {}, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {name.decode(): value.decode() for name, value in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body


def deepsoc_post(server: LiveServer, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """One request exactly as the DeepSOC client writes it."""
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    head = (DEEPSOC_REQUEST.replace(b"TOKEN", ALICE.encode()).replace(b"HOST", f"127.0.0.1:{server.port}".encode())
            .replace(b"LENGTH", str(len(payload)).encode()))
    return raw_exchange(server.port, head + payload)


def deepsoc_read(answer: tuple[int, dict[str, str], bytes]) -> dict[str, Any]:
    """What the DeepSOC client makes of an answer: raise_for_status, then the first `data:` line."""
    status, _, body = answer
    assert status == 200, body
    first = next(line for line in body.decode().splitlines() if line.startswith("data:"))
    message: dict[str, Any] = json.loads(first[5:].strip())
    return message


def deepsoc_call(server: LiveServer, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tools/call as the DeepSOC client makes it; the JSON-RPC result."""
    answer = deepsoc_read(deepsoc_post(server, {"jsonrpc": "2.0", "method": "tools/call", "id": 1,
                                                "params": {"name": name, "arguments": arguments}}))
    result: dict[str, Any] = answer["result"]
    return result


def first_text(result: dict[str, Any]) -> str:
    """The one part of a result the DeepSOC client reads: the text of its first text block."""
    return str(next(item["text"] for item in result["content"] if item["type"] == "text"))


def test_the_deepsoc_client_initializes_lists_and_scans(live_server: StartServer, listeners: Listeners) -> None:
    """Its requests as they are: before http_edge widened an SSE-only Accept, every one got 406
    ("Client must accept both application/json and text/event-stream"). Skipping
    notifications/initialized costs nothing on this stateless server, and the first text block
    of every result is the whole structured answer as JSON (FastMCP writes it there), or for
    an error the coded words."""
    server = live_server()
    port = next(port for port in top_ports(100) if 1024 <= port < 32768 and listeners.open(port, SCANNED))
    _, headers, _ = answer = deepsoc_post(server, DEEPSOC_INITIALIZE)
    assert headers["content-type"].startswith("text/event-stream")
    assert deepsoc_read(answer)["result"]["protocolVersion"] == "2025-06-18"
    tools = deepsoc_read(deepsoc_post(server, {"jsonrpc": "2.0", "method": "tools/list", "id": 1}))["result"]["tools"]
    assert "quick_scan" in {tool["name"] for tool in tools}
    scanned = deepsoc_call(server, "quick_scan", {"target": SCANNED, "timeout": 60})
    answer_json = json.loads(first_text(scanned))
    assert answer_json == scanned["structuredContent"] and answer_json["status"] == "completed"
    assert [p["port"] for p in answer_json["result"]["hosts"][0]["ports"]] == [port]
    task = {"task_id": answer_json["task_id"]}
    for name, arguments in [("get_task_status", task), ("get_task_result", task), ("list_tasks", {}),
                            ("get_limits", {}), ("nmap_version", {}), ("list_workers", {})]:
        result = deepsoc_call(server, name, arguments)
        assert json.loads(first_text(result)) == result["structuredContent"], name
    refused = deepsoc_call(server, "quick_scan", {"target": SCANNED, "timeout": 1})
    assert first_text(refused).startswith("invalid_argument: ")
