"""Status polling (issue 10): get_task_status req/s, this server vs a bare FastMCP server.

    .venv/bin/python bench/status_polling.py [--clients 50] [--duration 10] [--rounds 3]
                                              [--database sqlite] [--bare-schemas inlined] [--pin]

Both servers run as their own processes, stateless Streamable HTTP with a TokenVerifier:
`server.py -c CONFIG` (one completed quick_scan of 127.0.0.1 in its database), and this
script with --serve-bare: FastMCP with one tool, get_task_status(task_id: TaskId) ->
TaskAnswer, returning a constant answer. With --bare-schemas inlined (the default) the bare
tool's schemas are inlined once at start-up as this server does (tools.inlined_tool), so
the bare server does no per-call $ref walk that ours avoids; `fastmcp` registers it with
plain @mcp.tool.

The request is the one the official MCP Python SDK (mode auto: the 2026-07-28 era, no
session) sends for get_task_status, captured on the wire (headers and JSON-RPC body with
its _meta), then replayed by wrk: --clients connections, one wrk thread. wrk is C and
event-driven, so the load generator takes a small share of the 2 cores (its CPU per
request is printed beside the servers'); --pin puts the servers on CPU 0 and wrk on CPU 1.
A Lua hook counts every answer that is not HTTP 200 with "isError":false. Runs alternate
(bare, ours, ours, bare, ...), each after a short warm-up; figures are medians.
Goal: ours / bare >= 0.9x.

Then bytes on the wire for a full page: custom_scan -sT -p 1-200 127.0.0.0/24, and
get_task_result of it with view full and limit 1000 through the SDK, max_answer_bytes
60000: the HTTP response body size against max_answer_bytes (goal: not above it).
Targets only 127.0.0.0/24.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import uvicorn
from fastmcp import FastMCP
from fastmcp.server.auth import AccessToken, TokenVerifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SECRET,
    Wire,
    capture_tool_call,
    cpu_seconds,
    mcp_session,
    postgres_database,
    service_config,
    start_api,
)
from models import ScanKind, TaskAnswer, TaskStatus
from tests.support import LiveServer, free_port, wait_until
from tools import TaskId, inlined_tool

GOAL_RATE = 0.9
MAX_ANSWER_BYTES = 60_000
PAGE_SCAN = "-sT -p 1-200 127.0.0.0/24"
WARMUP_SECONDS = 2
# What wrk must not replay: it sets these itself per connection and request.
WRK_OWN_HEADERS = {"host", "content-length", "connection"}
LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
bad = 0
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"isError":false', 1, true) then bad = bad + 1 end
end
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("bad") end
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("BENCH requests=%d duration_us=%d bad=%d errors=%d p50_us=%.0f p99_us=%.0f\\n",
    summary.requests, summary.duration, bad, errors, latency:percentile(50), latency:percentile(99)))
end
"""


def serve_bare(port: int, schemas: str) -> None:
    """The bare FastMCP server (run in its own process by --serve-bare)."""

    class OneTokenVerifier(TokenVerifier):
        async def verify_token(self, token: str) -> AccessToken | None:
            if hmac.compare_digest(token.encode(), SECRET.encode()):
                return AccessToken(token=token, client_id="bench", scopes=[])
            return None

    mcp = FastMCP("bare", auth=OneTokenVerifier())
    created = time.time()

    async def get_task_status(task_id: TaskId) -> TaskAnswer:
        """State of one task (a constant answer)."""
        return TaskAnswer(status=TaskStatus.COMPLETED, task_id=task_id, kind=ScanKind.QUICK, target="127.0.0.1",
                          worker="bare", created_at=created, started_at=created, finished_at=created)

    if schemas == "inlined":
        inlined_tool(mcp, {})(get_task_status)
    else:
        mcp.tool(get_task_status)
    app = mcp.http_app(path="/mcp", stateless_http=True, json_response=False)
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")


def start_bare(workdir: Path, schemas: str) -> LiveServer:
    port = free_port()
    program = (sys.executable, __file__, "--serve-bare", str(port), "--bare-schemas", schemas)
    server = LiveServer(workdir / "bare.json", workdir / "bare.log", port, program=program)
    server.process = subprocess.Popen(program, stdout=server.log_path.open("ab"), stderr=subprocess.STDOUT)
    if not wait_until(lambda: port_answers(server), 20, 0.05):
        server.stop()
        raise RuntimeError("the bare server did not start:\n" + server.log_text())
    return server


def port_answers(server: LiveServer) -> bool:
    assert server.process is not None
    if server.process.poll() is not None:
        raise RuntimeError("the bare server exited:\n" + server.log_text())
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(server.url, timeout=1)
        return True
    return False


def check_replay(url: str, request: httpx2.Request) -> None:
    """The captured request, sent again as is, gets a completed status from this server."""
    headers = {k: v for k, v in request.headers.items() if k not in WRK_OWN_HEADERS}
    reply = httpx.post(url, content=request.content, headers=headers, timeout=10)
    reply.raise_for_status()
    result = reply.json()["result"]
    assert not result["isError"] and result["structuredContent"]["status"] == "completed", result


def lua_script(path: Path, request: httpx2.Request) -> Path:
    body = request.content.decode()
    assert "]==]" not in body
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in request.headers.items() if k not in WRK_OWN_HEADERS)
    path.write_text(LUA.format(body=body, headers=headers))
    path.chmod(0o600)  # it holds the bench token
    return path


def wrk(server: LiveServer, script: Path, clients: int, seconds: float, pin: tuple[str, ...]) -> dict[str, float]:
    """One wrk run against `server`: req/s, latencies, and CPU per request of both sides."""
    assert server.process is not None
    before_server, before_client = cpu_seconds(server.process.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*pin, "wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "10s",
                          "-s", str(script), server.url], capture_output=True, text=True, check=True).stdout
    after_client = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = cpu_seconds(server.process.pid) - before_server
    client_cpu = (after_client.ru_utime + after_client.ru_stime) - (before_client.ru_utime + before_client.ru_stime)
    figures = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.split("BENCH", 1)[1])}
    assert figures["bad"] == 0 and figures["errors"] == 0, f"wrong or failed answers: {figures}"
    requests = figures["requests"]
    return {"rate": requests / (figures["duration_us"] / 1e6), "p50": figures["p50_us"] / 1000,
            "p99": figures["p99_us"] / 1000, "server_cpu": server_cpu / requests * 1000,
            "client_cpu": client_cpu / requests * 1000}


async def full_page_bytes(url: str) -> dict[str, Any]:
    """Scan 127.0.0.0/24, fetch its result in view full through the SDK; sizes on the wire."""
    wire = Wire()
    async with mcp_session(url, wire.hooks()) as client:
        scan = (await client.call_tool("custom_scan", {"command": PAGE_SCAN, "timeout": 300})).structured_content
        assert scan["status"] == "completed", scan
        await client.call_tool("get_task_result", {"task_id": scan["task_id"], "view": "full", "limit": 1000})
    _, body = wire.tool_call("get_task_result")
    result = json.loads(body)["result"]
    structured = result["structuredContent"]
    return {
        "body": len(body),
        "structured": len(json.dumps(structured, separators=(",", ":"), ensure_ascii=False).encode()),
        "text": sum(len(part["text"].encode()) for part in result["content"] if part["type"] == "text"),
        "truncated": structured["truncated"], "page": structured["page"],
        "hosts_total": structured["result"]["hosts_total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections")
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated pairs of runs")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--bare-schemas", choices=("inlined", "fastmcp"), default="inlined")
    parser.add_argument("--pin", action="store_true", help="servers on CPU 0, wrk on CPU 1 (taskset)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare, args.bare_schemas)
        return
    wrk_pin = ("taskset", "-c", "1") if args.pin else ()
    with tempfile.TemporaryDirectory(prefix="bench-poll-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        where = {"database_url": stack.enter_context(postgres_database())} if args.database == "postgresql" else {}
        config = service_config(workdir / "ours", max_answer_bytes=MAX_ANSWER_BYTES, **where)
        ours = start_api(config)
        stack.callback(ours.stop)
        bare = start_bare(workdir, args.bare_schemas)
        stack.callback(bare.stop)
        if args.pin:
            for server in (ours, bare):
                # -a: every thread of the running process; nmap and threads started later inherit it.
                subprocess.run(["taskset", "-a", "-c", "-p", "0", str(server.process.pid)],  # type: ignore[union-attr]
                               check=True, capture_output=True)

        async def first_scan() -> str:
            async with mcp_session(ours.url) as client:
                answer = (await client.call_tool("quick_scan", {"target": "127.0.0.1"})).structured_content
            assert answer["status"] == "completed", answer
            return answer["task_id"]

        request = asyncio.run(capture_tool_call(ours.url, "get_task_status", {"task_id": asyncio.run(first_scan())}))
        for server in (ours, bare):
            check_replay(server.url, request)
        script = lua_script(workdir / "poll.lua", request)
        servers = {"bare FastMCP": bare, "this server": ours}
        for server in servers.values():
            wrk(server, script, args.clients, WARMUP_SECONDS, wrk_pin)
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for round_no in range(args.rounds):
            for name in (list(servers) if round_no % 2 == 0 else list(servers)[::-1]):
                figures[name].append(wrk(servers[name], script, args.clients, args.duration, wrk_pin))
                print(f"round {round_no + 1}: {name:13} {figures[name][-1]['rate']:7.0f} req/s", flush=True)
        page = asyncio.run(full_page_bytes(ours.url))

    def median(name: str, key: str) -> float:
        return statistics.median(f[key] for f in figures[name])

    print(f"\nget_task_status, 2026-07-28 era as the SDK sends it, {args.clients} connections (wrk, 1 thread"
          f"{', pinned: servers CPU 0, wrk CPU 1' if args.pin else ', not pinned'}), {args.database}, "
          f"bare schemas {args.bare_schemas}; medians of {args.rounds} x {args.duration:g} s per server")
    for name in servers:
        print(f"{name:13} {median(name, 'rate'):7.0f} req/s  p50 {median(name, 'p50'):6.1f} ms  "
              f"p99 {median(name, 'p99'):6.1f} ms  server CPU {median(name, 'server_cpu'):5.2f} ms/req  "
              f"wrk CPU {median(name, 'client_cpu'):5.3f} ms/req")
    ratio = median("this server", "rate") / median("bare FastMCP", "rate")
    cpu_ratio = median("this server", "server_cpu") / median("bare FastMCP", "server_cpu")
    print(f"ratio this server / bare: {ratio:.2f}x req/s (goal >= {GOAL_RATE}x): "
          f"{'met' if ratio >= GOAL_RATE else 'NOT met'}; server CPU per request {cpu_ratio:.2f}x")
    print(f"\nfull page: get_task_result view=full limit=1000 of `{PAGE_SCAN}` ({page['hosts_total']} hosts), "
          f"max_answer_bytes {MAX_ANSWER_BYTES}")
    print(f"HTTP response body {page['body']} bytes = {page['body'] / MAX_ANSWER_BYTES:.2f}x max_answer_bytes "
          f"(goal <= 1.00x): {'met' if page['body'] <= MAX_ANSWER_BYTES else 'NOT met'}")
    print(f"  structuredContent {page['structured']} bytes "
          f"({page['structured'] - MAX_ANSWER_BYTES:+d} against the cap); "
          f"the same JSON again as text content: {page['text']} bytes before JSON-escaping into the body")
    print(f"  truncated={page['truncated']}, page {page['page']}")


if __name__ == "__main__":
    main()
