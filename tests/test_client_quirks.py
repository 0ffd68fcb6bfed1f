"""Real clients' requests as they arrive, byte for byte, against a real server process: the
quirks http_edge.py absorbs so that each client works as it is (docs/clients.md has the table)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest

from client_configs import render_client_config
from http_edge import MISSING_TOKEN, NO_OAUTH, WRONG_TOKEN
from tests.support import ALICE, MCP_HEADERS, Listeners, LiveServer, StartServer, top_ports

pytestmark = pytest.mark.anyio
SCANNED = "127.61.0.2"
WRONG = "wrong-secret-" + "w" * 30
APP = "http://app.example"
# mcp-remote's undici needs Node.js 20 (Debian 12 ships 18, where it fails at start).
MCP_REMOTE_NODE = 20
# Where mcp-remote 0.15.1 looked after a 401 (seen in the server's access log), in its order.
DISCOVERY_PATHS = ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource",
                   "/.well-known/oauth-authorization-server/mcp", "/.well-known/oauth-authorization-server",
                   "/.well-known/openid-configuration/mcp", "/.well-known/openid-configuration",
                   "/mcp/.well-known/openid-configuration", "/register"]
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


@pytest.mark.parametrize("sent", ["none", "header", "query"])
def test_oauth_discovery_ends_in_the_401_s_words(live_server: StartServer, sent: str) -> None:
    """After a 401, OAuth clients walk these paths and end at POST /register: each was a
    plain-text 404 ("Not Found"), which mcp-remote reported as a registration rejected."""
    server = live_server()
    base = f"http://127.0.0.1:{server.port}"
    headers = {"Authorization": f"Bearer {WRONG}"} if sent == "header" else {}
    query = f"?token={WRONG}" if sent == "query" else ""
    refused = httpx.post(server.url + query, json=DEEPSOC_INITIALIZE, headers=MCP_HEADERS | headers, timeout=10)
    assert refused.status_code == 401
    for path in DISCOVERY_PATHS:
        answer = httpx.request("POST" if path == "/register" else "GET", base + path + query, headers=headers,
                               json={"redirect_uris": ["http://localhost:1/cb"]}, timeout=10)
        assert answer.status_code == 404, path
        document = answer.json()
        assert document["error"] == refused.json()["error"], path
        assert document["error_description"].startswith(refused.json()["error_description"]), path
        assert NO_OAUTH in document["error_description"], path


def node_major() -> int:
    """The major version of the Node.js npx runs with; 0 without npx or node."""
    if shutil.which("npx") is None or shutil.which("node") is None:
        return 0
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout
    return int(version.lstrip("v").split(".")[0] or 0) if version.startswith("v") else 0


@pytest.mark.skipif(node_major() < MCP_REMOTE_NODE, reason=(
    f"needs npx with Node.js {MCP_REMOTE_NODE} or newer to run mcp-remote (its undici fails on Debian 12's 18)"))
def test_mcp_remote_as_printed_reports_the_server_s_reason(live_server: StartServer, tmp_path: Path) -> None:
    """The Claude Desktop entry we print, run as Claude Desktop runs it, with a wrong token:
    mcp-remote's fatal error was "SseError: SSE error: Non-200 status code (405)" (its SSE
    fallback), and without the fallback "Dynamic Client Registration rejected (HTTP 404): Not Found"."""
    server = live_server()
    entry = json.loads(render_client_config("claude-desktop", url=server.url, secret=WRONG,
                                            stdio_command=["nmap-mcp", "--stdio"]))["mcpServers"]["nmap"]
    environment = {**os.environ, **entry["env"], "HOME": str(tmp_path)}  # its OAuth state stays in tmp_path
    # Its own session, killed whole at the end: npx's children must not go on knocking with the
    # wrong token at a port the next test's server may get (its failed-token throttle counts them).
    mcp_remote = subprocess.Popen([entry["command"], *entry["args"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=environment, text=True, start_new_session=True)
    try:
        _, stderr = mcp_remote.communicate(json.dumps(DEEPSOC_INITIALIZE) + "\n", timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(mcp_remote.pid, signal.SIGKILL)
        mcp_remote.wait()
    fatal = next(line for line in stderr.splitlines() if "Fatal error" in line)
    assert "SseError" not in stderr
    assert '"error_description":"' + WRONG_TOKEN.split(":")[0] in fatal.replace("\\", "")
    assert WRONG not in stderr


def test_browser_clients_of_2026_07_28_pass_cors_and_read_every_refusal(live_server: StartServer) -> None:
    """A preflight listing the headers the TypeScript SDK v2 sends got 400 "Disallowed CORS
    headers"; a 401 or 429 to an allowed origin lost its CORS headers, so a browser showed an
    opaque CORS error instead of the reason."""
    server = live_server(cors_origins=[APP], failed_token_limit=1, failed_token_window_seconds=600)
    preflight = httpx.options(server.url, headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version, mcp-method, mcp-name"})
    assert preflight.status_code == 200, preflight.text
    assert {"mcp-method", "mcp-name"} <= {h.strip().lower() for h in
                                          preflight.headers["access-control-allow-headers"].split(",")}
    modern = {"Origin": APP, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}
    missing = httpx.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                         headers=MCP_HEADERS | modern, timeout=10)
    wrong, throttled = (httpx.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                   headers=MCP_HEADERS | modern | {"Authorization": f"Bearer {WRONG}"}, timeout=10)
                        for _ in range(2))
    misdirected = httpx.post(server.url, json={}, headers=MCP_HEADERS | {"Origin": APP, "Host": "evil.example"})
    for answer, status in [(missing, 401), (wrong, 401), (throttled, 429), (misdirected, 421)]:
        assert answer.status_code == status, answer.text
        assert answer.headers["access-control-allow-origin"] == APP, status
    assert missing.json()["error_description"] == MISSING_TOKEN
    assert wrong.json()["error_description"] == WRONG_TOKEN
    assert throttled.json()["error"] == "too_many_requests"
    # Retry-After and the challenge are not among the headers a browser shows a script unasked.
    assert "retry-after" in throttled.headers["access-control-expose-headers"].lower()
